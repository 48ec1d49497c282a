"""A tiny LLaVA-style VLM learns to caption synthetic shapes images (issue #21): does it read the image,
how well does it describe held-out images, and what does caption-preserving augmentation change,
measured over seeds? Writes experiments/results/18_vlm_shapes.md (and 18_vlm_shapes.png with example
captions).

Data: ``llmarch.data.shapes``: 48-pixel images of 1-3 coloured shapes (6 colours x 3 shapes) in
distinct slots of four (left, right, top, bottom; layout "thirds": the outer middle cells of a 3x3
grid), captions naming them in slot order, e.g. "a red circle on the left and a blue square at the
top". Training and held-out images come from different seeds. Rows: 9 image placeholders,
"Caption: ", the caption and EOS, the loss on the caption and its EOS only
(``llmarch.vision.captioning``, the recipe ``llmarch train --task shapes-captions`` runs).

Model: a SigLIP tower (48 pixels, patches of 16 -> 3x3 = 9 tokens, each slot's shape whole in one
patch; width 128, 2 blocks) -> LLaVA's 2-layer MLP projector -> a 2-block llmarch decoder (D=128); all
trained from scratch, AdamW with warmup and cosine decay.

Runs, same steps, batch and model, each over ``--seeds`` (the seed sets the initialization and the
data order; the training images are the same):
  * aug: train-time augmentation (``CaptionAugment``: mirror with "left"/"right" swapped, rotation
    of up to 5 degrees, pixel noise of std 6 levels);
  * no-aug: the same without augmentation;
  * blind (first seed only): trained on blank images, the control for how far the captions'
    grammar and word frequencies alone take the loss.
Each is scored on the held-out set: the caption loss with the true images and with blank ones, and
greedy captions parsed back into (position, colour, shape) and compared with the truth.

    nice -n 10 python experiments/18_vlm_shapes.py [--steps 450 --seeds 0,1,2]
    python experiments/18_vlm_shapes.py --quick        # a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from llmarch import machine
from llmarch.data.image_text import CaptionAugment, caption_dataset
from llmarch.data.shapes import COLORS, POSITIONS, SHAPES
from llmarch.vision.captioning import (
    HELD_OUT_SEED,
    TRAIN_SEED,
    caption_images,
    held_out_loss,
    score_captions,
    shapes_data,
    shapes_format,
    shapes_model_config,
    shapes_tokenizer,
    train_captioner,
)

HERE = pathlib.Path(__file__).resolve().parent
IMAGE, PATCH = 48, 16
EVERY_HEADER = (
    "| run | seed | train loss (last 20) | loss (true) | loss (blank) | exact | position | colour | shape "
    "| both | extra | train s |"
)
METRICS = ("exact", "position", "colour", "shape", "both", "loss_true", "loss_blank")


def plot_examples(path, images, truths, preds, n=8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n // 2, figsize=(3.2 * n // 2, 8.0))
    for ax, image, truth, pred in zip(axes.flat, images[:n], truths[:n], preds[:n], strict=True):
        ax.imshow(np.clip(image.transpose(1, 2, 0) * 0.5 + 0.5, 0, 1), interpolation="nearest")
        ax.set_axis_off()
        mark = "exact" if pred == truth else f"truth: {truth}"
        ax.set_title(f"{_wrap(pred)}\n({_wrap(mark)})", fontsize=6.5)
    fig.suptitle("Held-out images, greedy captions of the 'aug' model (first seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int = 34) -> str:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t of mean(a) - mean(b); nan with fewer than two values a side or no spread."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    diff = statistics.fmean(a) - statistics.fmean(b)
    if se == 0:  # no spread at all: equal means are no difference, unequal ones all signal
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the aug and no-aug runs")
    p.add_argument("--no-blind", action="store_true", help="skip the blind control")
    p.add_argument("--quick", action="store_true", help="a smoke test: few steps, one seed, small sets")
    p.add_argument("--out", default=None, help="results file (default results/18_vlm_shapes.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.held_out, args.seeds = 20, 64, "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "python experiments/18_vlm_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    train_src = shapes_data(args.train_images, TRAIN_SEED, IMAGE)
    held_src = shapes_data(args.held_out, HELD_OUT_SEED, IMAGE)
    tok = shapes_tokenizer(train_src)
    cfg = shapes_model_config(tok, image_size=IMAGE, patch_size=PATCH)
    eval_bs = 64 if args.held_out % 64 == 0 else args.held_out
    held = caption_dataset(held_src, tok, shapes_format(cfg), batch_size=eval_bs, train=False)
    plan = [(name, seed) for seed in seeds for name in ("aug", "no-aug")]
    if not args.no_blind:
        plan.append(("blind", seeds[0]))
    rows, examples, curves = [], None, {}
    for name, seed in plan:
        print(f"run {name} seed {seed}", flush=True)

        def log(i, loss, seconds):
            if i % 100 == 0 or i == args.steps - 1:
                print(f"  step {i:4d} loss {loss:.4f} ({seconds:.0f}s)", flush=True)

        trained = train_captioner(
            cfg,
            tok,
            train_src,
            steps=args.steps,
            batch_size=args.batch,
            learning_rate=args.lr,
            seed=seed,
            augment=None if name == "no-aug" else CaptionAugment(),
            blind=name == "blind",
            log=log,
        )
        row = {"run": name, "seed": seed, "seconds": trained.seconds}
        row["train_loss"] = float(np.mean(trained.losses[-20:]))
        row["loss_true"] = held_out_loss(trained, held, "true")
        row["loss_blank"] = held_out_loss(trained, held, "blank")
        truths, preds, images = caption_images(trained, tok, held_src, eval_bs)
        row.update(score_captions(truths, preds))
        if name == "aug" and examples is None:
            examples = (images, truths, preds)
        curves[(name, seed)] = trained.losses
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        rows.append(row)
    minutes = (time.perf_counter() - t0) / 60
    write(args, command, cfg, tok, rows, examples, curves, minutes, seeds)


def write(args, command, cfg, tok, rows, examples, curves, minutes, seeds) -> None:
    out = pathlib.Path(args.out) if args.out else HERE / "results" / "18_vlm_shapes.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_examples(png, *examples)
    images, truths, preds = examples
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(_model(cfg), nnx.Param)))
    per_run = "\n".join(
        f"| {r['run']} | {r['seed']} | {r['train_loss']:.3f} | {r['loss_true']:.3f} | "
        f"{r['loss_blank']:.3f} | "
        f"{r['exact']:.1%} | {r['position']:.1%} | {r['colour']:.1%} | {r['shape']:.1%} | {r['both']:.1%} | "
        f"{r['extra']:.2f} | {r['seconds']:.0f} |"
        for r in rows
    )
    by = {name: [r for r in rows if r["run"] == name] for name in ("aug", "no-aug", "blind")}
    summary = []
    for name, rs in by.items():
        if not rs:
            continue
        cells = []
        for m in METRICS:
            mu, sd = mean_std([r[m] for r in rs])
            cells.append(f"{mu:.3f} ± {sd:.3f}" if m.startswith("loss") else f"{mu:.1%} ± {sd:.1%}")
        summary.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    diff = []
    for m in METRICS:
        a, b = [r[m] for r in by["aug"]], [r[m] for r in by["no-aug"]]
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        t = welch_t(a, b)
        unit = (lambda v: f"{v:+.3f}") if m.startswith("loss") else (lambda v: f"{v * 100:+.1f} pt")
        spread = max(sa, sb)
        verdict = "beyond" if abs(ma - mb) > 2 * spread and abs(t) > 2.8 else "within"
        diff.append(f"| {m} | {unit(ma - mb)} | {unit(spread).lstrip('+')} | {t:.1f} | {verdict} |")
    example_rows = "\n".join(
        f"| {i} | {t} | {p} | {'yes' if p == t else 'no'} |"
        for i, (t, p) in enumerate(zip(truths[:8], preds[:8], strict=True))
    )
    chance_colour, chance_shape = 1 / len(COLORS), 1 / len(SHAPES)
    text = f"""# 18 A tiny VLM captions synthetic shapes

