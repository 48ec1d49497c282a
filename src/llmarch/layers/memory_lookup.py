"""Reading the value table: weighted sums of the picked rows, with UltraMem's MCS and IVE.

Every read gathers only the picked rows (never a one-hot matmul, never a score over all M rows),
and its backward pass scatter-adds into only the picked rows of the table's gradient:

- ``llmarch.ops.memory_lookup(table [M,U], rows [B,J], weights [B,J]) -> [B,U]`` is the plain read
  (PKM); on TPU/GPU it is the Pallas gather-weighted-sum kernel.
- Multi-core scoring (MCS) scales chunk ``c`` of a row by core ``c``'s score. Viewing the table as
  ``[M·X, U/X]`` (a free reshape) turns it into X plain reads of ``U/X``-wide rows, each with its
  own weights, so it too is ``ops.memory_lookup`` and reads no more bytes.
- Implicit value expansion (IVE) pools the picks of each virtual block apart (they are projected
  by different matrices). ``grouped_lookup`` does that with an explicit ``custom_vjp`` (gather,
  per-block sum; backward: scatter-add into the picked rows). It is registered in ``llmarch.ops``
  as the XLA entry of ``llmarch.ops``' ``"memory_lookup_grouped"``, whose Pallas entry is the
  grouped kernel of ``kernels_pallas.memory_lookup``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmarch import ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_lookup(
    table: jax.Array, rows: jax.Array, weights: jax.Array, blocks: jax.Array, num_blocks: int
) -> jax.Array:
    """``[B,W,U]``: ``out[b,w] = Σ_{j: blocks[b,j]=w} weights[b,j]·table[rows[b,j]]``.

    Args:
      table: ``[M,U]`` value rows.
      rows: int ``[B,J]`` picked rows in ``[0, M)``.
      weights: float ``[B,J]``.
      blocks: int ``[B,J]`` the virtual block ``[0, W)`` of each pick.
      num_blocks: W.
    Returns:
      ``[B,W,U]`` in the table's dtype, summed in float32.
    """
    picked = table[rows].astype(jnp.float32)  # [B,J,U]: only the picked rows
    onehot = jax.nn.one_hot(blocks, num_blocks, dtype=jnp.float32)  # [B,J,W]
    out = jnp.einsum("BJ,BJW,BJU->BWU", weights.astype(jnp.float32), onehot, picked)
    return out.astype(table.dtype)


def _grouped_fwd(table, rows, weights, blocks, num_blocks):
    # Residuals: the inputs only (the table is a parameter, kept anyway); rows are re-gathered.
    return grouped_lookup(table, rows, weights, blocks, num_blocks), (table, rows, weights, blocks)


def _grouped_bwd(num_blocks, res, d_out):
    table, rows, weights, blocks = res
    d_pick = jnp.take_along_axis(d_out.astype(jnp.float32), blocks[..., None], axis=1)  # [B,J,U]
    d_weights = jnp.einsum("BJU,BJU->BJ", table[rows].astype(jnp.float32), d_pick)
    d_rows = weights.astype(jnp.float32)[..., None] * d_pick  # [B,J,U]
    # Scatter-add into the picked rows; rows nobody picked keep their zero gradient.
    d_table = jnp.zeros(table.shape, jnp.float32).at[rows].add(d_rows, mode="promise_in_bounds")
    return d_table.astype(table.dtype), None, d_weights.astype(weights.dtype), None


grouped_lookup.defvjp(_grouped_fwd, _grouped_bwd)

if ops.Impl.XLA not in ops.available("memory_lookup_grouped"):
    ops.register("memory_lookup_grouped", ops.Impl.XLA, grouped_lookup)


def read_values(
    table: jax.Array,
    rows: jax.Array,
    weights: jax.Array,
    blocks: jax.Array | None,
    num_blocks: int,
    *,
    impl: str | None = None,
) -> jax.Array:
    """``[B,W,U]``: the picks' weighted sum per virtual block, each core scaling its chunk.

    Args:
      table: ``[M,U]`` value rows (``U`` divisible by the cores X).
      rows: int ``[B,J]`` picked physical rows.
      weights: float ``[B,J,X]`` the weight of each pick for each core's chunk (X=1: plain).
      blocks: int ``[B,J]`` virtual block of each pick, or None when ``num_blocks == 1``.
      num_blocks: W (1 without IVE).
      impl: ``llmarch.ops`` implementation ("auto", "xla", "pallas" or None).
    Returns:
      ``[B,W,U]`` in the table's dtype: chunk ``c`` of ``out[b,w]`` is
      ``Σ_{j in block w} weights[b,j,c]·table[rows[b,j], chunk c]``.
    """
    M, U = table.shape
    B, J, X = weights.shape
    if X > 1:  # MCS: chunk c of row p is row p·X + c of the [M·X, U/X] view
        table = table.reshape(M * X, U // X)
        rows = (rows[:, None, :] * X + jnp.arange(X, dtype=rows.dtype)[None, :, None]).reshape(B * X, J)
        weights = jnp.swapaxes(weights, 1, 2).reshape(B * X, J)  # [B·X, J]
        if blocks is not None:
            blocks = jnp.repeat(blocks, X, axis=0)  # [B·X, J]
    else:
        weights = weights[..., 0]
    if num_blocks == 1:
        out = ops.memory_lookup(table, rows, weights, impl=impl)[:, None, :]  # [B·X, 1, U/X]
    else:
        _, grouped = ops.resolve("memory_lookup_grouped", impl)
        out = grouped(table, rows, weights, blocks, num_blocks)  # [B·X, W, U/X]
    if X > 1:
        out = out.reshape(B, X, num_blocks, U // X).transpose(0, 2, 1, 3).reshape(B, num_blocks, U)
    return out


def virtual_to_physical(
    slots: jax.Array, permutation: jax.Array | None, physical_rows: int
) -> tuple[jax.Array, jax.Array | None]:
    """IVE addressing: grid slot ``s`` -> ``π(s)`` -> (row ``π(s) mod M``, block ``π(s) div M``).

    The fixed random permutation ``π`` of the ``W·M`` virtual slots (as in the official code)
    spreads each virtual block over the whole grid. Without IVE (``permutation`` None) the slot is
    the row and there are no blocks.
    """
    if permutation is None:
        return slots, None
    shuffled = permutation[slots]
    return shuffled % physical_rows, shuffled // physical_rows
