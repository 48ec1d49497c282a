"""``x [M, K] @ W`` for llmarch's integer and FP8 weight formats on CPU: the C++ kernel
``quantized_matmul.cc`` (see its header for the algorithm), called through ``jax.ffi``.

It serves the rows of a decode step (``M <= MAX_ROWS``); ``llmarch.ops.quantized_matmul`` sends
larger M (prefill: compute-bound, where XLA's GEMM on a dequantized tile is the faster way), FP8
blocks that do not divide K and sharded programs to the XLA path. The specification is
``kernels_pallas.quantized_matmul``'s ``quantized_matmul_reference``; the tests compare the two
over every format.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_cpu.build import load

MAX_ROWS = 16  # kMaxRows in quantized_matmul.cc: accumulators for 16 rows fill a core's L1


def supports(m: int, *, bits: int, kind: str = "int", K: int = 0, group_size: int | None = None) -> bool:
    """Whether the kernel takes ``m`` rows of this format (and is built on this machine): integer
    weights of 8, 4 or 3 bits, or FP8 per channel or in blocks that divide K (the kernel's groups
    are equal)."""
    fp8 = kind == "fp8" and (group_size is None or K % group_size == 0)
    formats = fp8 or (kind == "int" and bits in (3, 4, 8))
    return formats and 0 < m <= MAX_ROWS and load() is not None


def quantized_matmul(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    bits: int,
    kind: str = "int",
    block: int | None = None,
) -> jax.Array:
    """``[M, N]`` in x's dtype: ``x [M, K]`` times the weight stored as ``q`` (``[K, N]`` 8-bit or
    float8_e4m3fn, ``[K/2, N]`` packed 4/3-bit), ``scale`` (``[G, N]``; FP8 in ``block`` x
    ``block`` tiles: ``[K/block, ceil(N/block)]``) and ``zero`` (None: symmetric), float32
    accumulation. ``M <= MAX_ROWS``; call ``supports`` first."""
    if load() is None:
        raise RuntimeError("the CPU kernels are unavailable; check kernels_cpu.build.unavailable()")
    M, K = x.shape
    N = q.shape[-1]
    if M > MAX_ROWS:
        raise ValueError(f"x has M={M} rows; the CPU kernel takes at most {MAX_ROWS}")
    zero_f = jnp.zeros((0, N), jnp.float32) if zero is None else zero.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    if kind == "fp8" and block is not None:  # square blocks: a scale per block of N, expanded
        scale = jnp.repeat(scale, block, axis=-1)[:, :N]
    call = jax.ffi.ffi_call(
        "llmarch_quantized_matmul",
        jax.ShapeDtypeStruct((M, N), jnp.float32),
        vmap_method="sequential",
    )
    y = call(
        x.astype(jnp.float32),
        q,
        scale,
        zero_f,
        bits=0 if kind == "fp8" else 8 if bits == 8 else 4,
        is_signed=zero is None,
    )
    return y.astype(x.dtype)
