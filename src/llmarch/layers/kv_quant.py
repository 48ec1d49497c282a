"""Quantized decoding caches: int8 and FP8 (e4m3) storage with one float32 scale per cached vector.

Every cached vector (one token's key or value of one KV head, ``[H]``; one token's MLA latent
``c_KV [A]`` or RoPE key ``k_R [R]``) is stored as ``q = x / scale`` in the storage dtype with
``scale = amax(|x|) / qmax`` (1 where the vector is all zeros): symmetric int8 (``qmax = 127``,
round half to even, clipped to [-127, 127]) or ``float8_e4m3fn`` (``qmax = 448``, its largest finite
value; the cast rounds to nearest even). Scales keep the vector axis with size 1
(``[..., 1]``), so ``dequantize`` is ``q * scale`` whatever the cache's layout. Quantizing on write
and dequantizing on read, per token, is what vLLM's and TensorRT-LLM's int8/FP8 KV caches do; the
per-token-per-head granularity needs no calibration, at ``4 / H`` bytes of scale per number.

``kv_cache_dtype`` names the choice (``EngineConfig.kv_cache_dtype``, ``Transformer.init_cache``):
"auto" (the model's compute dtype), "float32", "bfloat16", "int8", "fp8_e4m3". A cache is quantized
exactly when its storage dtype is int8 or float8_e4m3fn; float caches stay as they were.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8", "fp8_e4m3")
_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}
_QMAX = {np.dtype(jnp.int8): 127.0, np.dtype(jnp.float8_e4m3fn): 448.0}  # largest stored magnitude
SCALE_DTYPE = jnp.float32


def storage_dtype(kv_cache_dtype: Any, compute_dtype: Any, owner: str = "EngineConfig") -> np.dtype:
    """The dtype a cache stores, for a ``kv_cache_dtype`` name ("auto": ``compute_dtype``).

    A dtype object (or a dtype name such as "float16") that is a float or a quantized storage
    dtype is accepted as is, so callers that pass ``cfg.dtype`` keep working.

    Raises:
      ValueError: anything else, naming ``<owner>.kv_cache_dtype`` and the allowed names.
    """
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in _STORAGE:
        return np.dtype(_STORAGE[kv_cache_dtype])
    if kv_cache_dtype == "auto":
        return np.dtype(compute_dtype)
    try:
        dtype = jnp.dtype(kv_cache_dtype)
    except TypeError:
        dtype = None
    if dtype is not None and (jnp.issubdtype(dtype, jnp.floating) or dtype in _QMAX):
        return dtype
    raise ValueError(
        f"{owner + '.' if owner else ''}kv_cache_dtype={kv_cache_dtype!r} is invalid: must be one of "
        f"{list(KV_CACHE_DTYPES)} (or a float dtype)"
    )


def is_quantized(dtype: Any) -> bool:
    """Whether a cache stored in ``dtype`` carries scales (int8, float8_e4m3fn)."""
    return np.dtype(dtype) in _QMAX


def bytes_per_vector(dtype: Any, width: int) -> int:
    """Bytes one cached vector of ``width`` numbers takes in ``dtype``, its scale included."""
    dtype = np.dtype(dtype)
    return width * dtype.itemsize + (np.dtype(SCALE_DTYPE).itemsize if is_quantized(dtype) else 0)


def quantize(x: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``x [..., W]`` -> ``(q [..., W] in dtype, scale [..., 1] float32)`` per vector (module doc)."""
    dtype = np.dtype(dtype)
    qmax = _QMAX[dtype]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax == 0, 1.0, amax * np.float32(1 / qmax))  # XLA would make a/c into a·(1/c)
    # Clipping matters for both: x/scale can exceed qmax by a rounding error, and float8_e4m3fn
    # has no infinity (an overflowing cast gives NaN).
    y = jnp.clip(x / scale, -qmax, qmax)
    q = jnp.round(y).astype(dtype) if dtype == np.dtype(jnp.int8) else y.astype(dtype)
    return q, scale.astype(SCALE_DTYPE)


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """``q * scale`` in ``dtype`` (the product in float32)."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scales' shape for a cache of ``shape``: the vector axis kept with size 1."""
    return (*shape[:-1], 1)
