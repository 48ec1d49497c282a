"""StableHLO export of KV-cache decoding: the prefill and decode steps as serialized ``jax.export``
artifacts, the weights as safetensors, and a manifest, for XLA runtimes and ahead-of-time
deployment without llmarch.

The two steps are the ones ``llmarch.inference.generate`` compiles, as pure functions whose
weights are arguments, not constants baked into the program (so one artifact serves any weights
of the same shapes, and the program stays small):

- ``prefill(params, tokens [B,P] int32, lengths [B] int32, cache) -> (logits [B,V] f32, cache)``:
  row b's prompt is its first ``lengths[b]`` tokens (the rest is padding), the logits are those of
  its last prompt token. Padding writes cache slots past the prompt; attention is causal by slot
  position, and each later step overwrites its slot before reading it, so padding is never seen.
- ``decode(params, tokens [B] int32, positions [B] int32, cache) -> (logits [B,V] f32, cache)``.

``params`` and ``cache`` are flat dicts of named arrays: the model's ``nnx`` state and its
``init_cache`` pytree flattened (``manifest.json`` lists each name, shape and dtype). Shapes are
fixed at export (``batch``, ``prefill_len``, ``max_len``). Every op takes its XLA path
(``impl="xla"``), so the program has no Pallas or CPU-FFI custom calls and runs wherever it was
lowered: ``platforms`` (default ``("cpu",)``; ``("cpu", "cuda", "tpu")`` lowers for all three on a
CPU-only machine, the way DESIGN.md checks kernels, and one artifact then carries all three).

The directory: ``manifest.json``, ``weights.safetensors``, ``prefill.jax_export`` and
``decode.jax_export`` (``Exported.serialize()``: StableHLO bytecode plus calling convention,
read by ``jax.export.deserialize``), ``prefill.mlir`` and ``decode.mlir`` (the StableHLO text, for
runtimes outside JAX: its arguments are ``manifest["functions"][step]["mlir_arguments"]``), and
``stablehlo_loader.py``, the standalone loader (``load_stablehlo``), which imports no llmarch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from llmarch.config import ModelConfig
from llmarch.export import stablehlo_loader
from llmarch.export.stablehlo_loader import FORMAT, MANIFEST, VERSION, load_stablehlo
from llmarch.model import Transformer
from llmarch.quant.targets import is_quantized

__all__ = ["PLATFORMS", "export_stablehlo", "load_stablehlo"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
WEIGHTS = "weights.safetensors"
LOADER = "stablehlo_loader.py"


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (also FlattenedIndexKey)
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unexpected pytree key {key!r}")


def _named(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(names, leaves, treedef)`` of a pytree; a leaf's name is its path joined with "." (an
    ``nnx.Variable``'s own ``.value`` left out): ``runs.0.layers.attention.w_q_dnh.w``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = []
    for path, _ in flat:
        parts = [_key_name(k) for k in path]
        names.append(".".join(parts[:-1] if len(parts) > 1 and parts[-1] == "value" else parts))
    if len(set(names)) != len(names):  # a bug in the naming, not bad input
        raise AssertionError(f"pytree leaf names collide: {names}")
    return names, [leaf for _, leaf in flat], treedef


def _specs(names: list[str], leaves: list[Any]) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}
        for n, x in zip(names, leaves, strict=True)
    ]


def _with_xla_ops(model: Transformer) -> Transformer:
    """``model`` with every layer's ``impl`` set to ``"xla"``: new module objects over the same
    arrays (the model itself is left as it is)."""
    new = nnx.merge(*nnx.split(model))
    for _, node in nnx.iter_graph(new):
        if isinstance(node, nnx.Module) and hasattr(node, "impl"):
            node.impl = "xla"
    return new


def _check(model: Any, cfg: ModelConfig, batch: Any, max_len: Any, prefill_len: Any, platforms: Any) -> None:
    def positive_int(name: str, value: Any, most: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ValueError(f"{name}={value!r} is invalid: must be an int in [1, {most}]")

    if not isinstance(model, Transformer):
        raise ValueError(f"model={type(model).__name__} is not supported: allowed: an llmarch Transformer")
    if is_quantized(model):
        raise ValueError(
            "model is quantized (llmarch.quant): its matmuls may run CPU kernels that a portable "
            "StableHLO program cannot call; allowed: a float model"
        )
    positive_int("batch", batch, 2**20)
    positive_int("max_len", max_len, cfg.max_seq_len)
    positive_int("prefill_len", prefill_len, max_len)
    if (
        isinstance(platforms, str)
        or not isinstance(platforms, tuple | list)
        or not platforms
        or len(set(platforms)) != len(platforms)
        or any(p not in PLATFORMS for p in platforms)
    ):
        raise ValueError(f"platforms={platforms!r} is invalid: must be distinct names from {PLATFORMS}")


def export_stablehlo(
    model: Transformer,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    batch: int = 1,
    max_len: int | None = None,
    prefill_len: int | None = None,
    platforms: tuple[str, ...] = ("cpu",),
) -> Path:
    """Exports ``model``'s prefill and decode steps, its weights and a manifest to ``out_dir``.

    Args:
      model: a float ``Transformer`` (any block kinds); ``cfg``: its config.
      out_dir: the directory to write (made if missing; the export's files in it are replaced).
      batch: rows per call (B).
      max_len: cache slots, the longest prompt plus continuation (default ``cfg.max_seq_len``).
      prefill_len: the prompt buffer P; shorter prompts are padded (default ``max_len``).
      platforms: what to lower for, a subset of ``PLATFORMS``.
    Returns:
      ``out_dir`` as a Path; ``load_stablehlo(out_dir)`` runs it.
    Raises:
      ValueError: naming a shape or platform out of range, a quantized model, or ``cfg`` not
        being ``model.cfg``; before anything is traced or written.
    """
    max_len = cfg.max_seq_len if max_len is None else max_len
    prefill_len = max_len if prefill_len is None else prefill_len
    _check(model, cfg, batch, max_len, prefill_len, platforms)
    if model.cfg != cfg:
        raise ValueError(
            f"cfg does not describe model (cfg.name={cfg.name!r}, model.cfg.name={model.cfg.name!r})"
        )
    graphdef, state = nnx.split(_with_xla_ops(model))
    param_names, param_leaves, state_def = _named(state)
    cache_names, cache_leaves, cache_def = _named(model.init_cache(batch, max_len))

    def run(params, tokens, positions, cache, logits_at=None):
        m = nnx.merge(graphdef, jax.tree.unflatten(state_def, [params[n] for n in param_names]))
        cache = jax.tree.unflatten(cache_def, [cache[n] for n in cache_names])
        out = m(tokens, positions=positions, cache=cache, logits_at=logits_at)
        names, leaves, _ = _named(out.cache)
        if names != cache_names:  # the returned cache must be the one passed in, updated
            raise AssertionError(f"the model returned a cache of other arrays: {names} != {cache_names}")
        return out.logits[:, -1].astype(jnp.float32), dict(zip(names, leaves, strict=True))

    def prefill(params, tokens, lengths, cache):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return run(params, tokens, positions, cache, logits_at=(lengths - 1)[:, None])

    def decode(params, tokens, positions, cache):
        return run(params, tokens[:, None], positions[:, None], cache)

    ints = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params_spec = {
        n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in zip(param_names, param_leaves, strict=True)
    }
    cache_spec = {
        n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in zip(cache_names, cache_leaves, strict=True)
    }
    steps = {
        "prefill": (
            prefill,
            ("params", "tokens", "lengths", "cache"),
            jax.ShapeDtypeStruct((batch, prefill_len), jnp.int32),
        ),
        "decode": (decode, ("params", "tokens", "positions", "cache"), ints),
    }
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    functions = {}
    for name, (fn, inputs, tokens_spec) in steps.items():
        args = (params_spec, tokens_spec, ints, cache_spec)
        exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
        (root / f"{name}.jax_export").write_bytes(exported.serialize())
        (root / f"{name}.mlir").write_text(exported.mlir_module())
        flat = _flat_names(inputs, args)
        functions[name] = {
            "file": f"{name}.jax_export",
            "mlir": f"{name}.mlir",
            "inputs": list(inputs),
            "outputs": ["logits", "cache"],
            "tokens_shape": list(tokens_spec.shape),
            "logits_shape": [batch, cfg.vocab_size],
            "flat_inputs": flat,
            # the StableHLO main's arguments: a platform index first when lowered for several
            # platforms, then the inputs jax kept (it drops unused ones), in flat_inputs order
            "mlir_arguments": ["platform_index"] * (len(platforms) > 1)
            + [flat[i] for i in sorted(exported.module_kept_var_idx)],
            "flat_outputs": ["logits"] + [f"cache/{n}" for n in sorted(cache_names)],
        }
    save_file(
        {n: np.asarray(jax.device_get(x)) for n, x in zip(param_names, param_leaves, strict=True)},
        root / WEIGHTS,
    )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": cfg.name,
        "config": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "batch": batch,
        "prefill_len": prefill_len,
        "max_len": max_len,
        "platforms": list(platforms),
        "jax_version": jax.__version__,
        "weights": WEIGHTS,
        "params": _specs(param_names, param_leaves),
        "cache": _specs(cache_names, cache_leaves),
        "functions": functions,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(stablehlo_loader.__file__, root / LOADER)
    return root


def _flat_names(inputs: tuple[str, ...], args: tuple[Any, ...]) -> list[str]:
    """Each leaf of ``args`` in jax's flattening order (dict keys sorted), named ``params/<name>``,
    ``tokens``, ..., ``cache/<name>``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(dict(zip(inputs, args, strict=True)))
    order = {name: i for i, name in enumerate(inputs)}
    named = [("/".join(_key_name(k) for k in path), path) for path, _ in flat]
    # a dict of the inputs flattens them sorted by name; jax flattens the call's positional tuple
    named.sort(key=lambda item: (order[_key_name(item[1][0])], item[0]))
    return [n for n, _ in named]
