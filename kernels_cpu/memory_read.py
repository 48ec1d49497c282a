"""The memory layers' value read (PKM, and UltraMem's IVE blocks and MCS cores) on CPU: the C++
kernel ``memory_read.cc`` (see its header for why and how), called through ``jax.ffi``.

``llmarch.layers.memory_lookup.read_values`` takes it on the CPU backend, unsharded, for a float32
table and weights, when built; its specification is that module's XLA ``gather_weighted_sum``,
whose backward pass (a scatter-add into the picked rows) the kernel's forward shares.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_cpu.build import load


def supports(table_dtype, weights_dtype) -> bool:
    """Whether a read of these dtypes runs here: float32 table and weights, the kernel built."""
    f32 = jnp.dtype(table_dtype) == jnp.float32 and jnp.dtype(weights_dtype) == jnp.float32
    return f32 and load() is not None


def memory_read(
    table: jax.Array, rows: jax.Array, weights: jax.Array, blocks: jax.Array | None, num_blocks: int
) -> jax.Array:
    """``[B,W,U]`` float32: chunk ``c`` of ``out[b,w]`` is ``Σ_{j in block w} weights[b,j,c] ·
    table[rows[b,j], chunk c]`` (``table [M,U]``, ``rows, blocks [B,J]``, ``weights [B,J,X]``;
    ``blocks`` None when ``num_blocks == 1``). Forward only: differentiate through
    ``llmarch.layers.memory_lookup.gather_weighted_sum``."""
    if load() is None:
        raise RuntimeError("the CPU kernels are unavailable; check kernels_cpu.build.unavailable()")
    shapes_ok = table.ndim == 2 and rows.ndim == 2 and weights.ndim == 3 and weights.shape[-1] > 0
    if shapes_ok:
        U, (B, J), X = table.shape[1], rows.shape, weights.shape[-1]
        shapes_ok = weights.shape == (B, J, X) and U % X == 0
    if not shapes_ok or num_blocks < 1 or (blocks is None and num_blocks > 1):
        raise ValueError(
            f"memory_read: table {table.shape}, rows {rows.shape} and weights {weights.shape} must be "
            f"[M,U], [B,J] and [B,J,X] with X dividing U, and num_blocks={num_blocks} must be >= 1 "
            f"(blocks {None if blocks is None else blocks.shape} given: required when num_blocks > 1)"
        )
    if blocks is None:
        blocks = jnp.zeros((B, J), jnp.int32)
    return jax.ffi.ffi_call(
        "llmarch_memory_read",
        jax.ShapeDtypeStruct((B, num_blocks, U), jnp.float32),
        vmap_method="sequential",
    )(table, rows.astype(jnp.int32), weights, blocks.astype(jnp.int32))
