"""``llmarch export --format hf``: a checkpoint as a Hugging Face directory that transformers
(``AutoModelForCausalLM``, ``AutoTokenizer``, ``generate``), vLLM and llama.cpp's converter load.

The source is anything ``--checkpoint`` takes: an ``llmarch train`` run (or one that ``prune`` or
``distill`` wrote), a Hugging Face directory, or a Hub id ``org/name``. The directory gets
``config.json``, safetensors weights (sharded past a size), ``generation_config.json`` and the
tokenizer (``llmarch.hf.save_pretrained`` with the source's tokenizer, and the chat template a run
trained on chat data used). From a Hugging Face source
the tokenizer and generation files it has are carried over as they are, and its special token ids
in ``config.json``, so a round trip keeps how transformers tokenizes and generates; a file it lacks
is made from its ``tokenizer.json`` as for a run.

What Hugging Face cannot hold is refused before any weight is read: a quantized checkpoint, a
factorized one (``llmarch lowrank``), block kinds or features no architecture has. The directory
is written beside ``out`` first and moved into place when complete, so a failed export leaves no
half directory; ``out`` may be new, empty, or an earlier export, which is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from llmarch import hf, sources
from llmarch.data.tokenizer import TOKENIZER_FILE
from llmarch.hf.files import SHARD_PATTERN
from llmarch.hf.tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE
from llmarch.inference.loading import load_for_inference
from llmarch.json_config import read_json

# Files of a Hugging Face source that say how to tokenize and generate, copied as they are.
CARRIED_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    "chat_template.jinja",
    GENERATION_CONFIG_FILE,
)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
EXPORT_FILES = frozenset({hf.CONFIG_FILE, hf.WEIGHTS_FILE, hf.INDEX_FILE, *CARRIED_FILES})


def _is_export_file(path: Path) -> bool:
    return path.is_file() and (path.name in EXPORT_FILES or SHARD_PATTERN.fullmatch(path.name) is not None)


def check_out(out: str | os.PathLike, source_root: Path) -> Path:
    """``out`` as a path, if an export may be written there: absent, an empty directory, or a
    directory holding only what an export writes (an earlier export), and not the source itself.

    Raises:
      ValueError: naming ``out`` and what is in the way.
    """
    out = Path(out)
    if not str(out).strip():
        raise ValueError("--out '' is invalid: give a directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if out.resolve() == source_root.resolve():
            raise ValueError(f"--out {out} is the checkpoint being exported: choose another directory")
        foreign = sorted(p.name for p in out.iterdir() if not _is_export_file(p))
        if foreign:
            raise ValueError(
                f"--out {out} holds files an export does not write ({', '.join(foreign[:5])}): give a "
                "new or empty directory, or an earlier export to replace"
            )
    return out


def _stored_dtype(root: Path) -> str | None:
    """The dtype a Hugging Face checkpoint's ``config.json`` says its weights are stored in, when
    llmarch has it (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    config = read_json(root / hf.CONFIG_FILE)
    for field in ("dtype", "torch_dtype"):
        value = config.get(field)
        if isinstance(value, str):
            try:
                return hf.dtype_name(value)
            except ValueError:
                return None
    return None


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 10**9,
    fp8: bool = False,
) -> dict[str, Any]:
    """Writes ``checkpoint`` as the Hugging Face directory ``out``; returns a summary (source,
    architecture, dtype, files, bytes, whether a tokenizer was written).

    Args:
      checkpoint: an llmarch run, a Hugging Face directory, or a Hub id ``org/name``.
      out: the directory to write (new, empty, or an earlier export).
      dtype: the weights' dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``; None: as the source
        stores them (a run's parameter dtype; a Hugging Face checkpoint's ``dtype``).
      max_shard_bytes: the largest weights file; past it the weights are sharded with an index.
      fp8: write DeepSeek's published FP8 layout (``hf.save_pretrained(..., fp8=True)``): the layers'
        linears as e4m3 with 128×128 ``weight_scale_inv`` blocks, the rest in ``dtype``.

    Raises:
      FileNotFoundError: no such checkpoint (or Hub id that can be fetched).
      ValueError: a bad ``dtype`` or ``out``, a quantized or factorized source, or a model no
        Hugging Face architecture holds.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is invalid: must be a positive int")
    name = None if dtype is None else hf.dtype_name(dtype)
    src = sources.source(checkpoint, what="--checkpoint")  # Hub ids resolved; quantized refused
    from_hf = src.train is None
    if name is None and from_hf:
        name = _stored_dtype(src.root)
    cfg = src.cfg if name is None else src.cfg.replace(dtype=name, param_dtype=name)
    hf_config = hf.config_to_hf(cfg)  # refuses what no architecture holds, before any weight is read
    out = check_out(out, src.root)
    model, cfg, tokenizer = load_for_inference(src.root, dtype=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 would become out's mode
    try:
        hf.save_pretrained(
            model,
            cfg,
            staging,
            max_shard_bytes=max_shard_bytes,
            tokenizer=tokenizer,
            chat_template=_chat_template(src, tokenizer),
            fp8=fp8,
        )
        if from_hf:
            _carry_over(src.root, staging)
        if out.exists():
            for old in out.iterdir():  # check_out saw only an earlier export's files
                old.unlink()
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    return {
        "format": "hf",
        "source": str(src.root),
        "out": str(out),
        "architecture": hf_config["architectures"][0],
        "dtype": cfg.param_dtype,
        "fp8": fp8,
        "tokenizer": (out / TOKENIZER_FILE).is_file(),
        "files": files,
        "bytes": sum((out / f).stat().st_size for f in files),
    }


def _chat_template(src: sources.Source, tokenizer: Any) -> str | None:
    """The template a run trained on chat data (``data_format="chat"``) rendered its conversations
    with, so that transformers' ``apply_chat_template`` writes prompts as the model learned them."""
    train = src.train or {}
    if tokenizer is None or train.get("data_format") != "chat":
        return None
    from llmarch.data.chat import chat_template

    return chat_template(
        tokenizer, template=train.get("chat_template"), tokenizer_spec=train.get("tokenizer")
    ).source


def _carry_over(root: Path, out: Path) -> None:
    """Copies a Hugging Face source's tokenizer and generation files over the ones made from its
    tokenizer, and its special token ids into ``config.json``."""
    for name in CARRIED_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, out / name)
    source_config = read_json(root / hf.CONFIG_FILE)
    ids = {k: source_config[k] for k in TOKEN_ID_FIELDS if source_config.get(k) is not None}
    if ids:
        config = read_json(out / hf.CONFIG_FILE)
        config.update(ids)
        (out / hf.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
