"""The flags of the commands that train (``llmarch train``, ``llmarch distill``) and the
``TrainConfig`` they make: ``--config``, then the run's own stored settings when ``--out`` already
holds a run (so ``llmarch train --out RUN --steps N`` continues it), then the flags."""

from __future__ import annotations

import argparse
import pathlib

# `llmarch train` flags: (flag, TrainConfig field or "optimizer.<field>", type, help).
TRAIN_FLAGS = [
    ("--out", "out_dir", str, "output directory: checkpoints, metrics.jsonl, tensorboard/"),
    ("--preset", "preset", str, "model preset (see `llmarch presets`)"),
    ("--data", "data", str, "'default', a text file, a directory of texts, or a .jsonl file"),
    ("--text-field", "text_field", str, "the text field of JSONL records"),
    ("--tokenizer", "tokenizer", str, "'byte' or a tokenizer.json"),
    ("--steps", "steps", int, "training steps"),
    ("--seq-len", "seq_len", int, "tokens per row"),
    ("--batch-size", "batch_size", int, "global batch size in rows"),
    ("--seed", "seed", int, "seed of the model, data order and RNG"),
    ("--mesh", "mesh", str, "device mesh, e.g. data=2,fsdp=4"),
    ("--rules", "rules", str, "sharding rules preset: dp, fsdp, tp, fsdp_tp, ep, hybrid"),
    ("--precision", "precision", str, "float32, bf16, bf16-logits, pure-bf16"),
    ("--eval-every", "eval_every", int, "steps between evaluations"),
    ("--eval-batches", "eval_batches", int, "validation batches per evaluation"),
    ("--log-every", "log_every", int, "steps between metric records"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept"),
    ("--z-loss", "z_loss", float, "z-loss coefficient"),
    (
        "--loss-chunk",
        "loss_chunk",
        int,
        "vocabulary entries per step of the fused cross entropy (default 8192; null in --config: plain loss)",
    ),
    ("--nan-policy", "nan_policy", str, "skip or stop on a non-finite step"),
    (
        "--max-skipped-fraction",
        "max_skipped_fraction",
        float,
        "fail the run once more than this share of its steps were skipped (default 0.1)",
    ),
    (
        "--resume",
        "resume",
        str,
        "auto: continue from the newest checkpoint if any (default); must: fail "
        "without one; never: fail if one exists; fallback: set corrupted checkpoints aside and continue "
        "from the newest intact one",
    ),
    ("--val-fraction", "val_fraction", float, "held-out fraction of the corpus"),
    ("--peak-flops", "peak_flops", float, "peak FLOP/s per device for MFU"),
    (
        "--init-from",
        "init_from",
        str,
        "fine-tune: start from this run's or Hugging Face checkpoint's weights",
    ),
    (
        "--profile-steps",
        "profile_steps",
        str,
        "A:B: write a jax.profiler trace of steps A to B-1 to OUT/profile (TensorBoard, Perfetto)",
    ),
    ("--optimizer", "optimizer.name", str, "sgd, momentum, adagrad, adadelta, rmsprop, adam, adamw"),
    ("--lr", "optimizer.learning_rate", float, "peak learning rate"),
    ("--schedule", "optimizer.schedule", str, "constant or cosine"),
    ("--warmup-steps", "optimizer.warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "optimizer.weight_decay", float, "weight decay (none on norms and biases)"),
    ("--clip-norm", "optimizer.clip_norm", float, "global gradient-norm clip"),
    ("--grad-accum-steps", "optimizer.grad_accum_steps", int, "micro-steps per update"),
]


def train_config(args: argparse.Namespace, extra: dict | None = None):
    """The TrainConfig of ``--config`` and the flags; ``extra``: sections set by other flags (e.g.
    ``llmarch distill``'s ``distill``), merged into the file's."""
    from llmarch.json_config import read_json
    from llmarch.run_format import CONFIG_FILE
    from llmarch.train.config import TrainConfig

    data: dict = {}
    if args.config:
        path = pathlib.Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist")
        try:
            data = read_json(path)
        except ValueError as e:
            raise ValueError(f"--config {e}") from None
    stored = pathlib.Path(args.out_dir or data.get("out_dir") or "") / CONFIG_FILE
    if not args.config and args.out_dir and stored.is_file():
        # An existing run continues with its own settings; flags that differ still fail the resume.
        data = read_json(stored)
        if getattr(args, "preset", None) is not None:
            data["model"] = None  # the preset flag names the model: let the resume compare it
    for _, field, _, _ in TRAIN_FLAGS:
        value = getattr(args, field.replace(".", "_"))
        if value is None:
            continue
        if field.startswith("optimizer."):
            data.setdefault("optimizer", {})[field.split(".", 1)[1]] = value
        else:
            data[field] = value
    for key, section in (extra or {}).items():
        data[key] = {**(data.get(key) or {}), **section}
    if args.no_tensorboard:
        data["tensorboard"] = False
    if args.keep_sparsity is not None:
        data["keep_sparsity"] = args.keep_sparsity
    if data.get("init_from") and "tokenizer" not in data:  # the weights' own tokenizer
        from llmarch.sources import source

        data["tokenizer"] = source(data["init_from"], what="--init-from").tokenizer or "byte"
    if "out_dir" not in data:
        raise ValueError("an output directory is required: --out DIR (or out_dir in --config)")
    try:
        return TrainConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"--config {args.config}: {e}" if args.config else str(e)) from None


def add_train_switches(parser: argparse.ArgumentParser) -> None:
    """The boolean flags of ``llmarch train`` (and of the commands that train, e.g. distill)."""
    parser.add_argument("--no-tensorboard", action="store_true", help="write metrics.jsonl only")
    parser.add_argument(
        "--keep-sparsity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="zero weights stay zero (default: as the --init-from run says; on for `llmarch prune`'s)",
    )
