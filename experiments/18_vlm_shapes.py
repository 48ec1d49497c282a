"""A tiny LLaVA-style VLM learns to caption synthetic shapes images (issue #21): does it read the image,
how well does it describe held-out images, and what does caption-preserving augmentation change?
Writes experiments/results/18_vlm_shapes.md (and 18_vlm_shapes.png with example captions).

Data: ``llmarch.data.shapes``: 32-pixel images of 1-3 coloured shapes (6 colours x 3 shapes) in
distinct slots of four (left, right, top, bottom), with captions that name them in slot order, e.g.
"a red circle on the left and a blue square at the top". Training and held-out images come from
different seeds. Rows (``llmarch.data.image_text``): BOS, 16 image placeholders, "Caption: ", the
caption and EOS, the loss on the caption and its EOS only. Tokens: byte-level BPE
(``llmarch.data.BPETokenizer``) trained on the training captions to 330 entries, so caption words are
single tokens (rows of 48 instead of the ~120 bytes, which keeps the CPU budget); the placeholder is
id 330, the first one past the tokenizer's.

Model: a SigLIP tower (32 pixels, patches of 8 -> 16 tokens, width 64, 2 blocks) -> LLaVA's 2-layer
MLP projector -> a 2-block llmarch decoder (D=128); all three trained from scratch
(``llmarch.vision.train``, stage "all"), AdamW with warmup and cosine decay.

Runs, same steps, batch, seed and model:
  * aug: train-time augmentation (``CaptionAugment``: mirror with "left"/"right" swapped, rotation
    of up to 5 degrees, pixel noise of std 6 levels);
  * no-aug: the same without augmentation;
  * blind: trained on blank images (the tower sees only background), the control for how far the
    captions' grammar and word frequencies alone take the loss.
Each is scored on the held-out set: the caption loss with the true images, and with the images
replaced by blank (background-only) or uniform-noise ones; and greedy captions (no sampling), parsed
back into (position, colour, shape) and compared with the truth: exact match of the whole caption,
and per true shape whether a shape is named at its position with the right colour, shape, or both.
The ``held-out, mirrored`` columns score the same images mirrored left-right (truth mirrored too).

    nice -n 10 python experiments/18_vlm_shapes.py [--steps 800]
    python experiments/18_vlm_shapes.py --quick        # a ~1 minute smoke test
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

from llmarch import machine
from llmarch.config import AttentionConfig, ModelConfig
from llmarch.data import BPETokenizer
from llmarch.data.image_text import CaptionAugment, CaptionFormat, caption_batches, caption_dataset
from llmarch.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    mirror_caption,
    parse_caption,
)
from llmarch.vision import Llava, LlavaConfig, VisionConfig
from llmarch.vision.train import greedy_captions, make_eval_loss, make_vlm_train_step, split_trainable

HERE = pathlib.Path(__file__).resolve().parent
SEQ_LEN = 48
BPE_VOCAB = 330


def train_tokenizer(source, n: int = 2000) -> BPETokenizer:
    texts = [source[i]["caption"] for i in range(min(n, len(source)))]
    return BPETokenizer.train([*texts, *["Caption: "] * 50], BPE_VOCAB)


def model_config(tok) -> LlavaConfig:
    vision = VisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        use_head=False,
    )
    text = ModelConfig(
        vocab_size=-(-(tok.vocab_size + 1) // 8) * 8,  # the tokenizer's ids and the placeholder
        d_model=128,
        num_layers=2,
        ffn_dim=384,
        max_seq_len=SEQ_LEN,
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=32),
    )
    return LlavaConfig(vision=vision, text=text, image_token_id=tok.vocab_size, vision_feature_layer=-1)


class Mirrored:
    """A source's records mirrored left-right, captions mirrored to match (for the held-out check)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        r = self.source[i]
        return {"image": np.ascontiguousarray(r["image"][:, ::-1]), "caption": mirror_caption(r["caption"])}


