"""Quantized checkpoints on disk, and quantizing a checkpoint (``llmarch quantize``).

A quantized checkpoint is a directory::

  quant_config.json     {"format", "quant": QuantConfig, "model": ModelConfig, "source",
                        "tokenizer": "byte" | "tokenizer.json" | null, "train": the source run's
                        TrainConfig (its data and sequence length, for ``llmarch eval``) or null}
  model.safetensors     every variable of the quantized model by its path ("runs/0/layers/ffn/
                        w_up_df/q"): packed integers as uint8/int8, FP8 as its uint8 bits
                        (named in the file's metadata), scales and the float weights as stored
  tokenizer.json        the source's tokenizer file, when it had one

Loading builds the quantized model's structure from the two configs (an abstract float model,
its linears replaced by ``QuantizedEinsum`` of the right formats) and fills it from the file, so
nothing is quantized or initialized again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from llmarch.config import ModelConfig
from llmarch.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from llmarch.json_config import read_json
from llmarch.model import Transformer
from llmarch.quant.config import QuantConfig
from llmarch.quant.targets import is_quantized, linears
from llmarch.quant.tensor import QuantizedTensor, fp8, rtn

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
_FORMAT = 1
_FP8 = "float8_e4m3fn"


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def save_quantized(
    model: nnx.Module,
    cfg: ModelConfig,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    source: str | None = None,
    train: dict | None = None,
) -> Path:
    """Writes the quantized ``model`` (``quantize``'s result) to the directory ``out``.

    Args:
      tokenizer: "byte", or a tokenizer.json (copied into ``out``), or None.
      source: where the float model came from (recorded).
      train: the source run's TrainConfig as a dict (recorded for ``llmarch eval``).
    """
    if not is_quantized(model):
        raise ValueError("the model is not quantized: quantize it first (llmarch.quant.quantize)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, metadata = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = "/".join(map(str, path))
        value = np.asarray(jax.device_get(var.get_value()))
        if value.dtype == ml_dtypes.float8_e4m3fn:
            value, metadata[key] = value.view(np.uint8), _FP8
        arrays[key] = np.ascontiguousarray(value)
    save_file(arrays, str(out / WEIGHTS), metadata=metadata or None)
    tok = None
    if tokenizer is not None:
        tok = "byte" if str(tokenizer) == "byte" else TOKENIZER_FILE
        if tok == TOKENIZER_FILE:
            src = Path(tokenizer)
            src = src / TOKENIZER_FILE if src.is_dir() else src
            shutil.copyfile(src, out / TOKENIZER_FILE)
    record = {
        "format": _FORMAT,
        "quant": json.loads(model.quant_config.to_json()),
        "model": json.loads(cfg.to_json()),
        "source": source,
        "tokenizer": tok,
        "train": train,
    }
    (out / QUANT_CONFIG).write_text(json.dumps(record, indent=2))
    return out


def read_record(path: str | os.PathLike) -> tuple[dict, ModelConfig, QuantConfig]:
    """``(record, model config, quant config)`` of a quantized checkpoint's ``quant_config.json``."""
    file = Path(path) / QUANT_CONFIG
    record = read_json(file)
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{file} is not a quantized checkpoint of format {_FORMAT}")
    cfg = ModelConfig.from_dict(record["model"])
    qcfg = QuantConfig.from_json(json.dumps(record["quant"]), where=f"{file}: quant")
    return record, cfg, qcfg


def load_quantized(path: str | os.PathLike) -> tuple[nnx.Module, ModelConfig, Any]:
    """``(model, cfg, tokenizer or None)`` of a quantized checkpoint written by ``save_quantized``.

    Raises:
      ValueError: naming the file and the variable, for a missing or mismatching array.
    """
    root = Path(path)
    record, cfg, qcfg = read_record(root)
    abstract = nnx.eval_shape(lambda: _structure(cfg, qcfg))
    graphdef, state = nnx.split(abstract)
    file = root / WEIGHTS
    try:
        from safetensors import safe_open

        with safe_open(str(file), "numpy") as f:
            metadata = f.metadata() or {}
        arrays = load_file(str(file))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"cannot read {file}: {e}") from None
    flat = []
    for p, var in nnx.to_flat_state(state):
        key = "/".join(map(str, p))
        if key not in arrays:
            raise ValueError(
                f"{file} lacks the variable {key!r} that a {qcfg.method} model of its config has"
            )
        value = arrays.pop(key)
        if metadata.get(key) == _FP8:
            value = value.view(ml_dtypes.float8_e4m3fn)
        want = var.get_value()
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(
                f"{file}: {key!r} is {value.dtype}{list(value.shape)}, "
                f"expected {want.dtype}{list(want.shape)}"
            )
        flat.append((p, var.replace(jnp.asarray(value))))
    if arrays:
        raise ValueError(f"{file} has variables its config does not: {sorted(arrays)[:5]}")
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.quant_config = qcfg
    tok = record.get("tokenizer")
    tokenizer = None if tok is None else load_tokenizer("byte" if tok == "byte" else root / TOKENIZER_FILE)
    return model, cfg, tokenizer


def _structure(cfg: ModelConfig, qcfg: QuantConfig) -> Transformer:
    """A model of ``cfg`` whose linears are ``QuantizedEinsum`` in ``qcfg``'s formats (zeros)."""
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    for t in linears(model, cfg, qcfg):
        w = jnp.zeros((*t.value().shape[: t.lead], *t.layout.matrix_shape), jnp.float32)
        if qcfg.method == "fp8":
            q, scale = fp8(w, qcfg.fp8_block)
            qt = QuantizedTensor.from_unpacked(q, scale, None, 8, qcfg.fp8_block, kind="fp8")
        else:
            q, scale, zero = rtn(w, qcfg.bits, qcfg.group_size, qcfg.symmetric)
            qt = QuantizedTensor.from_unpacked(q, scale, zero, qcfg.bits, qcfg.group_size)
        t.install(
            QuantizedTensor(qt.q, qt.scale, qt.zero, qt.bits, qt.group_size, qt.kind, t.layout.matrix_shape)
        )
    return model


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of a checkpoint's weight files (safetensors) on disk."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
