"""Multi-head latent attention (MLA) of DeepSeek-V2 (arXiv 2405.04434) and DeepSeek-V3 (2412.19437).

Keys and values are compressed into one latent per token, ``c_KV = RMSNorm(W_DKV h)`` (width A =
``kv_lora_rank``), plus one RoPE key shared by all heads, ``k_R = RoPE(W_KR h)`` (width R). The
decoding cache holds only these two: ``A + R`` numbers per token and layer (576 at the V2/V3
shapes) where MHA with 128 heads of 128 holds 32,768.

One set of weights, two ways to attend (``MLAConfig.path``, overridable per call):

- **naive** expands the latent into per-head keys ``k_C = W_UK c_KV`` and values ``v = W_UV c_KV``
  and runs ordinary multi-head attention over ``[k_C; k_R]``. Cheapest for training and prefill,
  where every key is new anyway.
- **absorbed** never expands the cache. Since ``q_C·k_C = (W_UKᵀ q_C)·c_KV``, the query is
  projected into the latent space once per token (``W_UK`` folded into the query) and
  ``softmax(·) V = W_UV (softmax(·) c_KV)`` (``W_UV`` folded into the output): attention becomes
  MQA with one KV head ``[c_KV; k_R]`` of width ``A + R`` whose first A columns are also the
  values. A decode step then reads ``S·(A+R)`` cache numbers instead of building ``S·N·(2H+R)``.
- **auto** takes whichever needs fewer multiply-adds for the call's ``T`` queries over ``S`` keys
  (``choose_path``): absorbed for decoding, naive for training and prefill.

Decoupled RoPE is what makes absorption possible: RoPE on ``k_C`` would put a position-dependent
rotation between ``W_UK`` and ``c_KV``. Both paths call ``llmarch.ops.attention``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes, ops
from llmarch import ring_attention as ring
from llmarch.checks import check_layer
from llmarch.layers import kv_quant
from llmarch.layers.cache import LatentCacheLike, ReadableLatentCache
from llmarch.layers.configs import MLA_PATHS, MLAConfig
from llmarch.layers.einsum import Einsum
from llmarch.layers.norms import RMSNorm
from llmarch.layers.rope import (
    apply_rope,
    inverse_frequencies,
    yarn_inverse_frequencies,
    yarn_mscale,
    yarn_rope_factor,
)

# DeepSeek's q_a_layernorm and kv_a_layernorm are built with their class default eps, not with
# the model's rms_norm_eps (both in DeepSeek's reference code and in transformers).
LATENT_NORM_EPS = 1e-6


def softmax_scale(m: MLAConfig) -> float:
    """``1/sqrt(H + R)``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN (DeepSeek-V2/V3)."""
    scale = m.qk_head_dim**-0.5
    s = m.rope_scaling
    if s is not None and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def check_path(path: str) -> str:
    if path not in MLA_PATHS:
        raise ValueError(f"path={path!r} is invalid: must be one of {MLA_PATHS}")
    return path


def choose_path(m: MLAConfig, num_queries: int, num_keys: int) -> str:
    """The cheaper path for ``T`` queries over ``S`` keys, by multiply-adds per head.

    naive builds ``k_C, v`` for all S keys (``S·A·(H+H_v)``) and attends over ``H+R`` / ``H_v``;
    absorbed maps the T queries and outputs through ``W_UK, W_UV`` (``T·A·(H+H_v)``) and attends
    over ``A+R`` / ``A``. So absorbed wins iff ``A·(H+H_v)·(S-T) > T·S·(2A-H-H_v)``: always when
    decoding (S >> T, e.g. T < 170 at the V3 shapes), never without a cache (S = T) unless
    ``2A < H + H_v``.
    """
    A, H, Hv = m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim
    T, S = num_queries, num_keys
    return "absorbed" if A * (H + Hv) * (S - T) > T * S * (2 * A - H - Hv) else "naive"


class MLA(nnx.Module):
    """MLA with DeepSeek's weights, in the axis alphabet (H: ``qk_nope_head_dim`` for q/k and
    ``v_head_dim`` for values; Q, A, R: query rank, KV rank, RoPE dim):

    - queries: ``w_down_q_dq [D,Q]`` (W^DQ), ``q_norm [Q]``, ``w_uq_qnh [Q,N,H]``, ``w_qr_qnr [Q,N,R]``; with
      ``q_lora_rank=None`` instead ``w_q_dnh [D,N,H]``, ``w_qr_dnr [D,N,R]``;
    - keys/values: ``w_dkv_da [D,A]``, ``kv_norm [A]``, ``w_uk_anh [A,N,H]``, ``w_uv_anh [A,N,H]``,
      ``w_kr_dr [D,R]``;
    - output: ``w_o_nhd [N,H,D]``.
    """

    def __init__(
        self,
        d_model: int,
        cfg: MLAConfig,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
    ):
        check_layer("MLA", cfg, MLAConfig, d_model=d_model, init_std=init_std, param_dtype=param_dtype)
        m = cfg
        D, N, A, R = d_model, m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim
        H, Hv = m.qk_nope_head_dim, m.v_head_dim
        pd = jnp.dtype(param_dtype)

        def weight(shape, names):
            return Einsum(shape, names, rngs=rngs, init=nnx.initializers.normal(init_std), param_dtype=pd)

        E, NH, HD = axes.EMBED, axes.HEADS, axes.HEAD_DIM
        if m.q_lora_rank is not None:
            Q = m.q_lora_rank
            self.w_down_q_dq = weight((D, Q), (E, axes.Q_LATENT))
            self.q_norm = RMSNorm(Q, eps=LATENT_NORM_EPS, param_dtype=pd)
            self.w_uq_qnh = weight((Q, N, H), (axes.Q_LATENT, NH, HD))
            self.w_qr_qnr = weight((Q, N, R), (axes.Q_LATENT, NH, HD))
        else:
            self.w_q_dnh = weight((D, N, H), (E, NH, HD))
            self.w_qr_dnr = weight((D, N, R), (E, NH, HD))
        self.w_dkv_da = weight((D, A), (E, axes.LATENT))
        self.kv_norm = RMSNorm(A, eps=LATENT_NORM_EPS, param_dtype=pd)
        self.w_uk_anh = weight((A, N, H), (axes.LATENT, NH, HD))
        self.w_uv_anh = weight((A, N, Hv), (axes.LATENT, NH, HD))
        self.w_kr_dr = weight((D, R), (E, HD))
        self.w_o_nhd = weight((N, Hv, D), (NH, HD, E))
        self.config, self.impl = m, impl  # static: part of the graphdef

    @staticmethod
    def init_cache(
        cfg: MLAConfig, batch_size: int, max_len: int, dtype: jnp.dtype
    ) -> MLACache | QuantizedMLACache:
        """An empty latent cache: slot ``s`` will hold ``c_KV`` and ``k_R`` of position ``s``;
        quantized (``QuantizedMLACache``) when ``dtype`` is int8 or float8_e4m3fn."""
        m = cfg
        if kv_quant.is_quantized(dtype):
            scales = jnp.ones((batch_size, max_len, 1), kv_quant.SCALE_DTYPE)  # [B,S,1]
            return QuantizedMLACache(
                jnp.zeros((batch_size, max_len, m.kv_lora_rank), dtype),
                jnp.zeros((batch_size, max_len, m.qk_rope_head_dim), dtype),
                scales,
                scales,
            )
        return MLACache(
            c_kv=jnp.zeros((batch_size, max_len, m.kv_lora_rank), dtype),  # [B,S,A]
            k_r=jnp.zeros((batch_size, max_len, m.qk_rope_head_dim), dtype),
        )  # [B,S,R]

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: LatentCacheLike | None = None,
        *,
        path: str | None = None,
    ) -> tuple[jax.Array, LatentCacheLike | None]:
        """Attends ``x [B,T,D]`` at ``positions [B,T]``; returns ``(out [B,T,D], cache)``.

        As ``Attention``: with a cache, the tokens' ``c_KV, k_R`` are first written to the slots
        of their positions, then the queries attend over all slots (causality on slot positions
        hides the unwritten ones). ``path`` overrides ``MLAConfig.path`` for this call. Under a
        mesh that splits the sequence over ``context`` both paths attend as a ring (through
        ``ops.attention``); a cache there is a ``ValueError``.
        """
        ring.check_no_cache(cache, "MLA")
        m = self.config
        path = check_path(m.path if path is None else path)
        inv_freq = (
            inverse_frequencies(m.qk_rope_head_dim, m.rope_theta)
            if m.rope_scaling is None
            else yarn_inverse_frequencies(m.qk_rope_head_dim, m.rope_theta, m.rope_scaling)
        )
        mscale = yarn_rope_factor(m.rope_scaling)
        if m.q_lora_rank is not None:
            c_q = self.q_norm(self.w_down_q_dq("BTD,DQ->BTQ", x))  # [B,T,Q]
            q_c = self.w_uq_qnh("BTQ,QNH->BTNH", c_q)  # [B,T,N,H]
            q_r = self.w_qr_qnr("BTQ,QNR->BTNR", c_q)  # [B,T,N,R]
        else:
            q_c = self.w_q_dnh("BTD,DNH->BTNH", x)
            q_r = self.w_qr_dnr("BTD,DNR->BTNR", x)
        q_r = apply_rope(q_r, positions, inv_freq) * mscale
        c_kv = self.kv_norm(self.w_dkv_da("BTD,DA->BTA", x))  # [B,T,A]
        k_r = self.w_kr_dr("BTD,DR->BTR", x)[:, :, None, :]  # [B,T,1,R]: one head for all
        k_r = (apply_rope(k_r, positions, inv_freq) * mscale)[:, :, 0, :]  # [B,T,R]
        kv_positions, scale = positions, softmax_scale(m)
        num_keys = x.shape[1]
        if cache is not None:  # any LatentCacheLike (layers/cache.py): contiguous or paged
            cache = cache.write(positions, c_kv, k_r)
            num_keys = cache.num_slots or num_keys
            segment_ids = None  # a cache holds one sequence per row
        if path == "auto":
            path = choose_path(m, x.shape[1], num_keys)
        if cache is not None and path == "naive" and not isinstance(cache, ReadableLatentCache):
            path = "absorbed"  # a paged latent cache is only read in the latent space (FlashMLA)
        if cache is not None and path == "naive":
            c_kv, k_r, kv_positions = cache.read(x.dtype)  # [B,S,A], [B,S,R], [B,S]
        mask = dict(
            q_positions=positions,
            kv_positions=kv_positions,
            q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            causal=True,
            scale=scale,
        )
        if cache is not None:
            attend_latent = functools.partial(
                cache.attend_latent, positions=positions, scale=scale, impl=self.impl
            )
        else:
            attend_latent = functools.partial(latent_attention, c_kv=c_kv, k_r=k_r, mask=mask, impl=self.impl)
        with jax.named_scope(f"mla_{path}"):
            if path == "naive":
                out = self._naive(q_c, q_r, c_kv, k_r, mask)
            else:
                out = self._absorbed(q_c, q_r, attend_latent)
        return self.w_o_nhd("BTNH,NHD->BTD", out), cache

    def _naive(self, q_c, q_r, c_kv, k_r, mask) -> jax.Array:
        """Per-head keys and values from the latent, then multi-head attention: ``[B,T,N,H_v]``."""
        k_c = self.w_uk_anh("BSA,ANH->BSNH", c_kv)  # [B,S,N,H]
        v = self.w_uv_anh("BSA,ANH->BSNH", c_kv)  # [B,S,N,H_v]
        k_r = jnp.broadcast_to(k_r[:, :, None, :], (*k_c.shape[:3], k_r.shape[-1]))  # [B,S,N,R]
        q = jnp.concatenate([q_c, q_r], axis=-1)  # [B,T,N,H+R]
        k = jnp.concatenate([k_c, k_r], axis=-1)  # [B,S,N,H+R]
        # ops.attention takes one head dim for q, k and v: zero-pad the narrower side (zeros add
        # nothing to q·k, and padded value columns are sliced off).
        width = max(q.shape[-1], v.shape[-1])

        def pad(a):
            return jnp.pad(a, ((0, 0),) * 3 + ((0, width - a.shape[-1]),))

        out = ops.attention(pad(q), pad(k), pad(v), impl=self.impl, **mask)
        return out[..., : v.shape[-1]]  # [B,T,N,H_v]

    def _absorbed(self, q_c, q_r, attend_latent) -> jax.Array:
        """Attention in the latent space: ``attend_latent(q_latent, q_rope) -> [B,T,N,A]`` (MQA
        over ``[c_KV; k_R]``, a cache's or this call's own); returns ``[B,T,N,H_v]``."""
        q_a = self.w_uk_anh("BTNH,ANH->BTNA", q_c)  # W_UK folded into the query: [B,T,N,A]
        o_a = attend_latent(q_a, q_r)  # [B,T,N,A]
        return self.w_uv_anh("BTNA,ANH->BTNH", o_a)  # W_UV folded into the output: [B,T,N,H_v]


def latent_attention(
    q_latent: jax.Array, q_rope: jax.Array, *, c_kv: jax.Array, k_r: jax.Array, mask: dict, impl=None
) -> jax.Array:
    """Absorbed MLA as MQA over one KV head ``[c_KV; k_R]``: ``[B,T,N,A]`` latent outputs.

    ``q_latent [B,T,N,A]``, ``q_rope [B,T,N,R]``, ``c_kv [B,S,A]``, ``k_r [B,S,R]``; ``mask``
    holds ``ops.attention``'s position, segment and scale arguments.
    """
    A = c_kv.shape[-1]
    q = jnp.concatenate([q_latent, q_rope], axis=-1)  # [B,T,N,A+R]
    kv = jnp.concatenate([c_kv, k_r], axis=-1)[:, :, None, :]  # [B,S,1,A+R]: one KV head
    # The values are the keys' first A columns (c_KV): pass kv as both and drop the R columns.
    return ops.attention(q, kv, kv, impl=impl, **mask)[..., :A]  # [B,T,N,A]


class MLACache(NamedTuple):
    """One layer's latent cache, slot ``s`` holding position ``s``: ``c_kv [B,S,A]`` (normalized)
    and ``k_r [B,S,R]`` (rotated, YaRN-scaled).

    Neither field has a head axis and both are indexed by slot, so a paged cache is the same two
    arrays as ``[pages, page_size, ·]`` pools with one page table: gather a row's pages, pass
    their positions as ``kv_positions``, and either path attends unchanged.
    """

    c_kv: jax.Array
    k_r: jax.Array

    # A ReadableLatentCache (layers/cache.py): the LatentCacheLike MLA relies on, plus ``read``
    # for the naive path (``llmarch.layers.paged`` has a paged one without ``read``,
    # which is always attended in the latent space).

    @property
    def num_slots(self) -> int:
        return self.c_kv.shape[-2]  # [..., S, A], with or without a leading layers axis

    def read(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(c_kv [B,S,A], k_r [B,S,R], kv_positions [B,S])`` in ``dtype``: slot s is position s."""
        kv_positions = jnp.broadcast_to(jnp.arange(self.c_kv.shape[1]), self.c_kv.shape[:2])
        return self.c_kv.astype(dtype), self.k_r.astype(dtype), kv_positions

    def attend_latent(
        self, q_latent: jax.Array, q_rope: jax.Array, *, positions: jax.Array, scale: float, impl=None
    ) -> jax.Array:
        """Absorbed attention of ``q_latent [B,T,N,A]``, ``q_rope [B,T,N,R]`` at ``positions``
        over every slot (causality hides unwritten ones): ``[B,T,N,A]``."""
        c_kv, k_r, kv_positions = self.read(q_latent.dtype)
        mask = dict(q_positions=positions, kv_positions=kv_positions, causal=True, scale=scale)
        return latent_attention(q_latent, q_rope, c_kv=c_kv, k_r=k_r, mask=mask, impl=impl)

    def write(self, positions: jax.Array, c_kv: jax.Array, k_r: jax.Array) -> MLACache:
        """Stores ``c_kv [B,T,A]``, ``k_r [B,T,R]`` at the slots ``positions [B,T]``."""
        rows = jnp.arange(c_kv.shape[0])[:, None]  # [B,1]
        return MLACache(
            c_kv=self.c_kv.at[rows, positions].set(c_kv.astype(self.c_kv.dtype)),
            k_r=self.k_r.at[rows, positions].set(k_r.astype(self.k_r.dtype)),
        )


