"""The one parameter primitive: a weight named by its axes, applied with an einsum."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import ops, sharding

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(
    value: jax.Array, names: Sequence[str | None], *, kind: type[nnx.Variable] = nnx.Param
) -> nnx.Param:
    """A parameter (a ``kind`` variable, e.g. ``nnx.LoRAParam``) whose axes carry logical ``names``.

    Under a mesh and logical-axis rules (``llmarch.sharding.use``) it is born sharded, as flax 0.12
    shards annotated variables eagerly; with no mesh it is built unsharded on the default device,
    so a layer constructs on its own, with no sharding context, as readily as inside a model.
    """
    mesh, rules = sharding.ambient()
    eager = nnx.using_eager_sharding() and not mesh.empty and bool(rules)
    return kind(value, out_sharding=tuple(names), eager_sharding=eager)


class Einsum(nnx.Module):
    """A weight of ``shape`` whose axes carry logical ``names``; ``layer(eqn, x)`` contracts it.

    Keeping one primitive (instead of Dense/DenseGeneral/...) means every contraction in the
    model is written out as an einsum in the axis alphabet at its call site.
    """

    # An FP8 training recipe (``llmarch.train.fp8.install`` sets it; static, so in the graphdef).
    # "delayed" also gives the layer an ``fp8_meta`` variable (llmarch.quant.fp8_delayed.FP8Meta).
    fp8: str | None = None
    # The op implementation its weight product asks for (``ops.weight_matmul``'s ``impl``; None:
    # "auto"); a model sets it on all of its layers from ``ModelConfig.impl`` (``use_impl``).
    impl: str | None = None

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

    def weight(self) -> jax.Array:
        """The weight as stored (a ``QuantizedEinsum`` gives its dequantized weight here)."""
        return self.w[...]

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        if self.fp8 == "delayed":  # per-tensor delayed scales from the layer's amax history
            from llmarch.quant.fp8_delayed import fp8_delayed_einsum

            return fp8_delayed_einsum(eqn, x, self.w[...], self.fp8_meta[...])
        if self.fp8 is not None:  # quantized from the float32 master weight (llmarch.quant.fp8_linear)
            from llmarch.quant.fp8_linear import fp8_einsum

            return fp8_einsum(eqn, x, self.w[...], recipe=self.fp8)
        # Weights are cast to the activation dtype: the compute dtype is the input's.
        return contract(eqn, x, self.w[...].astype(x.dtype), impl=self.impl)


def use_impl(module: nnx.Module, impl: str | None) -> None:
    """Sets ``impl`` (an ``ops`` implementation name; None or "auto": the default) on every
    ``Einsum`` in ``module``, in place: ``"xla"`` keeps the CPU kernel out of its programs (an
    exported artifact's custom calls must be stable), ``"cpu"`` asks for it."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Einsum):
            node.impl = None if impl == "auto" else impl


def contract(eqn: str, x: jax.Array, w: jax.Array, *, impl: str | None = None) -> jax.Array:
    """``jnp.einsum(eqn, x, w)``, with the contracted axes listed in the order ``w`` stores them.

    ``jnp.einsum`` may list two or more contracted axes in another order than the weight's
    (``"BTNH,NHD->BTD"`` comes out contracting (H, N)); XLA:CPU then copies a transposed weight
    at every call, which in a decoding step reads and writes each such weight twice more. A
    plain weight contraction (no batch axes, output = the input's free axes then the weight's)
    is therefore one ``dot_general`` over the weight's axis order, its operands pure bitcasts;
    anything else goes to ``jnp.einsum``.

    A plain contraction whose contracted axes are the input's last ones (in the weight's order)
    and its weight's first ones is a matrix product ``[M, K] @ [K, N]`` up to bitcasts. On CPU,
    unsharded, it runs as exactly that 2-D product: given ``[B,T,D] x [D,F]``, XLA:CPU's backward
    pass writes each weight gradient's ``[B,T,F]`` operand transposed through a strided copy
    (``copy_bitcast_fusion``, ~20% of a small Llama's train step), which the 2-D form avoids;
    with few rows (a decode step) it runs ``llmarch.ops.weight_matmul``'s C++ kernel (``impl``:
    that op's request).
    """
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    letters = lhs + rhs
    shared = [c for c in rhs if c in lhs]
    plain = (
        "." not in eqn
        and len(set(lhs)) == len(lhs) == x.ndim
        and len(set(rhs)) == len(rhs) == w.ndim
        and not any(c in out for c in shared)  # no batch axes
        and out == "".join(c for c in letters if c not in shared)  # free axes, in order
    )
    if not plain:
        return jnp.einsum(eqn, x, w)
    free, k = lhs[: len(lhs) - len(shared)], len(shared)
    if lhs[len(free) :] == rhs[:k] == "".join(shared) and _unsharded_cpu():  # [M, K] @ [K, N]
        m = math.prod(x.shape[: len(free)])
        x2, w2 = x.reshape(m, -1), w.reshape(math.prod(w.shape[:k]), -1)
        y = ops.weight_matmul(x2, w2, impl=impl)  # the CPU kernel for a small batch's decode step
        return y.reshape(*x.shape[: len(free)], *w.shape[k:])
    dims = ((tuple(lhs.index(c) for c in shared), tuple(rhs.index(c) for c in shared)), ((), ()))
    return jax.lax.dot_general(x, w, dims)


def _unsharded_cpu() -> bool:
    """Where a weight product may be flattened to 2-D (a reshape that merges axes a mesh could
    split) and reach the CPU kernel: ``ops.cpu_unsharded`` (experiment 26 switches this)."""
    return ops.cpu_unsharded()
