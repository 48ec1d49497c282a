"""A tiny LLaVA captioner of the synthetic shapes set, end to end: the recipe experiment 18 measures
and ``llmarch train --task shapes-captions`` runs.

The pieces, each usable alone:

* ``shapes_tokenizer``: byte-level BPE trained on the training captions, so every caption word is one
  token (``"a", " red", " circle", " on", " the", " left"``), the prompt a few;
* ``shapes_model_config``: SigLIP tower -> 2-layer projector -> llmarch decoder, all small;
* ``train_captioner``: AdamW (warmup, cosine), caption-only loss (``llmarch.vision.train``);
* ``caption_images`` and ``score_captions``: greedy captions of held-out images, parsed back into
  (position, colour, shape) and scored per true shape;
* ``run_shapes``: all of it, writing a checkpoint directory that ``llmarch generate`` serves:
  ``config.json`` + safetensors (Hugging Face's LLaVA layout, ``save_llava``), the tokenizer,
  ``metrics.jsonl`` and ``report.json`` (held-out loss and accuracies).

Rows are ``<image> x P``, ``"Caption: "``, the caption, EOS (``CaptionFormat(bos=False)``): a served
prompt written as text, ``"<image>Caption: "``, then reproduces the training prefix exactly (text
is text to the tokenizer, so the generate command swaps the ``<image>`` marker for the placeholders).

Why the images are 48 pixels with patches of 16, slots in the "thirds" layout (not 32 / 8, slots
on the quarters, where experiment 18 first ran): at 32 pixels a shape is 6-8 pixels across, a circle
of radius 3 differs from a square of half-side 3 by one pixel per quadrant, within the sizes' spread,
and each quarters slot sits on a corner of four patches, so its shape is cut in four and the central
patches each hold quarters of two shapes; shape words stayed at chance and the image pathway took
hundreds of steps to start. In the thirds layout at 48 / 16 each slot is one patch holding one
whole shape 10-13 pixels across, and 9 image tokens keep the decoder's rows short. Even so, a tower
64 wide learned colours in 200 steps and shapes not in 800 (loss stuck where only the shape word is
unknown), while with one colour it learned shapes in 150: reading a shape whatever its colour takes
a wider tower, and at 128 wide shapes are learned within 300 steps (lr 1e-3).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from llmarch.checks import check_int, check_number, fail
from llmarch.config import AttentionConfig, ModelConfig
from llmarch.data.image_text import CaptionAugment, CaptionFormat, caption_batches, caption_dataset
from llmarch.data.shapes import ShapesConfig, ShapesDataset, parse_caption
from llmarch.data.tokenizer import BPETokenizer
from llmarch.vision.config import VisionConfig
from llmarch.vision.llava import Llava, LlavaConfig
from llmarch.vision.llava_hf import save_llava
from llmarch.vision.train import greedy_captions, make_eval_loss, make_vlm_train_step, split_trainable

SEQ_LEN = 48  # rows: the image's placeholders, the prompt and the longest caption with its EOS
PROMPT_TOKENS, CAPTION_TOKENS = 3, 21  # "Caption: " and the longest caption (20 BPE ids) with EOS
BPE_VOCAB = 330
IMAGE_MARKER = "<image>"  # how a text prompt names the image (`llmarch generate --prompt`)
TRAIN_SEED, HELD_OUT_SEED = 1000, 2000  # the two ShapesDataset seeds: disjoint image sets
REPORT_FILE = "report.json"


def shapes_tokenizer(source: Any, n: int = 2000) -> BPETokenizer:
    """BPE of ``BPE_VOCAB`` ids trained on the first ``n`` captions of ``source`` and the prompt."""
    texts = [source[i]["caption"] for i in range(min(n, len(source)))]
    return BPETokenizer.train([*texts, *["Caption: "] * 50], BPE_VOCAB)


def shapes_data(num_examples: int, seed: int, image_size: int = 48) -> ShapesDataset:
    """The shapes set of the recipe: layout "thirds", half-extents 0.11-0.14 of the image."""
    cfg = ShapesConfig(
        image_size=image_size,
        num_examples=num_examples,
        seed=seed,
        layout="thirds",
        min_size=0.11,
        max_size=0.14,
        jitter=0.02,
    )
    return ShapesDataset(cfg)


def shapes_model_config(
    tokenizer: Any, *, image_size: int = 48, patch_size: int = 16, vision_width: int = 128, d_model: int = 128
) -> LlavaConfig:
    """The captioner: a 2-block SigLIP tower (``vision_width``), LLaVA's projector and a 2-block
    decoder (``d_model``, 4 heads); the placeholder is the first id past the tokenizer's."""
    vision = VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_layers=2,
        num_heads=4,
        use_head=False,
    )
    text = ModelConfig(
        vocab_size=-(-(tokenizer.vocab_size + 1) // 8) * 8,  # the tokenizer's ids and the placeholder
        d_model=d_model,
        num_layers=2,
        ffn_dim=3 * d_model,
        max_seq_len=SEQ_LEN,
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=d_model // 4),
    )
    return LlavaConfig(vision=vision, text=text, image_token_id=tokenizer.vocab_size, vision_feature_layer=-1)


def shapes_format(cfg: LlavaConfig) -> CaptionFormat:
    """Rows of ``SEQ_LEN``: the placeholders, the prompt, the caption and EOS (no BOS, see above)."""
    return CaptionFormat(
        image_token_id=cfg.image_token_id, image_tokens=cfg.image_tokens, seq_len=SEQ_LEN, bos=False
    )


@dataclasses.dataclass
class Trained:
    """A trained captioner: the split state ``(graphdef, params, frozen)``, per-step losses, seconds."""

    graphdef: nnx.GraphDef
    params: nnx.State
    frozen: nnx.State
    losses: list[float]
    seconds: float

    def model(self) -> Llava:
        return nnx.merge(self.graphdef, self.params, self.frozen)


def train_captioner(
    cfg: LlavaConfig,
    tokenizer: Any,
    source: Any,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
    seed: int = 0,
    augment: CaptionAugment | None = None,
    blind: bool = False,
    log: Callable[[int, float, float], None] | None = None,
) -> Trained:
    """Trains all of a fresh ``Llava(cfg)`` (seeded by ``seed``, as is the data order) on ``source``.

    ``augment``: the train-time ``CaptionAugment`` (None: none); ``blind``: every image blanked to
    the background (the control that can learn only the captions' grammar); ``warmup_steps``
    (None: a twentieth of ``steps``) then cosine decay to a tenth; ``log(step, loss, seconds)``.
    """
    check_int("", "steps", steps)
    # optax's cosine needs a step after the warmup: at most steps - 1 of them (0 for a 1-step run)
    warmup = min(max(steps // 20, 1), steps - 1) if warmup_steps is None else warmup_steps
    check_int("", "warmup_steps", warmup, low=0, high=steps - 1)
    model = Llava(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, frozen = split_trainable(model, "all")
    tx, step = _optimizer_and_step(graphdef, learning_rate, warmup, steps, weight_decay, clip_norm)
    opt_state = tx.init(params)
    batches = caption_batches(
        source,
        tokenizer,
        shapes_format(cfg),
        batch_size=batch_size,
        train=True,
        seed=seed,
        augment=augment if augment is not None else CaptionAugment(0.0, 0.0, 0.0),
        model_vocab_size=cfg.text.vocab_size,
    )
    start, losses = time.perf_counter(), []
    for i in range(steps):
        batch = next(batches)
        if blind:
            batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], -1.0))  # black
        params, opt_state, metrics = step(params, frozen, opt_state, batch)
        losses.append(float(metrics["loss"]))
        if log is not None:
            log(i, losses[-1], time.perf_counter() - start)
    return Trained(graphdef, params, frozen, losses, time.perf_counter() - start)


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(graphdef, learning_rate, warmup, steps, weight_decay, clip_norm):
    """One jitted step per model and schedule, so runs that differ only in seed, augmentation or
    images (experiment 18's) compile it once."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps, learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    return tx, make_vlm_train_step(graphdef, tx)


def held_out_loss(trained: Trained, dataset: Any, image: str = "true") -> float:
    """Mean caption-token loss over ``dataset``'s batches (``caption_dataset(train=False)``), with the
    true images, ``"blank"`` ones (background only) or uniform ``"noise"``."""
    eval_loss = make_eval_loss(trained.graphdef)
    total = count = 0.0
    rng = np.random.default_rng(0)
    for k in range(len(dataset)):
        batch = dataset[k]
        if image == "blank":
            batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], -1.0))
        elif image == "noise":
            noise = rng.uniform(-1, 1, batch["pixel_values"].shape).astype(np.float32)
            batch = dict(batch, pixel_values=noise)
        elif image != "true":
            fail("", "image", image, "must be 'true', 'blank' or 'noise'")
        s, n = eval_loss(trained.params, trained.frozen, batch)
        total, count = total + float(s), count + float(n)
    return total / count


def caption_images(
    trained: Trained, tokenizer: Any, source: Any, batch_size: int
) -> tuple[list[str], list[str], np.ndarray]:
    """``(true captions, greedy captions, pixel_values [N,C,H,W])`` of every record of ``source``
    (a last partial batch is left out: ``batch_size`` should divide ``len(source)``)."""
    cfg = trained.model().cfg
    fmt = shapes_format(cfg)
    prefix = fmt.prefix(tokenizer)
    truths, preds, images = [], [], []
    data = caption_dataset(source, tokenizer, fmt, batch_size=batch_size, train=False)
    for k in range(len(data)):
        batch = data[k]
        out = greedy_captions(
            trained.graphdef,
            (trained.params, trained.frozen),
            prefix,
            batch["pixel_values"],
            max_new_tokens=SEQ_LEN - len(prefix),
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
        for r in range(len(out)):
            end = np.flatnonzero(out[r] == tokenizer.eos_id)
            preds.append(tokenizer.decode(out[r][: end[0]] if len(end) else out[r]))
            truths.append(tokenizer.decode(batch["targets"][r][batch["mask"][r].astype(bool)]))
        images.append(batch["pixel_values"])
    return truths, preds, np.concatenate(images)


def score_captions(truths: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match of whole captions, and per true shape whether a shape is named at its position
    (``position``), with the right colour (``colour``), shape (``shape``) or both (``both``);
    ``extra``: named positions that hold no shape, per caption."""
    exact = position = colour = shape = both = total = extra = 0
    for truth, pred in zip(truths, predictions, strict=True):
        want, got = parse_caption(truth), parse_caption(pred)
        exact += pred == truth
        extra += len(set(got) - set(want))
        for where, (c, s) in want.items():
            total += 1
            position += where in got
            gc, gs = got.get(where, (None, None))
            colour += gc == c
            shape += gs == s
            both += (gc, gs) == (c, s)
    n, total = max(len(truths), 1), max(total, 1)
    return {
        "exact": exact / n,
        "position": position / total,
        "colour": colour / total,
        "shape": shape / total,
        "both": both / total,
        "extra": extra / n,
    }


@dataclasses.dataclass(frozen=True)
class ShapesRunConfig:
    """``run_shapes``'s settings (``llmarch train --task shapes-captions`` maps its flags onto them).

    Attributes:
      out_dir: the directory written; it must not hold a checkpoint already (no resume: a run
        takes minutes).
      steps, batch_size, learning_rate, warmup_steps, weight_decay, clip_norm, seed: the training.
      train_images, held_out: the sizes of the training and held-out shapes sets.
      augment: train with ``CaptionAugment()`` (mirror with left/right swapped, rotation, noise).
      log_every: steps between ``metrics.jsonl`` records.
      image_size, patch_size: the images and the tower's patches.
    """

    out_dir: str
    steps: int = 450
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    train_images: int = 20000
    held_out: int = 128
    augment: bool = True
    log_every: int = 50
    image_size: int = 48
    patch_size: int = 16

    def __post_init__(self):
        owner = "ShapesRunConfig"
        if not isinstance(self.out_dir, str) or not self.out_dir:
            fail(owner, "out_dir", self.out_dir, "must be a directory path")
        check_int(owner, "steps", self.steps)
        check_int(owner, "batch_size", self.batch_size)
        check_number(owner, "learning_rate", self.learning_rate, "must be > 0", lambda v: v > 0)
        if self.warmup_steps is not None:
            check_int(owner, "warmup_steps", self.warmup_steps, low=0, high=self.steps - 1)
        check_number(owner, "weight_decay", self.weight_decay, "must be >= 0", lambda v: v >= 0)
        check_number(owner, "clip_norm", self.clip_norm, "must be > 0", lambda v: v > 0)
        check_int(owner, "seed", self.seed, low=0, high=2**32 - 1)
        check_int(owner, "train_images", self.train_images, low=self.batch_size)
        check_int(owner, "held_out", self.held_out)
        if not isinstance(self.augment, bool):
            fail(owner, "augment", self.augment, "must be true or false")
        check_int(owner, "log_every", self.log_every)
        check_int(owner, "image_size", self.image_size, low=16)
        check_int(owner, "patch_size", self.patch_size)
        if self.image_size % self.patch_size:
            fail(owner, "patch_size", self.patch_size, f"must divide image_size={self.image_size}")
        tokens = (self.image_size // self.patch_size) ** 2
        if tokens + PROMPT_TOKENS + CAPTION_TOKENS > SEQ_LEN:
            fail(
                owner,
                "patch_size",
                self.patch_size,
                f"gives {tokens} image tokens at image_size={self.image_size}; rows of {SEQ_LEN} hold "
                f"at most {SEQ_LEN - PROMPT_TOKENS - CAPTION_TOKENS} beside the prompt and caption",
            )


def run_shapes(cfg: ShapesRunConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains the captioner of ``cfg`` and writes ``cfg.out_dir`` (see the module docstring); returns
    the report (``report.json``): held-out caption loss and ``score_captions``' accuracies."""
    out = pathlib.Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory")
    if (out / "config.json").exists():
        raise ValueError(f"--out {out} already holds a checkpoint (config.json): give a new directory")
    train_src = shapes_data(cfg.train_images, TRAIN_SEED, cfg.image_size)
    held_src = shapes_data(cfg.held_out, HELD_OUT_SEED, cfg.image_size)
    tok = shapes_tokenizer(train_src)
    model_cfg = shapes_model_config(tok, image_size=cfg.image_size, patch_size=cfg.patch_size)
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115  (closed below)

    def log(step: int, loss: float, seconds: float) -> None:
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            metrics.write(json.dumps({"step": step + 1, "loss": loss, "seconds": round(seconds, 2)}) + "\n")
            metrics.flush()
            progress(f"step {step + 1}/{cfg.steps} loss {loss:.4f} ({seconds:.0f}s)")

    try:
        trained = train_captioner(
            model_cfg,
            tok,
            train_src,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            clip_norm=cfg.clip_norm,
            seed=cfg.seed,
            augment=CaptionAugment() if cfg.augment else None,
            log=log,
        )
    finally:
        metrics.close()
    model = trained.model()
    save_llava(model, out)
    tok.save(out)
    names = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    (out / "tokenizer_config.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
    eval_bs = max(d for d in range(1, min(64, cfg.held_out) + 1) if cfg.held_out % d == 0)
    held = caption_dataset(held_src, tok, shapes_format(model_cfg), batch_size=eval_bs, train=False)
    truths, preds, _ = caption_images(trained, tok, held_src, eval_bs)
    report = {
        "steps": cfg.steps,
        "train_loss": float(np.mean(trained.losses[-20:])),
        "held_out_loss": held_out_loss(trained, held),
        **score_captions(truths, preds),
        "examples": [{"truth": t, "generated": p} for t, p in zip(truths[:4], preds[:4], strict=True)],
        "prompt": f"{IMAGE_MARKER}Caption: ",
        "config": dataclasses.asdict(cfg),
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
