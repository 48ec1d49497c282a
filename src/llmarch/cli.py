"""The ``llmarch`` command: each subcommand's flags, and one-line errors (exit 2 for a user's
mistake, 1 for a failed run) instead of tracebacks."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import traceback

from llmarch import accounting, logs, presets
from llmarch.cli_config import HelpFormatter, OneLineParser, add_flags, given, walk
from llmarch.cli_train import TRAIN_FLAGS, add_train_flags, start_distributed, train_config
from llmarch.demo_config import DemoConfig


def _demo(args: argparse.Namespace) -> int:
    from llmarch import demo

    demo.main(DemoConfig(**given(args, [f.path for f in walk(DemoConfig)[0]])))
    return 0


def _presets(args: argparse.Namespace) -> int:
    print(f"{'preset':<14} {'params':>16} {'train GFLOPs/token':>20}")
    for name in presets.names():
        cfg = presets.get(name)
        flops = accounting.train_flops_per_token(cfg, min(cfg.max_seq_len, 8192)) / 1e9
        print(f"{name:<14} {accounting.param_count(cfg):>16,} {flops:>20.3f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.task == "shapes-captions":  # a LLaVA captioner of the synthetic shapes set
        import jax

        if jax.process_count() > 1:  # every process would train alone and write the same --out
            raise ValueError("--task shapes-captions runs in one process: drop the multi-process settings")
        from llmarch.cli_train import shapes_run_config
        from llmarch.vision.captioning import run_shapes

        report = run_shapes(shapes_run_config(args), progress=lambda line: print(line, flush=True))
        keys = ("held_out_loss", "exact", "position", "colour", "shape", "both")
        print(json.dumps({k: round(report[k], 4) for k in keys}))
        return 0
    from llmarch.sources import train

    train(train_config(args))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from llmarch.evaluation import evaluate
    from llmarch.train.guard import TrainingError

    result = evaluate(
        args.checkpoint,
        data=args.data,
        batches=args.batches,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        bos=args.bos,
        progress=logs.show_progress(),  # not with -q
    )
    if not math.isfinite(result["loss"]):  # a broken model is not a result: no exit 0, no NaN "JSON"
        which = f"checkpoint step {result['step']} of " if "step" in result else ""
        raise TrainingError(
            f"{which}{args.checkpoint} gives a non-finite loss ({result['loss']}): its weights are broken"
        )
    print(json.dumps(result, indent=2))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from llmarch.quant.config import QuantConfig
    from llmarch.quant.convert import quantize_checkpoint

    group = None if args.group_size in (None, 0) else args.group_size
    if args.method == "fp8":
        qcfg = QuantConfig(method="fp8", fp8_block=group)
    else:
        qcfg = QuantConfig(
            method=args.method, bits=args.bits, group_size=group, symmetric=not args.asymmetric
        )
    summary = quantize_checkpoint(
        args.checkpoint,
        qcfg,
        args.out,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"token ids {text!r} must be integers separated by commas or spaces") from None


def _with_images(model, checkpoint: str, prompt, paths: list[str], tokenizer) -> tuple[list, list]:
    """``([prompt ids], [pixel_values])`` for ``generate --image``: the images read and normalized as
    the checkpoint's processor says, each single ``<image>`` placeholder expanded to its tokens."""
    import numpy as np

    from llmarch.inference.images import expand_placeholders
    from llmarch.vision.captioning import IMAGE_MARKER
    from llmarch.vision.llava import Llava
    from llmarch.vision.preprocess import ImageProcessing

    if not isinstance(model, Llava):
        raise ValueError(f"--image needs a vision-language (LLaVA) checkpoint; {checkpoint} is text-only")
    vcfg = model.cfg
    root = pathlib.Path(checkpoint)  # its preprocessor_config.json, when it has one
    process = ImageProcessing.for_tower(vcfg.vision, root if root.is_dir() else None)
    pixels = np.stack([process(p) for p in paths])
    if isinstance(prompt, str):  # text is text to the tokenizer: each IMAGE_MARKER is the id itself
        pieces = prompt.split(IMAGE_MARKER)
        ids = [
            t
            for k, piece in enumerate(pieces)
            for t in [vcfg.image_token_id] * (k > 0) + list(tokenizer.encode(piece))
        ]
    else:
        ids = prompt
    ids = expand_placeholders(list(ids), vcfg.image_token_id, vcfg.image_tokens, len(paths))
    return [ids], [pixels]


