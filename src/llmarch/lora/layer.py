"""``LoRAEinsum`` and ``QLoRAEinsum``: a frozen linear weight plus a trainable low-rank update.

A weight ``W [*shape]`` whose ``contracted`` axes (K) meet the input and whose other axes (N) are
outputs gets adapters ``A [*K, r]`` and ``B [r, *N]``; ``layer(eqn, x)`` computes

    eqn(x, W) + (alpha / r) · eqn(dropout(x), A·B)

where the second term runs as two contractions through the rank axis (``"BTD,DNH->BTNH"`` becomes
``"BTD,Dr->BTr"`` then ``"BTr,rNH->BTNH"``, as ``llmarch.lowrank`` runs its factors), so the
``[K, N]`` product never exists in a train step. ``LoRAEinsum`` is an ``Einsum`` (its ``w`` is the
base weight, at the same path, so a plain checkpoint's weights load into it unchanged);
``QLoRAEinsum`` is a ``QuantizedEinsum`` (QLoRA: the frozen base stored quantized).

The adapters are ``nnx.LoRAParam`` (flax's, a subclass of ``nnx.Param``): ``nnx.split(model,
nnx.LoRAParam, ...)`` selects exactly them, which is how the trainer gives the optimizer the
adapters alone. ``A`` starts from flax's LoRA initializer (He uniform over K), ``B`` from zeros.
A scanned run's adapters carry its leading layers axis, like every weight of the run.

Dropout is on only inside ``dropout_key(key)`` (the train step enters it; evaluation and inference
never do). Each adapter holds ``lora_seed``, an int32 per layer (a non-trainable variable), folded
into the step's key so every layer and weight draws its own mask even inside a scan.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.layers.einsum import Einsum, contract, param
from llmarch.lowrank.layer import factor_product, split_equation
from llmarch.quant.linear import QuantizedEinsum

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout", default=None)


class LoRASeed(nnx.Variable):
    """An adapter's dropout seed per layer: state, neither trained nor a weight."""


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
    """LoRA dropout on, drawn from ``key`` (typed or raw key data), while tracing inside this block;
    None leaves it off."""
    if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class _Adapters:
    """The adapter half shared by ``LoRAEinsum`` and ``QLoRAEinsum`` (mixed into an nnx.Module)."""

    def _init_adapters(
        self,
        *,
        shape: tuple[int, ...],
        names: tuple[str | None, ...],
        contracted: tuple[int, ...],
        layers: tuple[int, ...],
        rank: int,
        alpha: float,
        dropout: float,
        seed: int,
        rngs: nnx.Rngs,
        param_dtype: Any,
    ) -> None:
        self.shape, self.contracted = tuple(shape), tuple(contracted)
        self.lora_scale, self.lora_dropout = float(alpha) / rank, float(dropout)
        n_axes = tuple(i for i in range(len(shape)) if i not in self.contracted)
        k_dims = tuple(shape[i] for i in self.contracted)
        n_dims = tuple(shape[i] for i in n_axes)
        if rank > min(math.prod(k_dims), math.prod(n_dims)):
            raise ValueError(
                f"LoraConfig.rank={rank} is invalid for a weight {shape} (K={math.prod(k_dims)}, "
                f"N={math.prod(n_dims)}): must be at most min(K, N)"
            )
        stacked = (axes.LAYERS,) * len(layers)
        init_a = nnx.nn.lora.default_a_initializer  # flax's: He uniform over the input (K)
        a = jax.vmap(lambda key: init_a(key, (math.prod(k_dims), rank), param_dtype))(
            jax.random.split(rngs.params(), math.prod(layers))
        )  # [L·, K, r]: each layer's fan-in is its own K
        a = a.reshape(*layers, *k_dims, rank)
        b = jnp.zeros((*layers, rank, *n_dims), param_dtype)
        self.lora_a = param(a, (*stacked, *(names[i] for i in self.contracted), None), kind=nnx.LoRAParam)
        self.lora_b = param(b, (*stacked, None, *(names[i] for i in n_axes)), kind=nnx.LoRAParam)
        seeds = seed + jnp.arange(math.prod(layers), dtype=jnp.int32).reshape(layers)
        self.lora_seed = LoRASeed(seeds, out_sharding=stacked, eager_sharding=False) if dropout else None

    @property
    def rank(self) -> int:
        return self.lora_a[...].shape[-1]

    def delta_weight(self) -> jax.Array:
        """``(alpha/r)·A·B`` in the base weight's shape and axis order (``[*lead, *shape]``), float32."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return self.lora_scale * factor_product(a, b, self.shape, self.contracted)

    def delta(self, eqn: str, x: jax.Array) -> jax.Array:
        """``(alpha/r) · eqn(dropout(x), A·B)``, through the rank axis when ``eqn`` splits."""
        key = _DROPOUT_KEY.get()
        if key is not None and self.lora_dropout > 0:
            key = jax.random.fold_in(key, self.lora_seed[...])
            keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), jnp.zeros_like(x))
        plan = split_equation(eqn, self.shape, self.contracted, tuple(x.shape), self.rank)
        if plan is None:  # an equation two contractions cannot split: the product, contracted once
            return contract(eqn, x, self.delta_weight().astype(x.dtype))
        first, second, a_first = plan
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        y = (
            contract(second, contract(first, x, a), b)
            if a_first
            else contract(second, contract(first, x, b), a)
        )
        return y * jnp.asarray(self.lora_scale, y.dtype)


class LoRAEinsum(Einsum, _Adapters):
    """A frozen ``Einsum`` weight ``w`` (the base's own variable) with adapters; see the module
    docstring.

    Args:
      base: the ``Einsum`` to adapt; its weight is kept, not copied.
      contracted: the axes of one layer's weight that the input contracts (K), increasing.
      lead: 0, or 1 for a weight of a run of stacked layers.
      rank, alpha, dropout: as ``LoraConfig``'s.
      seed: the first of this weight's dropout seeds (one per layer from it).
      rngs: draws ``A``.
    """

    def __init__(
        self,
        base: Einsum,
        *,
        contracted: tuple[int, ...],
        lead: int,
        rank: int,
        alpha: float,
        dropout: float,
        seed: int,
        rngs: nnx.Rngs,
    ):
        self.w = base.w
        value = base.w[...]
        names = tuple(base.w.get_metadata().get("out_sharding") or (None,) * value.ndim)[lead:]
        self._init_adapters(
            shape=value.shape[lead:],
            names=names,
            contracted=contracted,
            layers=value.shape[:lead],
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            seed=seed,
            rngs=rngs,
            param_dtype=value.dtype,
        )

    def weight(self) -> jax.Array:
        """The merged weight ``W + (alpha/r)·A·B``, in the base weight's dtype."""
        w = self.w[...]
        return (w.astype(jnp.float32) + self.delta_weight()).astype(w.dtype)

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return super().__call__(eqn, x) + self.delta(eqn, x)


class QLoRAEinsum(QuantizedEinsum, _Adapters):
    """A frozen quantized weight (the base's own ``q``/``scale``/``zero`` variables) with float
    adapters: QLoRA. Arguments as ``LoRAEinsum``'s; ``param_dtype`` is the adapters' dtype."""

    def __init__(
        self,
        base: QuantizedEinsum,
        *,
        lead: int,
        rank: int,
        alpha: float,
        dropout: float,
        seed: int,
        rngs: nnx.Rngs,
        param_dtype: Any,
    ):
        for name in ("layout", "bits", "group_size", "kind", "matrix_shape", "q", "scale", "zero"):
            setattr(self, name, getattr(base, name))
        layout = base.layout
        if layout.batch:
            raise ValueError("a quantized weight with batch axes (MoE experts) cannot take adapters")
        self._init_adapters(
            shape=layout.shape,
            names=layout.names,
            contracted=tuple(sorted(layout.perm[: layout.contracted])),
            layers=base.q[...].shape[:lead],
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            seed=seed,
            rngs=rngs,
            param_dtype=param_dtype,
        )

    def weight(self) -> jax.Array:
        """One layer's merged weight, float32: what a caller that reads the weight itself (the
        fused loss's LM head) must see."""
        return super().weight() + self.delta_weight()

    def merged_weight(self) -> jax.Array:
        """The dequantized base plus ``(alpha/r)·A·B``, float32 ``[*lead, *shape]``."""
        stored = self._stacked()
        if stored[0].ndim == len(self.matrix_shape):  # one layer (or an unstacked model)
            return self.weight()
        base = jax.vmap(lambda s: _dequantized(self, s))(stored)  # a scanned run's [L, *shape]
        return base + self.delta_weight()

    def _stacked(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        return self.q[...], self.scale[...], None if self.zero is None else self.zero[...]

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return super().__call__(eqn, x) + self.delta(eqn, x)


def _dequantized(layer: QuantizedEinsum, arrays: tuple) -> jax.Array:
    """One layer's dequantized weight from its ``(q, scale, zero)`` slices."""
    from llmarch.quant.tensor import QuantizedTensor, dequantize

    q, scale, zero = arrays
    qt = QuantizedTensor(q, scale, zero, layer.bits, layer.group_size, layer.kind, layer.matrix_shape)
    return layer.layout.from_matrix(dequantize(qt))
