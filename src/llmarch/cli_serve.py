"""The ``llmarch serve`` command: an OpenAI-compatible HTTP server over the inference engine.

    llmarch serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine options]

It loads the checkpoint as ``llmarch generate`` does, binds the port first (a port in use is a
one-line error before the model loads), and runs ``llmarch.serve.create_app`` under uvicorn.
SIGTERM drains: new requests get 503 and new connections are refused, the requests in flight
finish (``--drain-timeout`` seconds at most), then the command exits 0. Every ``EngineConfig``
field is an option (``--max-num-seqs``, ``--num-pages``, ``--page-size``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import socket
import sys

API_KEY_ENV = "LLMARCH_API_KEY"
_TYPES = {"int": int, "float": float, "str": str}


def _engine_fields():
    from llmarch.inference.engine_config import EngineConfig

    for f in dataclasses.fields(EngineConfig):
        base = str(f.type).replace("| None", "").replace("None |", "").strip()
        if base == "bool" or base in _TYPES:
            yield f, base


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "engine", "EngineConfig fields (llmarch.inference.EngineConfig documents each one)"
    )
    for f, base in _engine_fields():
        flag = "--" + f.name.replace("_", "-")
        text = f"EngineConfig.{f.name} (default: {f.default})"
        if base == "bool":
            group.add_argument(
                flag, dest=f"engine_{f.name}", action=argparse.BooleanOptionalAction, help=text
            )
        else:
            group.add_argument(
                flag, dest=f"engine_{f.name}", type=_TYPES[base], metavar=base.upper(), help=text
            )


def _engine_config(args: argparse.Namespace, cfg=None):
    """The EngineConfig the options give. With the model's ``cfg``, the token budgets that were
    not given are fitted to its ``max_seq_len`` (as ``llmarch generate`` does)."""
    from llmarch.inference.engine_config import EngineConfig

    given = {f.name: getattr(args, f"engine_{f.name}") for f, _ in _engine_fields()}
    given = {k: v for k, v in given.items() if v is not None}
    if cfg is not None:
        default = EngineConfig()
        budget = given.get("max_num_batched_tokens", min(default.max_num_batched_tokens, cfg.max_seq_len))
        given.setdefault("max_num_batched_tokens", budget)
        given.setdefault("max_prefill_chunk", min(default.max_prefill_chunk, budget))
        given.setdefault("max_num_seqs", min(default.max_num_seqs, budget))
    return EngineConfig(**given)


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is invalid: must be in [0, 65535] (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _generation_eos(path: str) -> tuple[int, ...]:
    """The ``eos_token_id`` (one or a list) of a checkpoint's ``generation_config.json``."""
    from pathlib import Path

    from llmarch.json_config import read_json

    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return ()
    value = read_json(file).get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


def _build_app(args: argparse.Namespace, limits, api_key: str | None):
    """Loads the checkpoint and builds the engine and the app."""
    from llmarch.data.tokenizer import load_tokenizer
    from llmarch.inference import Engine
    from llmarch.inference.loading import load_for_inference
    from llmarch.serve import ChatTemplate, create_app

    model, cfg, tokenizer = load_for_inference(args.checkpoint, dtype=args.dtype, vision=True)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    template = None
    if args.chat_template:
        if tokenizer is None:
            raise ValueError(
                f"--chat-template needs a tokenizer, and {args.checkpoint} has none: pass --tokenizer"
            )
        template = ChatTemplate.from_file(args.chat_template, tokenizer, args.checkpoint)
    elif tokenizer is not None:
        template = ChatTemplate.from_checkpoint(args.checkpoint, tokenizer)
    stops = (() if tokenizer is None else (tokenizer.eos_id,)) + _generation_eos(args.checkpoint)
    stops = tuple(i for i in dict.fromkeys(stops) if 0 <= i < cfg.vocab_size)
    engine = Engine(model, cfg, tokenizer=tokenizer, config=_engine_config(args, cfg))
    processing = None
    if engine.images is not None:  # a LLaVA checkpoint: its preprocessor_config.json, if any
        from llmarch.vision.preprocess import ImageProcessing

        root = pathlib.Path(args.checkpoint)
        processing = ImageProcessing.for_tower(engine.images.cfg.vision, root if root.is_dir() else None)
    return create_app(
        engine,
        model_name=args.served_model_name or args.checkpoint,
        api_key=api_key,
        limits=limits,
        chat_template=template,
        stop_token_ids=stops,
        drain_timeout=args.drain_timeout,
        image_processing=processing,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        from llmarch.serve import ServeLimits, run_server
    except ImportError as e:
        raise RuntimeError(
            f"{e}: `llmarch serve` needs the serve extra (pip install 'llmarch[serve]')"
        ) from None

    limits = ServeLimits(
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
    )
    if args.drain_timeout is not None and args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout {args.drain_timeout} is invalid: must be >= 0 seconds")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise ValueError(f"--api-key (or ${API_KEY_ENV}) is empty: give a key, or leave it unset")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name '' is invalid: give the name clients will use")
    _engine_config(args)  # a bad option fails before the model loads
    sock = _bind(args.host, args.port)
    try:
        app = _build_app(args, limits, api_key)
        host, port = sock.getsockname()[:2]
        server = app.state.server
        chat = "with" if server.chat_template is not None else "without"
        print(
            f"llmarch serve: serving {server.model_name!r} ({chat} a chat template) on http://{host}:{port}",
            file=sys.stderr,
            flush=True,
        )
        run_server(
            app, sock, log_level=getattr(args, "log_level", None) or "info", drain_timeout=args.drain_timeout
        )
    finally:
        sock.close()
    if server.worker.error is not None:
        raise RuntimeError(f"the engine failed while serving: {server.worker.error}")
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Adds ``serve`` to the ``llmarch`` command's subparsers."""
    serve = sub.add_parser(
        "serve", parents=[common], help="serve a checkpoint over an OpenAI-compatible HTTP API"
    )
    serve.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory of `llmarch train`, or config.json + *.safetensors (as `llmarch generate`)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})",
    )
    serve.add_argument(
        "--served-model-name", help="the model id clients use (default: the --checkpoint text)"
    )
    serve.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the checkpoint's)")
    serve.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a jinja2 chat template (default: the checkpoint's chat_template.jinja or tokenizer config)",
    )
    serve.add_argument(
        "--dtype",
        help="parameter and compute dtype, e.g. bfloat16 (default: as trained; float32 for Hugging Face)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=128, help="requests waiting for a first token (429 past it)"
    )
    serve.add_argument(
        "--max-prompt-tokens", type=int, help="prompt tokens per request (default: max_len - 1)"
    )
    serve.add_argument("--max-n", type=int, default=16, help="completions per prompt")
    serve.add_argument(
        "--max-body-bytes", type=int, default=2 * 2**20, help="request body size (413 past it)"
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM, seconds to let requests in flight finish before aborting them",
    )
    _add_engine_options(serve)
    serve.set_defaults(func=_serve)
