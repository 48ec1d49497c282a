"""``x [M, K] @ w [K, N]`` in float32 with few rows (a decode step's or a speculative
verification's weight products) on CPU: the C++ kernel ``dense_matmul.cc`` (see its header for why
and how), called through ``jax.ffi``.

``llmarch.layers.einsum.contract`` sends a plain weight contraction here when ``supports`` it:
float32 operands, an unsharded program, the CPU backend, and 1 to ``STREAM_ROWS`` rows (any
weight: the kernel streams it in row bands) or up to ``MAX_ROWS`` rows of a weight of at most
``TILED_MAX_BYTES`` (register tiles; a larger weight, an LM head, streams from memory as fast
through XLA's GEMM). Everything else (prefill, training: compute-bound at many rows, where XLA's
GEMM is the faster way) stays on ``jnp.dot``, which is also the specification the tests compare
against. Differentiable: the backward pass is XLA's (``dx = g wᵀ``, ``dw = xᵀ g``), so a small
forward under ``jax.grad`` works, though no training step has so few rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_cpu.build import load

STREAM_ROWS = 8  # kStreamRows in dense_matmul.cc: up to here, weight row bands
# One row included: a decode step streams every weight of the model, so even a block's small
# weight ([512, 512], 1 MB) comes from memory, not from cache, and the kernel's contiguous bands
# beat XLA's matrix-vector product there. The bench's batch-1 `Engine` decode of the 56M Llama
# ran 1.06-1.7x faster in tokens/s with every one-row product on the kernel than with only the
# LM head's (five interleaved pairs of runs, AMD EPYC Zen 5); experiments/26_cpu_weight_products.py
# times the decode forward both ways.
MAX_ROWS = 64  # kMaxRows: past STREAM_ROWS, register tiles of 8 rows x 32 columns
# Register tiles beat XLA's GEMM 1.1-4x at 9-64 rows on a block's weights ([256,768] to
# [1536,512]: experiment 10's verification, a batch-32 decode step) but only tie it from ~8 MB
# ([2048,1024]: experiment 07's UltraMem output product; a 65 MB LM head, where reading the
# weight from memory bounds both): such weights stay on XLA.
TILED_MAX_BYTES = 4 << 20


def supports(m: int, x_dtype, w_dtype, w_size: int = 0) -> bool:
    """Whether dispatch sends ``m`` rows of these dtypes, times a weight of ``w_size`` elements,
    here: float32, and ``1 <= m <= STREAM_ROWS``, or ``m <= MAX_ROWS`` with the weight at most
    ``TILED_MAX_BYTES``; and the kernel built on this machine."""
    f32 = jnp.dtype(x_dtype) == jnp.float32 and jnp.dtype(w_dtype) == jnp.float32
    rows = 1 <= m <= STREAM_ROWS or (m <= MAX_ROWS and 4 * w_size <= TILED_MAX_BYTES)
    return f32 and rows and load() is not None


def _call(x: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return jax.ffi.ffi_call(
        "llmarch_dense_matmul",
        tuple(jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32) for w in ws),
        vmap_method="sequential",
    )(x, *ws)


def _check(x: jax.Array, ws: tuple[jax.Array, ...]) -> None:
    if load() is None:
        raise RuntimeError("the CPU kernels are unavailable; check kernels_cpu.build.unavailable()")
    if not ws:
        raise ValueError("dense_matmuls: ws is empty; give at least one weight")
    shapes = [w.shape for w in ws]
    if x.ndim != 2 or any(len(s) != 2 or s[0] != x.shape[1] for s in shapes):
        raise ValueError(f"dense_matmul: x {x.shape} and w {shapes} must be [M, K] and [K, N]")
    if not 0 < x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x has M={x.shape[0]} rows; the CPU kernel takes 1 to {MAX_ROWS}")


def dense_matmuls(x: jax.Array, ws) -> tuple[jax.Array, ...]:
    """``tuple(x @ w for w in ws)``, float32, ``x [M, K]`` with ``M <= MAX_ROWS`` and each ``w``
    ``[K, N_i]``: one kernel call for all of them (products sharing an input: q, k and v; gate
    and up), each result the same bits as ``dense_matmul(x, w)`` (call ``supports`` first).
    Differentiable: the backward pass is XLA's (``dx = Σ g_i w_iᵀ``, ``dw_i = xᵀ g_i``)."""
    ws = tuple(ws)
    _check(x, ws)
    return _products(x, ws)


@jax.custom_vjp
def _products(x: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return _call(x, ws)


def _forward(x, ws):
    return _call(x, ws), (x, ws)


def _backward(saved, gs):
    x, ws = saved
    return sum(g @ w.T for g, w in zip(gs, ws, strict=True)), tuple(x.T @ g for g in gs)


_products.defvjp(_forward, _backward)


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``[M, N]`` float32: ``x [M, K] @ w [K, N]``, float32 accumulation, ``M <= MAX_ROWS``
    (call ``supports`` first)."""
    (y,) = dense_matmuls(x, (w,))
    return y