def train(tok, cfg, fmt, train_src, *, steps, batch_size, lr, seed, augment, blind):
    model = Llava(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, frozen = split_trainable(model, "all")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)
    step = make_vlm_train_step(graphdef, tx)
    kwargs = dict(augment=augment) if augment is not None else dict(augment=CaptionAugment(0.0, 0.0, 0.0))
    batches = caption_batches(train_src, tok, fmt, batch_size=batch_size, train=True, seed=seed, **kwargs)
    start, losses = time.perf_counter(), []
    for i in range(steps):
        batch = next(batches)
        if blind:
            batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], -1.0))
        params, opt_state, metrics = step(params, frozen, opt_state, batch)
        losses.append(float(metrics["loss"]))
        if i % 100 == 0 or i == steps - 1:
            print(f"  step {i:4d} loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return graphdef, params, frozen, losses, time.perf_counter() - start


def held_out_loss(graphdef, params, frozen, dataset, image: str) -> float:
    eval_loss = make_eval_loss(graphdef)
    total = count = 0.0
    rng = np.random.default_rng(0)
    for k in range(len(dataset)):
        batch = dataset[k]
        if image == "blank":
            batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], -1.0))
        elif image == "noise":
            noise = rng.uniform(-1, 1, batch["pixel_values"].shape).astype(np.float32)
            batch = dict(batch, pixel_values=noise)
        s, n = eval_loss(params, frozen, batch)
        total, count = total + float(s), count + float(n)
    return total / count


def score(truths: list[str], predictions: list[str]) -> dict[str, float]:
    """Exact match, and per true shape: named at its position with the right colour / shape / both;
    ``extra``: named positions that hold no shape, per caption."""
    exact = colour = shape = both = total = extra = 0
    for truth, pred in zip(truths, predictions, strict=True):
        want, got = parse_caption(truth), parse_caption(pred)
        exact += pred == truth
        extra += len(set(got) - set(want))
        for position, (c, s) in want.items():
            total += 1
            gc, gs = got.get(position, (None, None))
            colour += gc == c
            shape += gs == s
            both += (gc, gs) == (c, s)
    n = len(truths)
    return {
        "exact": exact / n,
        "colour": colour / total,
        "shape": shape / total,
        "both": both / total,
        "extra": extra / n,
    }


