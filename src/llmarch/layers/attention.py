"""Multi-head attention with grouped KV heads: MHA (K=N), GQA (1<K<N) and MQA (K=1).

Causal, with an optional sliding window and segment ids so that packed documents do not
attend to each other. The score/softmax/value part goes through ``llmarch.ops``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from llmarch import axes, ops, sharding
from llmarch import collective_matmul as cm
from llmarch import ring_attention as ring
from llmarch.checks import check_layer
from llmarch.layers import kv_quant
from llmarch.layers.cache import KVCacheLike
from llmarch.layers.configs import AttentionConfig
from llmarch.layers.einsum import Einsum, apply_shared
from llmarch.layers.norms import RMSNorm
from llmarch.layers.rope import apply_rope, inverse_frequencies


class Attention(nnx.Module):
    """``w_q_dnh [D,N,H]``, ``w_k_dkh, w_v_dkh [D,K,H]``, ``w_o_nhd [N,H,D]``."""

    def __init__(
        self,
        d_model: int,
        cfg: AttentionConfig,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
        collective_matmul: bool = False,
    ):
        check_layer(
            "Attention", cfg, AttentionConfig, d_model=d_model, init_std=init_std, param_dtype=param_dtype
        )
        if not isinstance(collective_matmul, bool):
            raise TypeError(f"Attention collective_matmul={collective_matmul!r} is invalid: must be a bool")
        self.collective_matmul = collective_matmul  # static: in the graphdef
        a = cfg
        D, N, K, H = d_model, a.num_heads, a.num_kv_heads, a.head_dim
        init = nnx.initializers.normal(init_std)
        pd = jnp.dtype(param_dtype)
        self.w_q_dnh = Einsum(
            (D, N, H), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), rngs=rngs, init=init, param_dtype=pd
        )
        self.w_k_dkh = Einsum(
            (D, K, H), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), rngs=rngs, init=init, param_dtype=pd
        )
        self.w_v_dkh = Einsum(
            (D, K, H), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), rngs=rngs, init=init, param_dtype=pd
        )
        self.w_o_nhd = Einsum(
            (N, H, D), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), rngs=rngs, init=init, param_dtype=pd
        )
        if a.qk_norm:  # Qwen3: per-head RMSNorm over H of q and k, before RoPE
            self.q_norm = RMSNorm(H, eps=a.qk_norm_eps, param_dtype=pd)
            self.k_norm = RMSNorm(H, eps=a.qk_norm_eps, param_dtype=pd)
        self.qk_norm = a.qk_norm
        self.head_dim, self.rope_theta, self.rope_scaling = H, a.rope_theta, a.rope_scaling
        self.sliding_window = a.sliding_window
        self.impl = impl

    @staticmethod
    def init_cache(
        cfg: AttentionConfig, batch_size: int, max_len: int, dtype: jnp.dtype
    ) -> KVCache | QuantizedKVCache:
        """An empty cache: slot ``s`` will hold the key and value of position ``s``; quantized
        (``QuantizedKVCache``) when ``dtype`` is int8 or float8_e4m3fn."""
        shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)  # [B,S,K,H]
        if kv_quant.is_quantized(dtype):
            scales = jnp.ones(kv_quant.scale_shape(shape), kv_quant.SCALE_DTYPE)  # [B,S,K,1]
            return QuantizedKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), scales, scales)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: KVCacheLike | None = None,
    ) -> tuple[jax.Array, KVCacheLike | None]:
        """Attends ``x [B,T,D]`` at ``positions [B,T]``; returns ``(out [B,T,D], cache)``.

        With no cache the tokens attend to each other (``segment_ids [B,T]`` separates packed
        documents). With a cache, their keys and values are first written to the slots of
        their positions, then the queries attend over the whole cache: causality on slot
        positions hides both the future and the slots not yet written.

        Under a mesh whose rules split the sequence over ``context``, ``ops.attention`` is ring
        attention (``llmarch.ring_attention``); a cache there is a ``ValueError``.

        With ``collective_matmul=True``, no cache, and rules that split the heads over a mesh axis
        of ``n > 1`` devices, the projections are collective matmuls (Megatron's sequence-parallel
        pattern, ``llmarch.collective_matmul``): ``x`` split ``n`` ways over the sequence,
        ``all_gather_matmul`` for q, k, v (``[B,T/n,D] -> [B,T,N/n,H]``), attention on the local
        heads, ``matmul_reduce_scatter`` for the output (``[B,T,N/n,H] -> [B,T/n,D]``).
        """
        ring.check_no_cache(cache, "Attention")
        inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # [H/2]
        axis = None
        if self.collective_matmul and cache is None:
            axis = cm.ring_axis("Attention", axes.HEADS)
        if axis is not None:
            q, k, v = self._gather_project(x, axis)
        else:
            projections = [(self.w_q_dnh, "BTD,DNH->BTNH"), (self.w_k_dkh, "BTD,DKH->BTKH")]
            projections.append((self.w_v_dkh, "BTD,DKH->BTKH"))
            q, k, v = apply_shared(x, projections)  # one CPU kernel call in a decode step
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None:
            out = ops.attention(
                q,
                k,
                v,
                impl=self.impl,
                q_positions=positions,
                kv_positions=positions,
                q_segment_ids=segment_ids,
                kv_segment_ids=segment_ids,
                causal=True,
                sliding_window=self.sliding_window,
            )  # [B,T,N,H]
        else:  # any KVCacheLike (layers/cache.py): contiguous here, paged in layers/paged.py
            cache = cache.write(positions, k, v)
            out = cache.attend(q, positions, impl=self.impl, sliding_window=self.sliding_window)
        if axis is not None:
            return self._scatter_project(out, axis), cache
        return self.w_o_nhd("BTNH,NHD->BTD", out), cache

    def _gather_project(self, x: jax.Array, axis: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q ``[B,T,N,H]``, k, v ``[B,T,K,H]``, heads split over ``axis``, from ``x [B,T,D]`` by
        one all-gather ring (x travels once; each step multiplies the chunk by all three)."""
        cm.check_sequence("Attention", axis, x.shape[1])
        layers = {"w_q_dnh": self.w_q_dnh, "w_k_dkh": self.w_k_dkh, "w_v_dkh": self.w_v_dkh}
        cm.check_plain("Attention", layers)
        batch = sharding.batch_axes(x.shape[0], axis)
        seq, heads = PartitionSpec(batch or None, axis), PartitionSpec(batch or None, None, axis)
        w = PartitionSpec(None, axis)  # [D,N/n,H] and [D,K/n,H]

        def project(x, w_q, w_k, w_v):  # x [B,T/n,D] -> [B,T,N/n,H], [B,T,K/n,H] x2
            return cm.all_gather_matmul(x, (w_q, w_k, w_v), axis, eqn="BTD,DNH->BTNH")

        run = jax.shard_map(
            project, in_specs=(seq, w, w, w), out_specs=(heads,) * 3, axis_names={axis, *batch}
        )
        weights = (layer.w[...].astype(x.dtype) for layer in layers.values())
        return run(sharding.constrain(x, cm.RESIDUAL), *weights)

    def _scatter_project(self, out: jax.Array, axis: str) -> jax.Array:
        """``[B,T,N,H]`` (heads split over ``axis``) -> ``[B,T,D]``, by one reduce-scatter ring."""
        cm.check_plain("Attention", {"w_o_nhd": self.w_o_nhd})
        batch = sharding.batch_axes(out.shape[0], axis)
        seq, heads = PartitionSpec(batch or None, axis), PartitionSpec(batch or None, None, axis)

        def project(o, w_o):  # o [B,T,N/n,H], w_o [N/n,H,D] -> [B,T/n,D]
            return cm.matmul_reduce_scatter(o, w_o, axis, eqn="BTNH,NHD->BTD")

        run = jax.shard_map(
            project, in_specs=(heads, PartitionSpec(axis)), out_specs=seq, axis_names={axis, *batch}
        )
        return sharding.constrain(run(out, self.w_o_nhd.w[...].astype(out.dtype)), cm.RESIDUAL)


