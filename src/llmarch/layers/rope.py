"""Rotary position embeddings (Su et al. 2021) with Llama-3 and YaRN frequency scaling.

The rotate-half layout (first and second halves of the head dim form the pairs) is the one
`transformers` Llama checkpoints use, so their q/k weights load without permutation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmarch.layers.configs import RopeScaling, YarnScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """``[H/2]`` inverse frequencies ``theta^(-2i/H)``, optionally Llama-3 scaled."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    # Llama 3.1: wavelengths longer than the original context divided by `factor`, shorter
    # than original/high_freq_factor kept, and a smooth interpolation in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature ``0.1·mscale·ln(factor) + 1`` (1 without extension)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inverse_frequencies(dim: int, theta: float, s: YarnScaling) -> np.ndarray:
    """``[dim/2]`` YaRN inverse frequencies: interpolated by ``factor`` below the ``beta_slow``
    rotation count, kept above ``beta_fast``, with a linear ramp between (DeepSeek, transformers).
    """
    base = inverse_frequencies(dim, theta).astype(np.float64)  # theta^(-2i/dim)

    def correction_dim(rotations: float) -> float:  # the dim index that turns `rotations` times
        return (
            dim
            * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return (base / s.factor * (1 - keep) + base * keep).astype(np.float32)


def yarn_rope_factor(s: YarnScaling | None) -> float:
    """YaRN's scale of the rotary ``cos/sin`` (so of the rotated q and k); 1 without YaRN."""
    if s is None:
        return 1.0
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor, 1.0)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x [B,T,N,H]`` by angles ``positions [B,T] * inv_freq [H/2]`` (float32 math)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B,T,1,H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B,T,N,H/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