def caption_all(
    tok, graphdef, params, frozen, fmt, source, batch_size
) -> tuple[list[str], list[str], np.ndarray]:
    truths, preds, images = [], [], []
    data = caption_dataset(source, tok, fmt, batch_size=batch_size, train=False)
    for k in range(len(data)):
        batch = data[k]
        out = greedy_captions(
            graphdef,
            (params, frozen),
            fmt.prefix(tok),
            batch["pixel_values"],
            max_new_tokens=SEQ_LEN - len(fmt.prefix(tok)),
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
        for r in range(len(out)):
            row = out[r]
            end = np.flatnonzero(row == tok.eos_id)
            preds.append(tok.decode(row[: end[0]] if len(end) else row))
            truths.append(tok.decode(batch["targets"][r][batch["mask"][r].astype(bool)]))
        images.append(batch["pixel_values"])
    return truths, preds, np.concatenate(images)


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
    fig.suptitle("Held-out images, greedy captions of the 'aug' model", fontsize=10)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--held-out", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="aug,no-aug,blind", help="which runs, comma-separated")
    p.add_argument("--quick", action="store_true", help="a smoke test: few steps, small sets")
    p.add_argument("--out", default=None, help="results file (default results/18_vlm_shapes.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.held_out = 30, 64
    command = "python experiments/18_vlm_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    train_src = ShapesDataset(ShapesConfig(image_size=32, num_examples=args.train_images, seed=1000))
    tok = train_tokenizer(train_src)
    cfg = model_config(tok)
    fmt = CaptionFormat(image_token_id=cfg.image_token_id, image_tokens=cfg.image_tokens, seq_len=SEQ_LEN)
    held_src = ShapesDataset(ShapesConfig(image_size=32, num_examples=args.held_out, seed=2000))
    eval_bs = 64 if args.held_out % 64 == 0 else args.held_out
    held = caption_dataset(held_src, tok, fmt, batch_size=eval_bs, train=False)
    runs = {
        "aug": dict(augment=CaptionAugment(), blind=False),
        "no-aug": dict(augment=None, blind=False),
        "blind": dict(augment=CaptionAugment(), blind=True),
    }
    chosen = args.runs.split(",")
    if not chosen or any(name not in runs for name in chosen) or "aug" not in chosen:
        p.error(f"--runs={args.runs!r}: allowed are names from {sorted(runs)}, 'aug' among them")
    runs = {name: runs[name] for name in chosen}
    rows, examples = [], None
    for name, kw in runs.items():
        print(f"run {name}", flush=True)
        graphdef, params, frozen, losses, seconds = train(
            tok,
            cfg,
            fmt,
            train_src,
            steps=args.steps,
            batch_size=args.batch,
            lr=args.lr,
            seed=args.seed,
            **kw,
        )
        row = {"run": name, "seconds": seconds, "train_loss": float(np.mean(losses[-20:]))}
        for image in ("true", "blank", "noise"):
            row[f"loss_{image}"] = held_out_loss(graphdef, params, frozen, held, image)
        truths, preds, images = caption_all(tok, graphdef, params, frozen, fmt, held_src, eval_bs)
        row.update(score(truths, preds))
        mt, mp, _ = caption_all(tok, graphdef, params, frozen, fmt, Mirrored(held_src), eval_bs)
        row.update({f"mirror_{k}": v for k, v in score(mt, mp).items()})
        if name == "aug":
            examples = (images, truths, preds)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        rows.append(row)
    minutes = (time.perf_counter() - t0) / 60

    out = pathlib.Path(args.out) if args.out else HERE / "results" / "18_vlm_shapes.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_examples(png, *examples)
    images, truths, preds = examples
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(Llava(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    chance_colour, chance_shape = 1 / len(COLORS), 1 / len(SHAPES)
    loss_rows = "\n".join(
        f"| {r['run']} | {r['train_loss']:.3f} | {r['loss_true']:.3f} | {r['loss_blank']:.3f} | "
        f"{r['loss_noise']:.3f} | {r['seconds']:.0f} |"
        for r in rows
    )
    acc_rows = "\n".join(
        f"| {r['run']} | {r['exact']:.1%} | {r['colour']:.1%} | {r['shape']:.1%} | {r['both']:.1%} | "
        f"{r['extra']:.2f} | {r['mirror_exact']:.1%} | {r['mirror_both']:.1%} |"
        for r in rows
    )
    example_rows = "\n".join(
        f"| {i} | {t} | {p} | {'yes' if p == t else 'no'} |"
        for i, (t, p) in enumerate(zip(truths[:8], preds[:8], strict=True))
    )
    text = f"""# 18 A tiny VLM captions synthetic shapes

Command: `{command}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Data: `llmarch.data.shapes`, 32x32 images of 1-3 shapes ({len(COLORS)} colours x {len(SHAPES)} shapes)
in distinct slots of {len(POSITIONS)} (left, right, top, bottom), captions naming them in slot order.
Training: {args.train_images:,} images (seed 1000), {args.steps} steps of {args.batch} (each image seen
about {args.steps * args.batch / args.train_images:.1f} times); held out: {args.held_out} other images
(seed 2000). Rows of {SEQ_LEN}: BOS, {cfg.image_tokens} image placeholders, "Caption: ", caption, EOS;
byte-level BPE trained on 2,000 training captions ({tok.vocab_size} ids; placeholder id
{cfg.image_token_id}); loss on the caption and EOS only.

Model: SigLIP tower (32 px, patch 8, width 64, 2 blocks) -> 2-layer MLP projector -> llmarch decoder
(D=128, 2 blocks, 4 heads), {n_params:,} parameters, all trained from scratch (stage "all" of
`llmarch.vision.train`), AdamW at {args.lr:g} (warmup, cosine to 10%), clip 1.0, seed {args.seed}.
Runs: **aug** with train-time `CaptionAugment()` (mirror with left/right swapped in the caption, p=0.5;
rotation up to 5 degrees; pixel noise std 6/255), **no-aug** without, **blind** (control) trained on
blank images. Whole experiment {minutes:.1f} min, wall seconds include compiling and the load of other
jobs on this shared machine.

## Caption loss (mean nats per caption token, held-out unless marked)

| run | train (last 20 steps) | true images | blank images | noise images | train s |
|---|---|---|---|---|---|
{loss_rows}

The blind control's loss is what the captions' grammar and word statistics give without the image;
the gap between a model's true-image loss and it is what the image supplies. A model that reads the
image loses that gain when its images are blanked or replaced by noise.

## Greedy captions of held-out images

Per true shape: a shape named at its position with the right colour / shape / both (chance for a
guess at a named position: colour {chance_colour:.0%}, shape {chance_shape:.0%}, both
{chance_colour * chance_shape:.0%}). "extra": positions named per caption that hold no shape. The
mirrored columns score the held-out images mirrored left-right, against their mirrored captions.

| run | exact caption | colour | shape | colour+shape | extra | mirrored: exact | mirrored: colour+shape |
|---|---|---|---|---|---|---|---|
{acc_rows}

Examples (the aug model; images in `{png.name}`):

| # | truth | generated | exact |
|---|---|---|---|
{example_rows}
"""
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} and {png} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