class KVCache(NamedTuple):
    """Keys and values of one layer, ``[B,S,K,H]`` each, slot ``s`` holding position ``s``.

    The contiguous ``KVCacheLike`` (``layers/cache.py``, the protocol ``Attention`` relies on;
    ``llmarch.layers.paged`` has a paged one): ``write`` stores this call's keys and
    values, then ``attend`` attends over everything stored so far, causally by position;
    ``num_slots`` bounds the positions.
    """

    k: jax.Array
    v: jax.Array

    @property
    def num_slots(self) -> int:
        return self.k.shape[-3]  # [..., S, K, H], with or without a leading layers axis

    def attend(
        self, q: jax.Array, positions: jax.Array, *, impl=None, sliding_window: int | None = None
    ) -> jax.Array:
        """``q [B,T,N,H]`` at ``positions [B,T]`` over all slots: causality on slot positions
        hides both the future and the slots not yet written."""
        k, v = self.k.astype(q.dtype), self.v.astype(q.dtype)
        if impl in (None, "auto"):  # on CPU, the paged-attention kernel where it serves
            out = ops.contiguous_attention_cpu(q, k, v, positions, sliding_window=sliding_window)
            if out is not None:
                return out
        kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])  # [B,S]
        return ops.attention(
            q,
            k,
            v,
            impl=impl,
            q_positions=positions,
            kv_positions=kv_positions,
            causal=True,
            sliding_window=sliding_window,
        )

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Stores ``k, v [B,T,K,H]`` at the slots ``positions [B,T]`` (in range, checked by caller)."""
        rows = jnp.arange(k.shape[0])[:, None]  # [B,1]
        return KVCache(
            k=self.k.at[rows, positions].set(k.astype(self.k.dtype)),
            v=self.v.at[rows, positions].set(v.astype(self.v.dtype)),
        )


class QuantizedKVCache(NamedTuple):
    """``KVCache`` stored quantized (``llmarch.layers.kv_quant``): ``k, v [B,S,K,H]`` int8 or
    float8_e4m3fn, ``k_scale, v_scale [B,S,K,1]`` float32, one scale per token and KV head.

    ``write`` quantizes; ``attend`` attends over the dequantized cache, so its function is
    ``KVCache``'s over ``k * k_scale, v * v_scale``.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array

    @property
    def num_slots(self) -> int:
        return self.k.shape[-3]

    def dequantized(self, dtype) -> KVCache:
        return KVCache(
            kv_quant.dequantize(self.k, self.k_scale, dtype), kv_quant.dequantize(self.v, self.v_scale, dtype)
        )

    def attend(
        self, q: jax.Array, positions: jax.Array, *, impl=None, sliding_window: int | None = None
    ) -> jax.Array:
        """As ``KVCache.attend``, over the dequantized keys and values."""
        return self.dequantized(q.dtype).attend(q, positions, impl=impl, sliding_window=sliding_window)

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> QuantizedKVCache:
        """Stores ``k, v [B,T,K,H]`` quantized at the slots ``positions [B,T]``."""
        rows = jnp.arange(k.shape[0])[:, None]  # [B,1]
        (qk, sk), (qv, sv) = kv_quant.quantize(k, self.k.dtype), kv_quant.quantize(v, self.v.dtype)
        return QuantizedKVCache(
            k=self.k.at[rows, positions].set(qk),
            v=self.v.at[rows, positions].set(qv),
            k_scale=self.k_scale.at[rows, positions].set(sk),
            v_scale=self.v_scale.at[rows, positions].set(sv),
        )
