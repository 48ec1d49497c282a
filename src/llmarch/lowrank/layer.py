"""``LowRankEinsum``: a drop-in for ``Einsum`` whose weight is stored as two factors.

A weight ``W [*shape]`` whose ``contracted`` axes (K, in the weight's order) meet the input and
whose other axes (N) are outputs is held as ``a [*K, r]`` and ``b [r, *N]`` with ``W = a·b``
contracted over the rank axis r. ``layer(eqn, x)`` takes the ``eqn`` the original ``Einsum`` is
called with and runs it as two contractions through the rank axis, e.g. ``"BTD,DNH->BTNH"`` as
``"BTD,Dr->BTr"`` then ``"BTr,rNH->BTNH"``: ``r·(K+N)`` multiply-adds per token instead of
``K·N``. Any equation works, not only the one the weight was factorized for (MLA's absorbed decode
contracts ``w_uk_anh`` over H with N shared: ``"BTNH,rNH->BTNr"``, then ``"BTNr,Ar->BTNA"``):
of the two orders (x with a first, or with b first) the one with fewer multiply-adds is taken.

The factors are ordinary ``nnx.Param``: a train step fine-tunes them, a checkpoint stores them.
They keep the weight's logical sharding names (the rank axis is unsharded), and a scanned run's
factors carry its leading layers axis like every other weight of the run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import axes
from llmarch.layers.einsum import Einsum, contract, param

RANK = "r"  # the rank axis's letter (llmarch.axes.ALPHABET)


class LowRankEinsum(nnx.Module):
    """``W [*shape] = a [*lead, *K, r] · b [*lead, r, *N]``, applied as ``layer(eqn, x)``.

    Args:
      a, b: the factors; ``lead`` leading axes are a scanned run's layers axis.
      shape: one layer's weight shape.
      contracted: the axes of ``shape`` that form K (increasing); the rest form N.
      names: the weight's logical axis names (one layer's, as ``Einsum``'s ``names``).
      lead: 0, or 1 for a weight of a run of stacked layers.
    """

    def __init__(
        self,
        a: jax.Array,
        b: jax.Array,
        *,
        shape: Sequence[int],
        contracted: Sequence[int],
        names: Sequence[str | None],
        lead: int = 0,
    ):
        self.shape, self.contracted = tuple(shape), tuple(contracted)
        k_dims = tuple(self.shape[i] for i in self.contracted)
        n_axes = tuple(i for i in range(len(self.shape)) if i not in self.contracted)
        n_dims = tuple(self.shape[i] for i in n_axes)
        r = a.shape[-1]
        if (
            a.shape[lead:] != (*k_dims, r)
            or b.shape[lead:] != (r, *n_dims)
            or a.shape[:lead] != b.shape[:lead]
        ):
            raise ValueError(
                f"factors a {a.shape}, b {b.shape} do not fit a weight {self.shape} contracted over "
                f"axes {self.contracted} with {lead} leading axes: need a [*lead, *K, r], b [*lead, r, *N]"
            )
        stacked = (axes.LAYERS,) * lead
        self.a = param(a, (*stacked, *(names[i] for i in self.contracted), None))
        self.b = param(b, (*stacked, None, *(names[i] for i in n_axes)))

    @property
    def rank(self) -> int:
        """The stored rank r."""
        return self.a[...].shape[-1]

    def weight(self) -> jax.Array:
        """``a·b`` in the original weight's shape and axis order (``[*lead, *shape]``)."""
        return factor_product(self.a[...], self.b[...], self.shape, self.contracted)

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        plan = _plan(eqn, self.shape, self.contracted, tuple(x.shape), self.rank)
        if plan is None:  # an equation two contractions cannot split: the product, contracted once
            return contract(eqn, x, self.weight().astype(x.dtype))
        first, second, a_first = plan
        # Factors are cast to the activation dtype: the compute dtype is the input's, as in Einsum.
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        return (
            contract(second, contract(first, x, a), b)
            if a_first
            else contract(second, contract(first, x, b), a)
        )


