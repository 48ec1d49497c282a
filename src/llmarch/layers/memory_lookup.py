"""Reading the value table: weighted sums of the picked rows, with UltraMem's MCS and IVE.

Every read gathers only the picked rows (never a score over all M rows),
and its backward pass scatter-adds into only the picked rows of the table's gradient:

- CPU (the default there: a float32 table, unsharded): ``kernels_cpu.memory_read``, each picked
  row read once and added into its block's output; backward as XLA's below.
- XLA: ``gather_weighted_sum`` does the whole read, MCS and IVE included, with
  an explicit ``custom_vjp``: each picked row gathered once and scaled chunk by chunk, pooled per
  virtual block in the ``[B,W,U]`` order the projection reads (no transpose before it); backward,
  a scatter-add into the picked rows. ``grouped_lookup`` (one weight per pick) is it as the XLA
  entry of ``llmarch.ops``' ``"memory_lookup_grouped"``.
- Pallas (TPU/GPU): ``llmarch.ops.memory_lookup(table [M,U], rows [B,J], weights [B,J]) -> [B,U]``
  is the plain read (PKM), the gather-weighted-sum kernel; ``memory_lookup_grouped`` pools the
  picks of each virtual block (IVE) apart. Multi-core scoring (MCS) scales chunk ``c`` of a row by
  core ``c``'s score: viewing the table as ``[M·X, U/X]`` (a free reshape) turns it into X plain
  reads of ``U/X``-wide rows, each with its own weights, reading no more bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmarch import ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gather_weighted_sum(
    table: jax.Array,
    rows: jax.Array,
    weights: jax.Array,
    blocks: jax.Array | None,
    num_blocks: int,
    cpu_kernel: bool = False,
) -> jax.Array:
    """``[B,W,U]``: the XLA read, MCS and IVE included (see ``read_values`` for the arguments);
    with ``cpu_kernel``, its forward is ``kernels_cpu.memory_read`` (the same sums, each picked
    row read once, nothing materialized) and its backward the same as XLA's. One difference,
    for non-finite values only: the one-hot matmul below multiplies every pick by 0 for the
    blocks it is not in, so an inf or NaN in one block's pick makes NaN in every block of its
    row; the kernel keeps it in its own block, as the sum's definition does.

    Each picked row is gathered once, already scaled chunk by chunk by its core weights (XLA fuses
    the scaling into the gather), and lands in its block through a ``[B,J,W]`` one-hot batched
    matmul: the output comes out in the ``[B,W,U]`` order the projection ``W_o [W,U,D]`` reads,
    so no transpose sits between the read and the projection (XLA:CPU would otherwise move it
    onto the projection's weight and copy that at every step). Backward: a scatter-add into the
    picked rows only.
    """
    if cpu_kernel:
        from kernels_cpu.memory_read import memory_read

        return memory_read(table, rows, weights, blocks, num_blocks)
    B, J, X = weights.shape
    M, U = table.shape
    picked = table[rows].astype(jnp.float32)  # [B,J,U]: only the picked rows
    if num_blocks == 1 and X == 1:  # PKM: a batched matrix-vector product, as ops.memory_lookup
        out = jnp.einsum("BJ,BJU->BU", weights[..., 0].astype(jnp.float32), picked)[:, None]
        return out.astype(table.dtype)
    scaled = picked.reshape(B, J, X, U // X) * weights.astype(jnp.float32)[..., None]
    scaled = scaled.reshape(B, J, U)  # each chunk scaled by its core's weight
    if num_blocks == 1:
        out = jnp.sum(scaled, axis=1)[:, None]  # [B,1,U]
    else:
        onehot = jax.nn.one_hot(blocks, num_blocks, dtype=jnp.float32)  # [B,J,W]
        out = jnp.einsum("BJW,BJU->BWU", onehot, scaled)
    return out.astype(table.dtype)


def _gws_fwd(table, rows, weights, blocks, num_blocks, cpu_kernel):
    # Residuals: the inputs only (the table is a parameter, kept anyway); rows are re-gathered.
    out = gather_weighted_sum(table, rows, weights, blocks, num_blocks, cpu_kernel)
    return out, (table, rows, weights, blocks)


def _gws_bwd(num_blocks, cpu_kernel, res, d_out):
    table, rows, weights, blocks = res
    B, J, X = weights.shape
    M, U = table.shape
    d_out = d_out.astype(jnp.float32)
    if num_blocks == 1:
        d_pick = jnp.broadcast_to(d_out, (B, J, U))
    else:
        d_pick = jnp.take_along_axis(d_out, blocks[..., None], axis=1)  # [B,J,U]
    d_pick = d_pick.reshape(B, J, X, U // X)
    picked = table[rows].astype(jnp.float32).reshape(B, J, X, U // X)
    d_weights = jnp.einsum("BJXU,BJXU->BJX", picked, d_pick)
    d_rows = (weights.astype(jnp.float32)[..., None] * d_pick).reshape(B, J, U)
    # Scatter-add into the picked rows; rows nobody picked keep their zero gradient.
    d_table = jnp.zeros(table.shape, jnp.float32).at[rows].add(d_rows, mode="promise_in_bounds")
    return d_table.astype(table.dtype), None, d_weights.astype(weights.dtype), None


gather_weighted_sum.defvjp(_gws_fwd, _gws_bwd)


def grouped_lookup(
    table: jax.Array, rows: jax.Array, weights: jax.Array, blocks: jax.Array, num_blocks: int
) -> jax.Array:
    """``[B,W,U]``: ``out[b,w] = Σ_{j: blocks[b,j]=w} weights[b,j]·table[rows[b,j]]``, the XLA entry
    of ``llmarch.ops``' ``"memory_lookup_grouped"`` (one weight per pick: ``weights [B,J]``)."""
    return gather_weighted_sum(table, rows, weights[..., None], blocks, num_blocks)


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
      impl: ``llmarch.ops`` implementation ("auto", "xla", "pallas", "cpu" or None). On CPU,
        "auto" takes ``kernels_cpu.memory_read`` where ``ops.memory_read_kernel_serves``.
    Returns:
      ``[B,W,U]`` in the table's dtype: chunk ``c`` of ``out[b,w]`` is
      ``Σ_{j in block w} weights[b,j,c]·table[rows[b,j], chunk c]``.
    """
    wants_kernel = impl in (None, "auto", "cpu", ops.Impl.CPU)  # asked first: "xla" never builds it
    if wants_kernel and ops.memory_read_kernel_serves(table.dtype, weights.dtype):
        return gather_weighted_sum(table, rows, weights, blocks, num_blocks, True)
    if impl in ("cpu", ops.Impl.CPU):
        raise ValueError(
            f"impl='cpu' cannot take this memory read ({table.dtype} table, {weights.dtype} weights, "
            f"backend {jax.default_backend()}): the CPU kernel takes float32, unsharded, on the CPU "
            "backend, when built"
        )
    op = "memory_lookup" if num_blocks == 1 else "memory_lookup_grouped"
    if ops.resolve(op, impl)[0] is ops.Impl.XLA:
        return gather_weighted_sum(table, rows, weights, blocks, num_blocks)
    # The kernels take one weight per pick: with MCS, chunk c of row p is row p·X + c of the
    # [M·X, U/X] view, so X plain reads of U/X-wide rows, each with its own weights.
    M, U = table.shape
    B, J, X = weights.shape
    if X > 1:
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