class QuantizedMLACache(NamedTuple):
    """``MLACache`` stored quantized (``llmarch.layers.kv_quant``): ``c_kv [B,S,A]`` and
    ``k_r [B,S,R]`` int8 or float8_e4m3fn with ``c_kv_scale, k_r_scale [B,S,1]`` float32, one
    scale per token's latent and RoPE key. Reads (both paths) see the dequantized cache."""

    c_kv: jax.Array
    k_r: jax.Array
    c_kv_scale: jax.Array
    k_r_scale: jax.Array

    @property
    def num_slots(self) -> int:
        return self.c_kv.shape[-2]

    def dequantized(self, dtype) -> MLACache:
        return MLACache(
            kv_quant.dequantize(self.c_kv, self.c_kv_scale, dtype),
            kv_quant.dequantize(self.k_r, self.k_r_scale, dtype),
        )

    def read(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """As ``MLACache.read``, dequantized."""
        return self.dequantized(dtype).read(dtype)

    def attend_latent(
        self, q_latent: jax.Array, q_rope: jax.Array, *, positions: jax.Array, scale: float, impl=None
    ) -> jax.Array:
        """As ``MLACache.attend_latent``, over the dequantized cache."""
        return self.dequantized(q_latent.dtype).attend_latent(
            q_latent, q_rope, positions=positions, scale=scale, impl=impl
        )

    def write(self, positions: jax.Array, c_kv: jax.Array, k_r: jax.Array) -> QuantizedMLACache:
        """Stores ``c_kv [B,T,A]``, ``k_r [B,T,R]`` quantized at the slots ``positions [B,T]``."""
        rows = jnp.arange(c_kv.shape[0])[:, None]  # [B,1]
        (qc, sc), (qr, sr) = kv_quant.quantize(c_kv, self.c_kv.dtype), kv_quant.quantize(k_r, self.k_r.dtype)
        return QuantizedMLACache(
            c_kv=self.c_kv.at[rows, positions].set(qc),
            k_r=self.k_r.at[rows, positions].set(qr),
            c_kv_scale=self.c_kv_scale.at[rows, positions].set(sc),
            k_r_scale=self.k_r_scale.at[rows, positions].set(sr),
        )