def factor_product(a: jax.Array, b: jax.Array, shape: Sequence[int], contracted: Sequence[int]) -> jax.Array:
    """``a [*lead, *K, r] · b [*lead, r, *N]`` as a weight of ``shape`` (``[*lead, *shape]``, its
    axes in their own order), ``contracted`` naming the axes of ``shape`` that form K."""
    shape, contracted = tuple(shape), tuple(contracted)
    lead = a.ndim - len(contracted) - 1
    k = math.prod(a.shape[lead:-1])
    m = jnp.matmul(a.reshape(*a.shape[:lead], k, -1), b.reshape(*b.shape[: lead + 1], -1))  # [*L,K,N]
    order = contracted + tuple(i for i in range(len(shape)) if i not in contracted)
    m = m.reshape(*a.shape[:lead], *(shape[i] for i in order))  # [*L, *K, *N]
    return jnp.transpose(m, (*range(lead), *(lead + int(p) for p in np.argsort(order))))


def split_equation(
    eqn: str, shape: tuple[int, ...], contracted: tuple[int, ...], x_shape: tuple[int, ...], rank: int
) -> tuple[str, str, bool] | None:
    """``eqn`` (x with a weight of ``shape``) as two equations through a rank axis: ``(first,
    second, a_first)``, the cheaper order, or None when it cannot be split; see ``_plan``."""
    return _plan(eqn, tuple(shape), tuple(contracted), tuple(x_shape), rank)


@functools.lru_cache(maxsize=512)
def _plan(
    eqn: str, shape: tuple[int, ...], contracted: tuple[int, ...], x_shape: tuple[int, ...], rank: int
) -> tuple[str, str, bool] | None:
    """``(first, second, a_first)``: ``eqn`` of x with the weight as two equations through the
    rank axis, the cheaper order; None when ``eqn`` cannot be split (ellipses, repeated letters,
    the rank letter already in use, or a weight operand of another number of axes)."""
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    if (
        "." in eqn
        or RANK in eqn
        or len(rhs) != len(shape)
        or len(set(lhs)) != len(lhs)
        or len(set(rhs)) != len(rhs)
        or len(lhs) != len(x_shape)
    ):
        return None
    k_letters = "".join(rhs[i] for i in contracted)
    n_letters = "".join(c for i, c in enumerate(rhs) if i not in contracted)
    a_letters, b_letters = k_letters + RANK, RANK + n_letters
    size = {**dict(zip(lhs, x_shape, strict=True)), **dict(zip(rhs, shape, strict=True)), RANK: rank}

    def split(first: str, second: str) -> tuple[str, str, int]:
        # The intermediate keeps every letter still needed: the output's and the second factor's.
        letters = dict.fromkeys(lhs + first)
        middle = "".join(c for c in letters if c in out or c in second)
        cost = math.prod(size[c] for c in letters) + math.prod(size[c] for c in set(middle + second))
        return lhs + "," + first + "->" + middle, middle + "," + second + "->" + out, cost

    a_then_b, b_then_a = split(a_letters, b_letters), split(b_letters, a_letters)
    if a_then_b[2] <= b_then_a[2]:
        return a_then_b[0], a_then_b[1], True
    return b_then_a[0], b_then_a[1], False