def _generate(args: argparse.Namespace) -> int:
    """Serves the prompts with the inference engine and prints each completion."""
    import time

    from llmarch.data.tokenizer import load_tokenizer
    from llmarch.inference import Engine, SamplingParams
    from llmarch.inference.loading import load_for_inference

    prompts: list = list(args.prompt or []) + [_ids(t) for t in args.prompt_ids or []]
    if not prompts:
        raise ValueError("give at least one --prompt TEXT or --prompt-ids IDS")
    if args.image and len(prompts) != 1:
        raise ValueError(f"--image goes with exactly one prompt; got {len(prompts)} prompts")
    model, cfg, tokenizer = load_for_inference(args.checkpoint, dtype=args.dtype, vision=True)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if args.prompt and tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer: pass --tokenizer, or --prompt-ids")
    images = None
    if args.image:
        prompts, images = _with_images(model, args.checkpoint, prompts[0], args.image, tokenizer)
    stop = tuple(_ids(args.stop_ids)) if args.stop_ids else ()
    if tokenizer is not None and not args.ignore_eos and tokenizer.eos_id < cfg.vocab_size:
        stop += (tokenizer.eos_id,)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop,
        n=args.n,
    )
    lengths = [len(tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    max_len = args.max_len or min(cfg.max_seq_len, max(lengths) + args.max_tokens)  # sizes the pool
    budget = min(args.max_num_batched_tokens, cfg.max_seq_len)
    engine = Engine(
        model,
        cfg,
        tokenizer=tokenizer,
        max_num_seqs=min(args.n * len(prompts), budget),
        max_num_batched_tokens=budget,
        max_prefill_chunk=min(budget, 256),
        max_len=max_len,
        enable_prefix_caching=not args.no_prefix_caching,
        mesh=args.mesh,
    )
    start = time.perf_counter()
    tokens = 0  # generated tokens, counted from what was printed
    if args.stream:
        single = len(prompts) == 1 and args.n == 1
        for event in engine.stream(prompts, params, images=images):
            tokens += 1
            piece = event.text if event.text is not None else f" {event.token_id}"
            print(
                piece if single else f"[{event.request_id}.{event.index}] {piece!r}",
                end="" if single else "\n",
                flush=True,
            )
        print()
    else:
        for out in engine.generate(prompts, params, images=images):
            for c in out.completions:
                tokens += len(c.token_ids)
                body = c.text if c.text is not None else " ".join(map(str, c.token_ids))
                print(f"[{out.request_id}.{c.index}] ({c.finish_reason}) {body}")
    seconds = time.perf_counter() - start
    stats = engine.stats
    cache = "prefix caching off"
    if stats["prefix_caching"]:
        cache = f"prefix cache hit rate {stats['prefix_cache_hit_rate']:.0%}"
    print(
        f"{tokens} tokens in {seconds:.2f}s ({stats['steps']} steps, {stats['preemptions']} preemptions, "
        f"{cache})",
        file=sys.stderr,
    )
    return 0


# jax's persistent compilation cache: a second run of the same shapes loads its compiled programs
# instead of compiling them again (`llmarch train --steps 5` twice: 17.4 s, then 6.4 s with it).
COMPILE_CACHE_ENV = "LLMARCH_COMPILE_CACHE"  # a directory, or "off"
_OFF = ("", "off", "0", "none", "false")


def compile_cache_dir(args: argparse.Namespace) -> pathlib.Path | None:
    """Where compiled programs are cached: ``--compile-cache DIR``, else ``$LLMARCH_COMPILE_CACHE``,
    else ``$XDG_CACHE_HOME/llmarch/jax`` (``~/.cache/llmarch/jax``); None when turned off by
    ``--no-compile-cache`` or ``LLMARCH_COMPILE_CACHE=off``."""
    chosen = getattr(args, "compile_cache", None)
    if chosen is False:  # --no-compile-cache
        return None
    if chosen is None:
        chosen = os.environ.get(COMPILE_CACHE_ENV)
        if chosen is not None and chosen.strip().lower() in _OFF:
            return None
    if chosen is None:
        home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path("~/.cache").expanduser()
        return pathlib.Path(home) / "llmarch" / "jax"
    if not str(chosen).strip():
        raise ValueError("--compile-cache '' is invalid: give a directory, or use --no-compile-cache")
    return pathlib.Path(chosen).expanduser()


def _use_compile_cache(directory: pathlib.Path | None, *, explicit: bool) -> None:
    """Points jax's persistent cache at ``directory`` (before anything compiles). A directory the
    user named must be usable (else ValueError); the default one is skipped with a warning."""
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        if explicit:
            raise ValueError(f"--compile-cache {str(directory)!r} is invalid: {e}") from None
        logging.getLogger("llmarch.cli").warning(f"compilation cache off ({e}); see --compile-cache")
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    # jax caches only programs that took >= 1 s to compile by default; a small model's train step
    # compiles in less on an accelerator, and every program counts toward a warm start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


DESCRIPTION = (
    "llmarch: train, evaluate, compress, export and serve the LLM architectures of the llmarch "
    "library (dense, GQA/MQA, MLA, MoE, memory layers), on one device or a mesh."
)
EPILOG = "Run `llmarch COMMAND --help` for a command's options; --debug shows the traceback of an error."


def version() -> str:
    """The installed distribution's version (a source tree that was never installed has none)."""
    try:
        return importlib.metadata.version("llmarch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback and library logs on an error",
    )
    common.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default=argparse.SUPPRESS,
        help="the llmarch messages shown on stderr (default: info; overrides -v/-q)",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="show debug messages"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="show warnings and errors only (-qq: errors only); a command's output still goes to stdout",
    )
    cache = common.add_mutually_exclusive_group()
    cache.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"cache compiled programs here (default: ${COMPILE_CACHE_ENV}, else ~/.cache/llmarch/jax)",
    )
    cache.add_argument(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_false",
        default=argparse.SUPPRESS,
        help="compile everything anew (also: LLMARCH_COMPILE_CACHE=off)",
    )
    # One-line errors (`llmarch train: error: ...`, exit 2) for every command: subparsers share the class.
    parser = OneLineParser(prog="llmarch", description=DESCRIPTION, epilog=EPILOG, parents=[common])
    parser.add_argument("--version", action="version", version=f"llmarch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train dense, MoE, UltraMem and MLA tiny models side by side and compare them",
        description="Train tiny dense, MoE, UltraMem and MLA decoders (--models) on the embedded corpus "
        "with the same data and steps, and print one table: parameters, activated parameters and "
        "KV-cache bytes per token, validation loss, decode tokens/s through the Engine; the table "
        "and the loss curves are written to OUT/demo.md and OUT/demo.png. --quick: train one model "
        "(--preset), print its losses and sample text from it.",
        formatter_class=HelpFormatter,
    )
    # The same names as train's (--out, --lr) and generate's (--max-tokens) for the same things.
    add_flags(
        demo,
        DemoConfig,
        aliases={"out_dir": ["--out"], "learning_rate": ["--lr"], "sample_tokens": ["--max-tokens"]},
        helps={
            **{field: text for _, field, _, text in TRAIN_FLAGS if "." not in field},  # the same words
            "out_dir": "keep the runs (checkpoints, metrics), demo.md and demo.png here; null: a "
            "temporary directory",
            "learning_rate": "peak learning rate",
            "sample_tokens": "--quick: tokens sampled after training",
            "preset": "--quick's model (see `llmarch presets`)",
        },
        choices={
            (DemoConfig, field): [n for n in presets.names() if n.startswith("tiny-")]
            for field in ("preset", "models")
        },
    )
    demo.set_defaults(func=_demo)
    train = sub.add_parser(
        "train",
        parents=[common],
        help="train a model; resumes from the latest checkpoint in --out",
        usage="%(prog)s [--config FILE] [--out DIR] [--FIELD VALUE ...] [--model.FIELD VALUE ...]",
        description="Every TrainConfig field is a flag, nested ones by their dotted path "
        "(--model.d-model 512, --optimizer.nesterov true); values are read as YAML. Precedence: "
        "--config < the stored settings of a run in --out (without --config) < flags.",
        formatter_class=HelpFormatter,
    )
    add_train_flags(train)
    train.add_argument(
        "--task",
        choices=("text", "shapes-captions"),
        default="text",
        help="text: a language model on --data; shapes-captions: a tiny LLaVA captioner of the "
        "synthetic shapes images (llmarch.vision.captioning; takes --out, --steps, --batch-size, --seed, "
        "--lr, --warmup-steps, --weight-decay, --clip-norm, --log-every), served by `llmarch generate "
        "--checkpoint OUT --image FILE --prompt '<image>Caption: '`",
    )
    train.set_defaults(func=_train)
    evaluate = sub.add_parser(
        "eval",
        parents=[common],
        help="loss (nats/token), perplexity and bits per byte of a checkpoint on a corpus",
    )
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        help="an llmarch run, a Hugging Face directory or Hub id (org/name), or a quantized checkpoint",
    )
    evaluate.add_argument(
        "--data", help="a text file, directory of texts or .jsonl file (default: the run's validation split)"
    )
    evaluate.add_argument("--batches", type=int, default=16, help="batches to evaluate (from the start)")
    evaluate.add_argument("--batch-size", type=int, help="rows per batch (default: the run's, else 8)")
    evaluate.add_argument("--seq-len", type=int, help="tokens per row (default: the run's, else up to 512)")
    evaluate.add_argument("--tokenizer", help="'byte' or a tokenizer.json to read --data with")
    evaluate.add_argument("--text-field", help="the text field of JSONL records (default: text)")
    evaluate.add_argument(
        "--bos", action="store_true", help="start every document of --data with BOS (Llama-style checkpoints)"
    )
    evaluate.set_defaults(func=_eval)
    quant = sub.add_parser(
        "quantize", parents=[common], help="quantize a checkpoint's linear weights (RTN, GPTQ, AWQ, FP8)"
    )
    quant.add_argument("--checkpoint", required=True, help="an llmarch run or a Hugging Face directory")
    quant.add_argument("--method", required=True, help="rtn, gptq, awq or fp8")
    quant.add_argument("--bits", type=int, default=8, help="8, 4 or 3 (integer methods)")
    quant.add_argument(
        "--group-size",
        type=int,
        help="input rows per scale: 32, 64 or 128 (default: per channel); fp8: block",
    )
    quant.add_argument("--asymmetric", action="store_true", help="zero points (integer methods)")
    quant.add_argument("--calibration-data", help="a text corpus for gptq/awq (default: the run's data)")
    quant.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences")
    quant.add_argument("--out", required=True, help="the quantized checkpoint's directory")
    quant.set_defaults(func=_quantize)
    listing = sub.add_parser(
        "presets", parents=[common], help="list the presets with parameter and FLOP counts"
    )
    listing.set_defaults(func=_presets)
    gen = sub.add_parser(
        "generate", parents=[common], help="generate from an llmarch run or a Hugging Face checkpoint"
    )
    gen.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory of `llmarch train`, or config.json + *.safetensors",
    )
    gen.add_argument("--prompt", action="append", help="a text prompt (repeat for several)")
    gen.add_argument("--prompt-ids", action="append", help="a prompt as token ids, e.g. 1,2,3")
    gen.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the checkpoint's)")
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens per completion")
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: off")
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt (sharing its cache pages)")
    gen.add_argument("--stop-ids", help="token ids that end a completion, e.g. 2,13")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    gen.add_argument(
        "--dtype",
        help="parameter and compute dtype, e.g. bfloat16 (default: as trained; "
        "float32 for Hugging Face checkpoints)",
    )
    gen.add_argument("--max-len", type=int, help="prompt + new tokens per sequence (default: the model's)")
    gen.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens per engine step")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument(
        "--image",
        action="append",
        help="an image file for a LLaVA checkpoint's prompt (repeat for several, in order); the prompt "
        "holds one <image> placeholder per image",
    )
    gen.add_argument("--mesh", help="devices to split the model over, e.g. tensor=2 (default: one device)")
    gen.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt in full (default: reuse the cached pages of a shared prefix)",
    )
    gen.set_defaults(func=_generate)
    from llmarch import cli_compress

    cli_compress.add_parsers(sub, common)
    from llmarch import cli_serve

    cli_serve.add_parsers(sub, common)
    from llmarch import cli_export

    cli_export.add_parsers(sub, common)
    from llmarch import cli_plot

    cli_plot.add_parsers(sub, common)
    from llmarch import cli_plan

    cli_plan.add_parsers(sub, common)
    return parser


