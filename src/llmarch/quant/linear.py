"""``QuantizedEinsum``: a drop-in for ``Einsum`` whose weight is stored quantized.

An ``Einsum`` weight ``w`` of any rank is stored as the matrix ``[..., K, N]`` of ``llmarch.quant.tensor``:
its axes listed in ``layout.perm`` order (batch axes, then the contracted axes flattened into K,
then the output axes flattened into N). ``layer(eqn, x)`` contracts x with it through
``llmarch.ops.quantized_matmul`` when ``eqn`` contracts exactly the stored K axes and writes the
input's free axes then N's (every projection of the model's forward pass); any other use (MLA's
absorbed decode contracts ``w_uk_anh`` over H instead of A) dequantizes the weight inside the
step and contracts it as ``Einsum`` would, still reading only the stored bytes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import axes, ops, sharding
from llmarch.layers.einsum import contract
from llmarch.quant.tensor import QuantizedTensor, dequantize


class QuantParam(nnx.Variable):
    """A quantized weight's stored values, scales or zero points.

    Not an ``nnx.Param``: optimizers and ``nnx.Param`` filters (the train step's ``params``) skip
    it, and it travels in a split's non-trainable rest, like the MoE router's bias.
    """


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight of ``shape`` becomes the matrix ``[*batch, K, N]``.

    Attributes:
      shape: the weight's logical shape (one layer's, without a scanned run's layers axis).
      names: its logical axis names (``Einsum``'s sharding names).
      perm: its axes in stored order: ``batch`` axes, then ``contracted`` ones, then the rest (N).
      batch: how many of ``perm`` are batch axes (MoE experts).
      contracted: how many are contracted (K).
    """

    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    perm: tuple[int, ...]
    batch: int
    contracted: int

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        dims = [self.shape[p] for p in self.perm]
        b, k = self.batch, self.contracted
        return (*dims[:b], math.prod(dims[b : b + k]), math.prod(dims[b + k :]))

    def to_matrix(self, w: np.ndarray | jax.Array, lead: int = 0) -> np.ndarray | jax.Array:
        """``w [*lead, *shape]`` as ``[*lead, *batch, K, N]``."""
        xp = np if isinstance(w, np.ndarray) else jnp
        moved = xp.transpose(w, (*range(lead), *(lead + p for p in self.perm)))
        return moved.reshape(*w.shape[:lead], *self.matrix_shape)

    def from_matrix(self, m: jax.Array) -> jax.Array:
        """The inverse of ``to_matrix`` for one layer: ``[*batch, K, N]`` -> ``shape``."""
        moved = m.reshape(tuple(self.shape[p] for p in self.perm))
        return jnp.transpose(moved, tuple(np.argsort(self.perm)))

    def matrix_names(self) -> tuple[str | None, ...]:
        """Logical names of ``[*batch, K, N]``: each merged axis keeps its first axis's name."""
        named = [self.names[p] for p in self.perm]
        b, k = self.batch, self.contracted
        return (*named[:b], named[b] if k else None, named[b + k] if len(named) > b + k else None)


class QuantizedEinsum(nnx.Module):
    """A quantized weight applied as ``layer(eqn, x)``, like the ``Einsum`` it replaces.

    Args:
      qt: the stored weight ``[*lead, *batch, K, N]``; ``lead`` leading axes are a scanned run's
        layers axis (the arrays carry it, ``qt.shape`` and ``layout`` describe one layer).
      layout: how the original weight maps to the matrix.
      lead: 0, or 1 for a weight of a run of stacked layers.
    """

    def __init__(self, qt: QuantizedTensor, layout: Layout, *, lead: int = 0):
        if tuple(qt.shape) != layout.matrix_shape:
            raise ValueError(f"quantized weight {qt.shape} does not match the layout's {layout.matrix_shape}")
        self.layout = layout
        self.bits, self.group_size, self.kind = qt.bits, qt.group_size, qt.kind
        self.matrix_shape = layout.matrix_shape
        names = layout.matrix_names()
        stacked = (axes.LAYERS,) * lead
        self.q = _variable(qt.q, (*stacked, *names))
        self.scale = _variable(qt.scale, (*stacked, *names[:-2], None, names[-1]))
        self.zero = None if qt.zero is None else _variable(qt.zero, (*stacked, *names[:-2], None, names[-1]))

    @property
    def tensor(self) -> QuantizedTensor:
        """One layer's ``QuantizedTensor`` (inside a scan over the run, or an unstacked model)."""
        zero = None if self.zero is None else self.zero[...]
        return QuantizedTensor(
            self.q[...], self.scale[...], zero, self.bits, self.group_size, self.kind, self.matrix_shape
        )

    def weight(self) -> jax.Array:
        """The dequantized weight in its original shape and axis order, float32."""
        return self.layout.from_matrix(dequantize(self.tensor))

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        plan = _plan(eqn, self.layout)
        if plan is None:  # another contraction than the stored one: dequantize, then contract
            return contract(eqn, x, self.weight().astype(x.dtype))
        x_order, free_shape = plan(x)
        xt = jnp.transpose(x, x_order).reshape(*free_shape, -1)  # [..., K]
        y = ops.quantized_matmul(xt, self.tensor)  # [..., N]
        n_dims = [self.layout.shape[p] for p in self.layout.perm[self.layout.contracted :]]
        return y.reshape(*free_shape, *n_dims)


class QuantizedEmbed(nnx.Module):
    """A drop-in for ``Embed`` whose ``[V,D]`` table is stored quantized as the matrix ``[D, V]``
    of its LM-head use (``attend`` contracts D): groups run along D, each token has its scales.
    ``encode`` gathers the tokens' columns and dequantizes only those."""

    def __init__(self, qt: QuantizedTensor, layout: Layout):
        self.table_q = QuantizedEinsum(qt, layout)

    def table(self) -> jax.Array:
        return self.table_q.weight()

    def encode(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        qt = self.table_q.tensor  # [D, V]
        flat = tokens.reshape(-1)  # [n]
        take = lambda a, idx: jnp.take(a, idx, axis=-1)  # noqa: E731
        if qt.kind == "fp8" and qt.group_size is not None:  # square blocks: a scale per block of V
            b, D = qt.group_size, qt.K
            scale = jnp.repeat(take(qt.scale, flat // b), b, axis=0)[:D]  # [D, n]
            cols = take(qt.q, flat).astype(jnp.float32) * scale
        else:
            zero = None if qt.zero is None else take(qt.zero, flat)
            picked = QuantizedTensor(
                take(qt.q, flat),
                take(qt.scale, flat),
                zero,
                qt.bits,
                qt.group_size,
                qt.kind,
                (qt.K, flat.size),
            )
            cols = dequantize(picked)  # [D, n]
        return cols.T.reshape(*tokens.shape, qt.K).astype(dtype)  # [B,T,D]

    def attend(self, x: jax.Array) -> jax.Array:
        return self.table_q("BTD,VD->BTV", x)


def _variable(value: jax.Array, names: tuple[str | None, ...]) -> QuantParam:
    mesh, rules = sharding.ambient()
    eager = nnx.using_eager_sharding() and not mesh.empty and bool(rules)
    return QuantParam(value, out_sharding=names, eager_sharding=eager)


def _plan(eqn: str, layout: Layout):
    """For an ``eqn`` that contracts exactly the stored K axes (no batch axes) and writes x's free
    axes then N's in stored order: a function of x giving ``(transpose of x putting its free axes
    first and the K axes last in stored order, the free axes' shape)``; else None."""
    if "." in eqn or layout.batch:
        return None
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    if len(rhs) != len(layout.shape):
        return None
    k_letters = [rhs[p] for p in layout.perm[: layout.contracted]]
    n_letters = [rhs[p] for p in layout.perm[layout.contracted :]]
    free = [c for c in lhs if c not in rhs]
    if set(lhs) - set(free) != set(k_letters) or out != "".join(free + n_letters):
        return None
    order = tuple(lhs.index(c) for c in free + k_letters)
    return lambda x: (order, tuple(x.shape[lhs.index(c)] for c in free))
