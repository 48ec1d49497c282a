"""The ``llmarch`` command."""

from __future__ import annotations

import argparse
import dataclasses
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
    demo.set_defaults(func=_demo)
    listing = sub.add_parser("presets", help="list the presets with parameter and FLOP counts")
    listing.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # a bad option: say what, not where in the stack
        print(f"llmarch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