# Libraries that log their own view of an error we report in one line (orbax and tensorstore
# through absl, asyncio's "exception was never retrieved").
_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "jax", "tensorstore")


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user error (a bad option, file or checkpoint) prints one line and
    returns 2; a run that fails (diverged, interrupted, locked) prints one line and returns 1,
    or 128 + the signal number when a signal stopped it; ``--debug`` shows the traceback."""
    from llmarch.train.guard import TrainingError, TrainingInterrupted

    args = build_parser().parse_args(argv)
    if getattr(args, "checkpoint", None) == "":
        return _fail(args, "--checkpoint '' is invalid: give a directory", 2, False)
    debug = getattr(args, "debug", False)
    if not debug:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # After an error is reported, orbax's background threads and coroutines die noisily
        # ("Event loop is closed"); the one-line error already says what happened.
        threading.excepthook = lambda hook_args: None
        sys.unraisablehook = lambda hook_args: None
    level = logs.level(
        name=getattr(args, "log_level", None),
        verbose=getattr(args, "verbose", 0),
        quiet=getattr(args, "quiet", 0),
    )
    restore_logging = logs.configure(level)  # the library's messages, on stderr from process 0
    try:
        _use_compile_cache(
            compile_cache_dir(args), explicit=isinstance(getattr(args, "compile_cache", None), str)
        )
        start_distributed(args)  # `train`/`distill` across processes: before anything starts jax
        return args.func(args)
    except TrainingInterrupted as e:
        return _fail(args, e, 128 + e.signum, debug)
    except KeyboardInterrupt as e:
        return _fail(args, e if str(e) else "interrupted", 128 + getattr(e, "signum", signal.SIGINT), debug)
    except (ValueError, OSError) as e:  # a bad option, file or checkpoint: say what, not where
        return _fail(args, e, 2, debug)
    except (TrainingError, RuntimeError) as e:  # the run failed; its message says why
        return _fail(args, e, 1, debug)
    finally:
        restore_logging()


def _fail(args: argparse.Namespace, error: BaseException | str, code: int, debug: bool) -> int:
    if debug and isinstance(error, BaseException):
        traceback.print_exception(error)
    message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever it held
    print(f"llmarch {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
