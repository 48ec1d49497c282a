"""``x [M, K] @ w [K, N]`` in float32 with few rows (a decode step's weight products) on CPU: the
C++ kernel ``dense_matmul.cc`` (see its header for why and how), called through ``jax.ffi``.

``llmarch.layers.einsum.contract`` sends a plain weight contraction here when it has
``MIN_ROWS`` to ``MAX_ROWS`` rows (one row for a weight past the last-level cache's size),
float32 operands, an unsharded program and the CPU backend; everything else (prefill, training,
larger batches: compute-bound, where XLA's GEMM is the faster way) stays on ``jnp.dot``, which
is also the specification the tests compare against. Differentiable: the backward pass is XLA's
(``dx = g wᵀ``, ``dw = xᵀ g``), so a small forward under ``jax.grad`` works, though no training
step has so few rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_cpu.build import load

MAX_ROWS = 8  # kMaxRows in dense_matmul.cc: past 8 rows the product is compute-bound
# The fewest rows dispatch sends here, and the one-row exception. From 2 rows XLA runs a GEMM
# whose panels stream the weight slowly (the 56M Llama's decode forward: 1.49x faster with the
# kernel at 2 rows, 1.14x at 4). At one row XLA's matrix-vector product is as fast on the
# blocks' weights (0.7-1.06x of it: the kernel's bands and thread hand-off cost more than they
# gain on 0.5-3 MB), and slower on a weight far larger than the last-level cache, the LM head
# ([512, 32000]: 1.19x). experiments/26_cpu_weight_products.py measures both.
MIN_ROWS = 2
ONE_ROW_MIN_ELEMENTS = 2**23  # 32 MiB of float32: one row takes the kernel from this size


def supports(m: int, x_dtype, w_dtype, w_elements: int = 0) -> bool:
    """Whether dispatch sends ``m`` rows of these dtypes here: float32, ``MIN_ROWS <= m <=
    MAX_ROWS`` (or one row of a weight of at least ``ONE_ROW_MIN_ELEMENTS``), and the kernel
    built on this machine (``dense_matmul`` itself takes any 1 to ``MAX_ROWS`` rows)."""
    f32 = jnp.dtype(x_dtype) == jnp.float32 and jnp.dtype(w_dtype) == jnp.float32
    rows = MIN_ROWS <= m <= MAX_ROWS or (m == 1 and w_elements >= ONE_ROW_MIN_ELEMENTS)
    return f32 and rows and load() is not None


def _call(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(
        "llmarch_dense_matmul",
        jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
        vmap_method="sequential",
    )(x, w)


@jax.custom_vjp
def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``[M, N]`` float32: ``x [M, K] @ w [K, N]``, float32 accumulation, ``M <= MAX_ROWS``
    (call ``supports`` first)."""
    if load() is None:
        raise RuntimeError("the CPU kernels are unavailable; check kernels_cpu.build.unavailable()")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense_matmul: x {x.shape} and w {w.shape} must be [M, K] and [K, N]")
    if not 0 < x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x has M={x.shape[0]} rows; the CPU kernel takes 1 to {MAX_ROWS}")
    return _call(x, w)


def _forward(x, w):
    return dense_matmul(x, w), (x, w)


def _backward(saved, g):
    x, w = saved
    return g @ w.T, x.T @ g


dense_matmul.defvjp(_forward, _backward)
