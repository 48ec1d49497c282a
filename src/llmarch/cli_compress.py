"""The compression commands of ``llmarch``: ``prune``, ``lowrank`` and ``distill``.

Each writes a run directory like ``llmarch train``'s, so ``eval``, ``generate``, ``quantize`` and a
recovery ``llmarch train --out DIR --steps N`` (or ``--init-from DIR`` into a new run) take it as is.
"""

from __future__ import annotations

import argparse
import json


def _prune(args: argparse.Namespace) -> int:
    from llmarch.prune.config import PruneConfig
    from llmarch.prune.convert import prune_checkpoint

    if args.structured is not None:
        for flag, value, default in (("--pattern", args.pattern, None), ("--scope", args.scope, "layer")):
            if value != default:
                raise ValueError(f"{flag} {value} applies to unstructured pruning, not --structured")
    pcfg = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        scope=args.scope,
        include_lm_head=args.include_lm_head,
    )
    summary = prune_checkpoint(
        args.checkpoint,
        pcfg,
        args.out,
        structured=args.structured,
        criterion=args.criterion,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _lowrank(args: argparse.Namespace) -> int:
    from llmarch.lowrank.config import LowRankConfig
    from llmarch.lowrank.convert import lowrank_checkpoint

    if args.scaling is not None and not args.activation_aware:
        raise ValueError(f"--scaling {args.scaling} applies with --activation-aware only")
    lcfg = LowRankConfig(
        param_ratio=args.param_ratio,
        energy=args.energy,
        activation_aware=args.activation_aware,
        scaling=args.scaling or "whiten",
        include_lm_head=args.include_lm_head,
    )
    summary = lowrank_checkpoint(
        args.checkpoint,
        lcfg,
        args.out,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from llmarch.cli_train import train_config
    from llmarch.sources import source, train

    # The flags are TrainConfig's (llmarch.cli_train), stored under their field paths when given.
    preset, student = getattr(args, "preset", None), getattr(args, "init_from", None)
    if (preset is None) == (student is None):
        raise ValueError("give the student as exactly one of --student-preset P or --student SRC")
    teacher = getattr(args, "distill.teacher", None)
    if not hasattr(args, "tokenizer") and student is None and teacher:  # the teacher's tokens
        tokenizer = source(teacher, what="--teacher").tokenizer
        if tokenizer is not None:
            args.tokenizer = tokenizer
    cfg = train_config(args, {"distill": {}})  # --teacher (or distill.teacher in --config) is required
    result = train(cfg)
    print(json.dumps({"out": cfg.out_dir, "step": result.step, "val_loss": result.val_loss}))
    return 0


# DistillConfig fields that `llmarch distill` also takes by their own names (--teacher, --loss, ...).
DISTILL_SHORT = ("teacher", "loss", "temperature", "alpha", "beta", "on_policy_fraction", "prompt_len")


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    from llmarch.cli_config import HelpFormatter
    from llmarch.cli_train import add_train_flags

    prune = sub.add_parser(
        "prune", parents=[common], help="prune a checkpoint (magnitude, Wanda, SparseGPT; N:M; structured)"
    )
    prune.add_argument("--checkpoint", required=True, help="an llmarch run or a Hugging Face directory")
    prune.add_argument("--method", default="magnitude", help="magnitude, wanda or sparsegpt")
    prune.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="fraction of each weight (or of heads, channels, experts) removed",
    )
    prune.add_argument("--pattern", help="N:M semi-structured sparsity: 2:4 or 4:8")
    prune.add_argument(
        "--scope", default="layer", help="magnitude only: rank weights per 'layer' or 'global'"
    )
    prune.add_argument(
        "--structured", help="remove whole units, shrinking the model: heads, channels or experts"
    )
    prune.add_argument(
        "--criterion",
        default="auto",
        help="structured: auto, magnitude, activation (calibration data) or load (experts)",
    )
    prune.add_argument("--include-lm-head", action="store_true", help="also prune the untied LM head")
    prune.add_argument(
        "--calibration-data", help="a text corpus for wanda/sparsegpt (default: the run's data)"
    )
    prune.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences")
    prune.add_argument("--out", required=True, help="the pruned run's directory")
    prune.set_defaults(func=_prune)

    lowrank = sub.add_parser(
        "lowrank", parents=[common], help="factorize a checkpoint's linear weights (SVD, SVD-LLM, ASVD)"
    )
    lowrank.add_argument("--checkpoint", required=True, help="an llmarch run or a Hugging Face directory")
    rank = lowrank.add_mutually_exclusive_group(required=True)
    rank.add_argument("--param-ratio", type=float, help="share of each weight's parameters kept, in (0, 1]")
    rank.add_argument("--energy", type=float, help="share of each weight's squared singular values kept")
    lowrank.add_argument(
        "--activation-aware", action="store_true", help="SVD in the calibration activations' metric"
    )
    lowrank.add_argument("--scaling", help="activation-aware: whiten (SVD-LLM, default) or asvd")
    lowrank.add_argument("--include-lm-head", action="store_true", help="also factorize the untied LM head")
    lowrank.add_argument("--calibration-data", help="a text corpus (default: the run's data)")
    lowrank.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences")
    lowrank.add_argument("--out", required=True, help="the factorized run's directory")
    lowrank.set_defaults(func=_lowrank)

    distill = sub.add_parser(
        "distill",
        parents=[common],
        help="train a student on a teacher's distributions (KD, GKD)",
        usage="%(prog)s --teacher SRC (--student-preset P | --student SRC) [--FIELD VALUE ...]",
        description="The flags of `llmarch train`, the student named by --student-preset or --student, "
        "and the distill section's fields also by their short names (--teacher, --loss, --alpha, ...).",
        formatter_class=HelpFormatter,
    )
    add_train_flags(
        distill,
        names={"preset": ["--student-preset"], "init_from": ["--student"]},
        aliases={f"distill.{name}": ["--" + name.replace("_", "-")] for name in DISTILL_SHORT},
        helps={
            "preset": "a fresh student of this preset",
            "init_from": "a student checkpoint (run or Hugging Face)",
        },
    )
    distill.set_defaults(func=_distill)
