"""Multi-head attention with grouped KV heads: MHA (K=N), GQA (1<K<N) and MQA (K=1).

Causal, with an optional sliding window and segment ids so that packed documents do not
attend to each other. The score/softmax/value part goes through ``llmarch.ops``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes, ops
from llmarch.config import ModelConfig
from llmarch.layers.einsum import Einsum
from llmarch.layers.rope import apply_rope, inverse_frequencies


class Attention(nnx.Module):
    """``w_q_dnh [D,N,H]``, ``w_k_dkh, w_v_dkh [D,K,H]``, ``w_o_nhd [N,H,D]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        a = cfg.attention
        D, N, K, H = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
        init = nnx.initializers.normal(cfg.init_std)
        pd = jnp.dtype(cfg.param_dtype)
        self.w_q_dnh = Einsum((D, N, H), (axes.EMBED, axes.HEADS, axes.HEAD_DIM),
                              rngs=rngs, init=init, param_dtype=pd)
        self.w_k_dkh = Einsum((D, K, H), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                              rngs=rngs, init=init, param_dtype=pd)
        self.w_v_dkh = Einsum((D, K, H), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                              rngs=rngs, init=init, param_dtype=pd)
        self.w_o_nhd = Einsum((N, H, D), (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
                              rngs=rngs, init=init, param_dtype=pd)
        self.head_dim, self.rope_theta, self.rope_scaling = H, a.rope_theta, a.rope_scaling
        self.sliding_window = a.sliding_window
        self.impl = cfg.impl

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """``x [B,T,D]``, ``positions [B,T]``, ``segment_ids [B,T]`` (None: one document)."""
        inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # [H/2]
        q = apply_rope(self.w_q_dnh("BTD,DNH->BTNH", x), positions, inv_freq)
        k = apply_rope(self.w_k_dkh("BTD,DKH->BTKH", x), positions, inv_freq)
        v = self.w_v_dkh("BTD,DKH->BTKH", x)
        out = ops.attention(q, k, v, impl=self.impl, q_positions=positions, kv_positions=positions,
                            q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                            sliding_window=self.sliding_window)  # [B,T,N,H]
        return self.w_o_nhd("BTNH,NHD->BTD", out)
