"""``llmarch export``: a checkpoint in a format other runtimes deploy.

``--format hf`` writes a Hugging Face directory (``llmarch.export.hf``), ``gguf`` one llama.cpp
file (``llmarch.export.gguf``), ``stablehlo`` the prefill and decode steps as serialized XLA
programs with their weights (``llmarch.export.stablehlo``), ``run`` a plain llmarch run (a LoRA
run's adapters merged into its base: ``llmarch.export.run``), ``peft`` a LoRA run's adapters as a
Hugging Face PEFT adapter directory (``llmarch.export.peft``). Each format's module is imported
only when asked for.
"""

from __future__ import annotations

import argparse
import json
import re

FORMATS = ("hf", "gguf", "stablehlo", "run", "peft")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """Bytes of a size such as ``5GB`` (10^9 bytes, as transformers counts), ``500MiB`` or ``1000``.

    Raises:
      ValueError: naming ``flag``, for anything else or a size under one byte.
    """
    match = _SIZE.fullmatch(text.strip())
    size = None if match is None else float(match[1]) * _UNITS[(match[2] or "").lower()]
    if size is None or size < 1:
        raise ValueError(f"{flag} {text!r} is invalid: give a size such as 5GB, 500MB, 2GiB or bytes")
    return int(size)


# Flags that belong to one format: given for another, they are an error rather than ignored.
_FORMAT_FLAGS = {
    "max_shard_size": ("--max-shard-size", "hf"),
    "fp8": ("--fp8", "hf"),
    "tokenizer_pre": ("--tokenizer-pre", "gguf"),
    "batch": ("--batch", "stablehlo"),
    "max_len": ("--max-len", "stablehlo"),
    "prefill_len": ("--prefill-len", "stablehlo"),
    "platforms": ("--platforms", "stablehlo"),
}


def _export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r} is unknown; allowed: {', '.join(FORMATS)}")
    for field, (flag, owner) in _FORMAT_FLAGS.items():
        if getattr(args, field) is not None and args.format != owner:
            raise ValueError(f"{flag} applies to --format {owner}, not {args.format}")
    if args.format == "hf":
        from llmarch.export.hf import export_hf

        size = parse_size(args.max_shard_size) if args.max_shard_size is not None else 5 * 10**9
        summary = export_hf(
            args.checkpoint, args.out, dtype=args.dtype, max_shard_bytes=size, fp8=bool(args.fp8)
        )
    elif args.format == "gguf":
        summary = _gguf(args)
    elif args.format == "run":
        from llmarch.export.run import export_run

        summary = export_run(args.checkpoint, args.out, dtype=args.dtype)
    elif args.format == "peft":
        from llmarch.export.peft import export_peft

        summary = export_peft(args.checkpoint, args.out, dtype=args.dtype)
    else:
        summary = _stablehlo(args)
    print(json.dumps(summary, indent=2))
    return 0


def _gguf(args: argparse.Namespace) -> dict:
    from llmarch.export.gguf import DTYPES, write_gguf
    from llmarch.inference.loading import load_for_inference

    dtype = args.dtype or "f32"
    if dtype not in DTYPES:  # before the weights are loaded
        raise ValueError(f"--dtype {dtype} is invalid for --format gguf; allowed: {', '.join(DTYPES)}")
    if not args.out.endswith(".gguf"):
        raise ValueError(f"--out {args.out} is invalid for --format gguf: give a FILE.gguf")
    model, cfg, tokenizer = load_for_inference(args.checkpoint)
    if tokenizer is None:
        raise ValueError(f"--checkpoint {args.checkpoint} has no tokenizer, which a GGUF file must hold")
    done = write_gguf(model, cfg, tokenizer, args.out, dtype=dtype, tokenizer_pre=args.tokenizer_pre)
    return {
        "format": "gguf",
        "source": args.checkpoint,
        "out": str(done.path),
        "architecture": done.architecture,
        "dtype": done.dtype,
        "tensors": len(done.tensor_types),
        "f16_fallbacks": list(done.fallbacks),
        "bytes": done.path.stat().st_size,
    }


def _stablehlo(args: argparse.Namespace) -> dict:
    from llmarch.export.stablehlo import export_stablehlo
    from llmarch.inference.loading import load_for_inference

    options = {
        name: getattr(args, name)
        for name in ("batch", "max_len", "prefill_len")
        if getattr(args, name) is not None
    }
    if args.platforms is not None:
        options["platforms"] = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    model, cfg, _ = load_for_inference(args.checkpoint, dtype=args.dtype)
    out = export_stablehlo(model, cfg, args.out, **options)
    files = sorted(p.name for p in out.iterdir())
    return {
        "format": "stablehlo",
        "source": args.checkpoint,
        "out": str(out),
        "dtype": cfg.dtype,
        "files": files,
        "bytes": sum((out / f).stat().st_size for f in files),
    }


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a checkpoint for other runtimes: Hugging Face, GGUF, StableHLO, a run (LoRA merged), "
        "a PEFT adapter (LoRA)",
    )
    export.add_argument(
        "--checkpoint",
        required=True,
        help="an llmarch run, a Hugging Face directory, or a Hub id org/name",
    )
    export.add_argument("--format", default="hf", help=f"{', '.join(FORMATS)} (default: hf)")
    export.add_argument(
        "--out",
        required=True,
        help="hf, stablehlo: a new or empty directory (or an earlier export); gguf: FILE.gguf; run, peft: a "
        "new or empty directory",
    )
    export.add_argument(
        "--dtype",
        help="hf, stablehlo, run, peft (the adapters): float32, bfloat16 or float16 (default: as stored); "
        "gguf: f32, f16 or q8_0",
    )
    export.add_argument(
        "--max-shard-size", help="hf: the largest weights file, e.g. 5GB (the default) or 500MB"
    )
    export.add_argument(
        "--fp8",
        action="store_true",
        default=None,  # None when absent: a format-specific flag (_FORMAT_FLAGS)
        help="hf: DeepSeek-V3's FP8 layout, the layers' linears as e4m3 with 128x128 weight_scale_inv blocks",
    )
    export.add_argument(
        "--tokenizer-pre",
        help="gguf: llama.cpp's name of a BPE tokenizer's pre-tokenizer, e.g. llama-bpe (GPT-2's is found)",
    )
    export.add_argument("--batch", type=int, help="stablehlo: rows per call (default 1)")
    export.add_argument(
        "--max-len", type=int, help="stablehlo: prompt + new tokens per row (default: the model's)"
    )
    export.add_argument("--prefill-len", type=int, help="stablehlo: the prompt buffer (default: --max-len)")
    export.add_argument("--platforms", help="stablehlo: cpu, cuda, rocm, tpu, comma-separated (default: cpu)")
    export.set_defaults(func=_export)