Command: `{command}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Data: `llmarch.data.shapes`, {IMAGE}x{IMAGE} images of 1-3 shapes ({len(COLORS)} colours x
{len(SHAPES)} shapes) in distinct slots of {len(POSITIONS)} (left, right, top, bottom; layout "thirds",
the outer middle cells of a 3x3 grid), captions naming them in slot order. Training:
{args.train_images:,} images (seed {TRAIN_SEED}), {args.steps} steps of {args.batch}; held out:
{args.held_out} other images (seed {HELD_OUT_SEED}).
Rows of 48: {cfg.image_tokens} image placeholders, "Caption: ", caption, EOS; byte-level BPE trained on
2,000 training captions ({tok.vocab_size} ids, every caption word one token); loss on the caption and EOS.

Model (`llmarch.vision.captioning`, what `llmarch train --task shapes-captions` trains): SigLIP tower
({IMAGE} px, patch {PATCH}: 9 tokens, one per grid cell; width 128, 2 blocks) -> 2-layer MLP projector ->
llmarch decoder (D=128, 2 blocks, 4 heads), {n_params:,} parameters, all trained from scratch, AdamW
at {args.lr:g} (warmup 5%, cosine to 10%), clip 1.0. Runs: **aug** with train-time `CaptionAugment()`
(mirror with left/right swapped in the caption, p=0.5; rotation up to 5 degrees; pixel noise std
6/255), **no-aug** without, each with seeds {", ".join(map(str, seeds))} (initialization and data order);
**blind** (control, seed {seeds[0]}) trained on blank images. Whole experiment {minutes:.1f} min on this
shared machine (train s include compiling and other jobs' load).

## Held-out accuracy and loss, mean ± std over seeds

Per true shape: a shape named at its position (position), with the right colour / shape / both
(chance for a guess at a named position: colour {chance_colour:.0%}, shape {chance_shape:.0%}, both
{chance_colour * chance_shape:.0%}). Loss: mean nats per caption token with the true images and with
blank ones.

| run | seeds | exact caption | position | colour | shape | colour+shape | loss (true) | loss (blank) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(summary)}

## aug minus no-aug

"spread": the larger of the two conditions' std over seeds; t: Welch's t over the seeds. "beyond"
when the difference exceeds twice the spread and |t| > 2.8 (two-sided 5% at about 4 degrees of
freedom), else "within".

| metric | aug - no-aug | spread | t | vs seed spread |
|---|---|---|---|---|
{chr(10).join(diff)}

## Every run

{EVERY_HEADER}
|---|---|---|---|---|---|---|---|---|---|---|---|
{per_run}

"extra": positions named per caption that hold no shape.

Examples (the first aug model; images in `{png.name}`):

| # | truth | generated | exact |
|---|---|---|---|
{example_rows}
"""
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} and {png} ({minutes:.1f} min)")


def _model(cfg):
    from llmarch.vision.llava import Llava

    return Llava(cfg, rngs=nnx.Rngs(0))


if __name__ == "__main__":
    main()
