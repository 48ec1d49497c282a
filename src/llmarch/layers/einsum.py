"""The one parameter primitive: a weight named by its axes, applied with an einsum."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import sharding

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A parameter whose axes carry logical ``names``.

    Under a mesh and logical-axis rules (``llmarch.sharding.use``) it is born sharded, as flax 0.12
    shards annotated variables eagerly; with no mesh it is built unsharded on the default device,
    so a layer constructs on its own, with no sharding context, as readily as inside a model.
    """
    mesh, rules = sharding.ambient()
    eager = nnx.using_eager_sharding() and not mesh.empty and bool(rules)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=eager)


class Einsum(nnx.Module):
    """A weight of ``shape`` whose axes carry logical ``names``; ``layer(eqn, x)`` contracts it.

    Keeping one primitive (instead of Dense/DenseGeneral/...) means every contraction in the
    model is written out as an einsum in the axis alphabet at its call site.
    """

    def __init__(
        self,
        shape: Sequence[int],
        names: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        init: Initializer | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if len(shape) != len(names):
            raise ValueError(f"Einsum shape {tuple(shape)} and names {tuple(names)} differ in rank")
        init = init or nnx.initializers.normal(0.02)
        self.w = param(init(rngs.params(), tuple(shape), param_dtype), names)

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        # Weights are cast to the activation dtype: the compute dtype is the input's.
        return jnp.einsum(eqn, x, self.w[...].astype(x.dtype))
