"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016), computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.layers.einsum import param


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis; statistics in float32, output in x's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), (axes.NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # Llama casts back before scaling; doing the same keeps bf16 parity with transformers.
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32 (returns float32), scale initialized to a constant."""

    def __init__(
        self, dim: int, *, scale_init: float, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32
    ):
        self.eps = eps
        self.scale = param(jnp.full((dim,), scale_init, param_dtype), (axes.NORM,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axes.NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
