"""Value tables row-sharded over a mesh axis: each device reads its own rows, a psum adds them.

The value table (``[M,U]``, logical axes ``(memory_rows, None)``) is split into contiguous row
blocks over the mesh axes that the active rules give ``memory_rows`` (``llmarch.sharding``: e.g.
``tensor`` under "tp"). Inside ``shard_map`` (manual over those axes only; the batch stays
wherever the compiler has it) every device sees all the picks, keeps the ones in its block
(local row = row − offset), zeroes the weights of the others, reads with the plain local lookup,
and ``psum`` adds the partial sums. No device ever holds another's rows; the backward pass
scatter-adds into the local block's picked rows only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llmarch import axes, sharding
from llmarch.layers.memory_lookup import read_values


def memory_axes() -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the active mesh and rules shard value-table rows over."""
    mesh = jax.sharding.get_abstract_mesh()
    return tuple(a for a in sharding.logical_axes_on_mesh(axes.MEMORY_ROWS, mesh) if mesh.shape[a] > 1)


def sharded_read_values(
    table: jax.Array,
    rows: jax.Array,
    weights: jax.Array,
    blocks: jax.Array | None,
    num_blocks: int,
    *,
    mesh_axes: tuple[str, ...],
    impl: str | None = None,
) -> jax.Array:
    """``read_values`` with the table's rows split over ``mesh_axes`` of the active mesh.

    Args and result as ``llmarch.layers.memory_lookup.read_values``; ``mesh_axes`` must be
    non-empty and their sizes must divide the table's rows.
    """
    mesh = jax.sharding.get_abstract_mesh()
    ways = math.prod(mesh.shape[a] for a in mesh_axes)
    if table.shape[0] % ways:
        raise ValueError(
            f"value table rows M={table.shape[0]} do not split over mesh axes {mesh_axes} "
            f"(x{ways}): M must be divisible by {ways}"
        )
    spec_rows = PartitionSpec(mesh_axes, None)

    def body(local_table, rows, weights, *maybe_blocks):
        local_rows = local_table.shape[0]
        offset = jax.lax.axis_index(mesh_axes) * local_rows
        local = rows - offset
        mine = (local >= 0) & (local < local_rows)
        local = jnp.where(mine, local, 0)
        weights = jnp.where(mine[..., None], weights, jnp.zeros_like(weights))
        part = read_values(
            local_table, local, weights, maybe_blocks[0] if maybe_blocks else None, num_blocks, impl=impl
        )
        return jax.lax.psum(part, mesh_axes)

    args = (table, rows, weights) + (() if blocks is None else (blocks,))
    in_specs = (spec_rows,) + (PartitionSpec(),) * (len(args) - 1)
    return jax.shard_map(body, in_specs=in_specs, out_specs=PartitionSpec(), axis_names=set(mesh_axes))(*args)
