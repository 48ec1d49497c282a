"""Token embedding, optionally tied to the output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.layers.einsum import param


class Embed(nnx.Module):
    """``table [V,D]``: ``encode`` looks tokens up, ``attend`` scores hidden states against it."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        init = nnx.initializers.normal(init_std)
        self.table_vd = param(
            init(rngs.params(), (vocab_size, d_model), param_dtype), (axes.VOCAB, axes.EMBED)
        )

    def table(self) -> jax.Array:
        """The ``[V,D]`` table (a quantized model's ``QuantizedEmbed`` dequantizes it here)."""
        return self.table_vd[...]

    def encode(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.table_vd[...], tokens, axis=0).astype(dtype)  # [B,T,D]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", x, self.table_vd[...].astype(x.dtype))
