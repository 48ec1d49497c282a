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


_EINSUM_CALL = Einsum.__call__  # as defined here, not wrapped


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
    if (k := _matrix_k(eqn, x, w)) is not None:  # [M, K] @ [K, N]
        x2, w2 = _as_matrices(x, w, k)
        y = ops.weight_matmul(x2, w2, impl=impl)  # the CPU kernel for a small batch's decode step
        return y.reshape(*x.shape[: x.ndim - k], *w.shape[k:])
    dims = ((tuple(lhs.index(c) for c in shared), tuple(rhs.index(c) for c in shared)), ((), ()))
    return jax.lax.dot_general(x, w, dims)


def _matrix_k(eqn: str, x: jax.Array, w: jax.Array) -> int | None:
    """How many axes a plain contraction ``eqn`` contracts when it is ``[M, K] @ [K, N]`` up to
    bitcasts (x's last axes are w's first, in order) on an unsharded CPU program; else None."""
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    shared = "".join(c for c in rhs if c in lhs)
    k = len(shared)
    matrix = (
        k > 0
        and "." not in eqn
        and len(set(lhs)) == len(lhs) == x.ndim
        and len(set(rhs)) == len(rhs) == w.ndim
        and lhs[len(lhs) - k :] == rhs[:k] == shared
        and out == lhs[: len(lhs) - k] + rhs[k:]
    )
    return k if matrix and _unsharded_cpu() else None


def _as_matrices(x: jax.Array, w: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``x`` as ``[M, K]`` and ``w`` as ``[K, N]``, ``k`` axes contracted (bitcasts)."""
    m = math.prod(x.shape[: x.ndim - k])
    return x.reshape(m, -1), w.reshape(math.prod(w.shape[:k]), -1)


def apply_shared(x: jax.Array, calls: Sequence[tuple[Einsum, str]]) -> list[jax.Array]:
    """``[layer(eqn, x) for layer, eqn in calls]``: several weights applied to one input (q, k and
    v; gate and up). Where each is a plain ``Einsum``'s ``[M, K] @ [K, N]`` of the same ``K`` on an
    unsharded CPU program, one ``ops.weight_matmuls`` takes them all: in a decode step, one call of
    the CPU kernel (one hand-off to its threads) instead of one per weight, the same bits."""
    layers = [layer for layer, _ in calls]
    shared = (
        len(calls) > 1
        and all(type(layer) is Einsum and layer.fp8 is None for layer in layers)
        # Tools that find or calibrate layers by wrapping Einsum.__call__ (llmarch.quant's
        # targets and calibration, LoRA) must see each call: while wrapped, no fusing.
        and Einsum.__call__ is _EINSUM_CALL
        and len({layer.impl for layer in layers}) == 1
    )
    if shared:
        ws = [layer.w[...].astype(x.dtype) for layer in layers]  # as Einsum.__call__ casts
        ks = {_matrix_k(eqn, x, w) for (_, eqn), w in zip(calls, ws, strict=True)}
        if len(ks) == 1 and (k := ks.pop()) is not None:  # x's same last k axes: one [M, K]
            x2 = _as_matrices(x, ws[0], k)[0]
            ys = ops.weight_matmuls(x2, [w.reshape(x2.shape[1], -1) for w in ws], impl=layers[0].impl)
            return [y.reshape(*x.shape[: x.ndim - k], *w.shape[k:]) for y, w in zip(ys, ws, strict=True)]
    return [layer(eqn, x) for layer, eqn in calls]


def _unsharded_cpu() -> bool:
    """Where a weight product may be flattened to 2-D (a reshape that merges axes a mesh could
    split) and reach the CPU kernel: ``ops.cpu_unsharded`` (experiment 26 switches this)."""
    return ops.cpu_unsharded()
