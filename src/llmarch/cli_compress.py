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

    if (args.preset is None) == (args.init_from is None):
        raise ValueError("give the student as exactly one of --student-preset P or --student SRC")
    section = {"teacher": args.teacher}
    for name in ("loss", "temperature", "alpha", "beta", "on_policy_fraction", "prompt_len"):
        if getattr(args, name) is not None:
            section[name] = getattr(args, name)
    if args.tokenizer is None and args.init_from is None:  # a fresh student reads the teacher's tokens
        args.tokenizer = source(args.teacher, what="--teacher").tokenizer
    result = train(train_config(args, {"distill": section}))
    print(json.dumps({"out": args.out_dir, "step": result.step, "val_loss": result.val_loss}))
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    from llmarch.cli_train import TRAIN_FLAGS, add_train_switches

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
        "distill", parents=[common], help="train a student on a teacher's distributions (KD, GKD)"
    )
    distill.add_argument("--teacher", required=True, help="an llmarch run or a Hugging Face directory")
    distill.add_argument("--student-preset", dest="preset", help="a fresh student of this preset")
    distill.add_argument("--student", dest="init_from", help="a student checkpoint (run or Hugging Face)")
    distill.add_argument("--loss", help="forward_kl (default), reverse_kl or jsd")
    distill.add_argument("--temperature", type=float, help="softens both distributions (default 1)")
    distill.add_argument(
        "--alpha", type=float, help="the divergence's weight against the labels' (default 1)"
    )
    distill.add_argument("--beta", type=float, help="JSD's beta (default 0.5)")
    distill.add_argument(
        "--on-policy-fraction", type=float, help="share of steps on student samples (GKD; default 0)"
    )
    distill.add_argument(
        "--prompt-len", type=int, help="prompt tokens of an on-policy sample (default: half a row)"
    )
    distill.add_argument("--config", help="a JSON file of TrainConfig fields; flags override it")
    for flag, field, kind, text in TRAIN_FLAGS:
        if field not in ("preset", "init_from"):
            distill.add_argument(flag, dest=field.replace(".", "_"), type=kind, help=text)
    add_train_switches(distill)
    distill.set_defaults(func=_distill)