def build_factorized(
    model: nnx.Module, entries: Sequence[Any], *, rngs: nnx.Rngs, init_std: float, param_dtype: Any
) -> None:
    """Replaces, in a freshly built ``model``, the ``Einsum`` at each entry's path (a
    ``config.LowRankWeight``) by a ``LowRankEinsum`` of its stored rank; the ``Transformer`` calls
    it for ``ModelConfig.low_rank``.

    Restoring a checkpoint overwrites the factors; a model trained from scratch starts from
    ``a ~ N(0, 1/r)``, ``b ~ N(0, init_std²)``, so ``a·b`` has the dense weight's ``init_std``, with
    each layer's columns beyond its own rank zero (as a factorized checkpoint's are).

    Raises:
      ValueError: an entry whose path names no dense weight of the model, or whose shape or
        layer count differs from the weight's there.
    """
    found = []
    for entry in entries:
        parent, key, module = locate(model, entry.path)
        if not isinstance(module, Einsum):
            raise ValueError(
                f"ModelConfig.low_rank names {entry.path!r}, which is {type(module).__name__}, not a "
                "linear (Einsum) weight of this model"
            )
        value = module.w[...]
        lead = value.ndim - len(entry.shape)
        layers = value.shape[0] if lead == 1 else 1
        if (
            lead not in (0, 1)
            or tuple(value.shape[lead:]) != tuple(entry.shape)
            or layers != len(entry.ranks)
        ):
            raise ValueError(
                f"ModelConfig.low_rank[{entry.path!r}] records shape {entry.shape} over "
                f"{len(entry.ranks)} layer(s), but the model's weight there is {tuple(value.shape)}"
            )
        names = tuple(module.w.get_metadata().get("out_sharding") or (None,) * value.ndim)[lead:]
        found.append((entry, parent, key, names, lead))
    specs = tuple(
        (lead, tuple(e.shape[i] for i in e.contracted), _n_dims(e.shape, e.contracted), e.ranks)
        for e, _, _, _, lead in found
    )
    # One jitted call draws every factor: eagerly, each op of each shape would compile on its own.
    factors = _initial_factors(rngs.params(), specs, float(init_std), jnp.dtype(param_dtype))
    for (entry, parent, key, names, lead), (a, b) in zip(found, factors, strict=True):
        layer = LowRankEinsum(a, b, shape=entry.shape, contracted=entry.contracted, names=names, lead=lead)
        install(parent, key, layer)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _initial_factors(key: jax.Array, specs: tuple, init_std: float, dtype: Any) -> list:
    """``(a, b)`` for each ``(lead, K dims, N dims, ranks)``: ``a ~ N(0, 1/r)``, ``b ~ N(0,
    init_std²)``, each layer's columns of a and rows of b beyond its own rank zero."""
    shapes = []
    for lead, k_dims, n_dims, ranks in specs:
        stack, r = (len(ranks),) * lead, max(ranks)
        shapes += [(*stack, *k_dims, r), (*stack, r, *n_dims)]
    # One draw sliced into every factor: XLA:CPU compiles each random draw (threefry) slowly.
    z = jax.random.normal(key, (sum(math.prod(s) for s in shapes),), dtype)
    out, start = [], 0
    for i, (lead, k_dims, n_dims, ranks) in enumerate(specs):
        a_shape, b_shape = shapes[2 * i], shapes[2 * i + 1]
        r, stack = a_shape[-1], a_shape[:lead]
        a = z[start : start + math.prod(a_shape)].reshape(a_shape) / math.sqrt(r)
        start += math.prod(a_shape)
        b = z[start : start + math.prod(b_shape)].reshape(b_shape) * init_std
        start += math.prod(b_shape)
        keep = (np.arange(r) < np.asarray(ranks)[:, None]).reshape(*stack, r)  # [*lead, r]
        a = a * keep.reshape(*stack, *(1,) * len(k_dims), r).astype(dtype)
        b = b * keep.reshape(*stack, r, *(1,) * len(n_dims)).astype(dtype)
        out.append((a, b))
    return out


def _n_dims(shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if i not in contracted)


def locate(model: nnx.Module, path: str) -> tuple[Any, str | int, Any]:
    """``(parent, key, module)`` of the module at ``path`` ("runs/0/layers/ffn/w_up_df")."""
    node: Any = model
    parent, key = None, None
    for part in path.split("/"):
        parent, key = node, int(part) if part.isdigit() else part
        try:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"{path!r} names no module of this model (no {part!r} there)") from None
    return parent, key, node


def install(parent: Any, key: str | int, layer: nnx.Module) -> None:
    if isinstance(key, int):
        parent[key] = layer
    else:
        setattr(parent, key, layer)
