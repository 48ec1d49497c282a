"""The ``llmarch`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from llmarch import accounting, presets


def _demo(args: argparse.Namespace) -> int:
    from llmarch import demo

    fields = {f.name for f in dataclasses.fields(demo.DemoConfig)}
    cfg = demo.DemoConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    demo.run(cfg)
    return 0


def _presets(args: argparse.Namespace) -> int:
    print(f"{'preset':<14} {'params':>16} {'train GFLOPs/token':>20}")
    for name in presets.names():
        cfg = presets.get(name)
        flops = accounting.train_flops_per_token(cfg, min(cfg.max_seq_len, 8192)) / 1e9
        print(f"{name:<14} {accounting.param_count(cfg):>16,} {flops:>20.3f}")
    return 0


# `llmarch train` flags: (flag, TrainConfig field or "optimizer.<field>", type, help).
_TRAIN_FLAGS = [
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
    ("--nan-policy", "nan_policy", str, "skip or stop on a non-finite step"),
    ("--val-fraction", "val_fraction", float, "held-out fraction of the corpus"),
    ("--peak-flops", "peak_flops", float, "peak FLOP/s per device for MFU"),
    ("--optimizer", "optimizer.name", str, "sgd, momentum, adagrad, adadelta, rmsprop, adam, adamw"),
    ("--lr", "optimizer.learning_rate", float, "peak learning rate"),
    ("--schedule", "optimizer.schedule", str, "constant or cosine"),
    ("--warmup-steps", "optimizer.warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "optimizer.weight_decay", float, "weight decay (none on norms and biases)"),
    ("--clip-norm", "optimizer.clip_norm", float, "global gradient-norm clip"),
    ("--grad-accum-steps", "optimizer.grad_accum_steps", int, "micro-steps per update"),
]


def _train_config(args: argparse.Namespace):
    from llmarch.train.trainer import TrainConfig

    data: dict = {}
    if args.config:
        path = pathlib.Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path} is not valid JSON: {e}") from None
    for _, field, _, _ in _TRAIN_FLAGS:
        value = getattr(args, field.replace(".", "_"))
        if value is None:
            continue
        if field.startswith("optimizer."):
            data.setdefault("optimizer", {})[field.split(".", 1)[1]] = value
        else:
            data[field] = value
    if args.no_tensorboard:
        data["tensorboard"] = False
    if "out_dir" not in data:
        raise ValueError("an output directory is required: --out DIR (or out_dir in --config)")
    return TrainConfig.from_dict(data)


def _train(args: argparse.Namespace) -> int:
    from llmarch.train.trainer import train

    train(_train_config(args))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from llmarch.train.evaluate import evaluate_run

    result = evaluate_run(args.checkpoint, data=args.data, batches=args.batches)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmarch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny model on the embedded corpus and sample from it")
    demo.add_argument("--preset", choices=[n for n in presets.names() if n.startswith("tiny-")])
    demo.add_argument("--steps", type=int)
    demo.add_argument("--batch-size", type=int)
    demo.add_argument("--seq-len", type=int)
    demo.add_argument("--learning-rate", type=float)
    demo.add_argument("--seed", type=int)
    demo.add_argument("--sample-tokens", type=int)
    demo.add_argument("--prompt")
    demo.add_argument("--out-dir", help="keep the run (checkpoints, metrics) here; default: a temp dir")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a model; resumes from the latest checkpoint in --out")
    train.add_argument("--config", help="a JSON file of TrainConfig fields; flags override it")
    for flag, field, kind, text in _TRAIN_FLAGS:
        train.add_argument(flag, dest=field.replace(".", "_"), type=kind, help=text)
    train.add_argument("--no-tensorboard", action="store_true", help="write metrics.jsonl only")
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("eval", help="evaluate a run's latest checkpoint on held-out data")
    evaluate.add_argument("--checkpoint", required=True, help="a run directory written by `llmarch train`")
    evaluate.add_argument("--data", help="evaluate on this corpus instead of the run's validation split")
    evaluate.add_argument("--batches", type=int, default=16, help="batches to evaluate")
    evaluate.set_defaults(func=_eval)
    listing = sub.add_parser("presets", help="list the presets with parameter and FLOP counts")
    listing.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # a bad option: say what, not where in the stack
        print(f"llmarch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
