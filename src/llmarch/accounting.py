"""Parameter and FLOP accounting from a config alone (no arrays are built).

Training FLOPs per token follow Kaplan et al. (2020) and PaLM (Chowdhery et al. 2022,
appendix B): ``6·N_matmul`` for the weight matmuls (forward 2, backward 4 per weight) plus
``12·L·N_heads·H·S`` for the attention scores and weighted sums over ``S`` keys.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmarch.config import BlockConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    embedding: int  # the input table [V,D]
    lm_head: int  # the output projection [D,V]; 0 when tied to the embedding
    attention: int  # all layers
    ffn: int  # all layers
    norms: int  # all layers plus the final norm

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.ffn + self.norms

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head


def _attention_params(cfg: ModelConfig, kinds: BlockConfig) -> int:
    a = cfg.attention
    if kinds.attention == "mha":  # q and o: D·N·H each; k and v: D·K·H each
        return 2 * cfg.d_model * a.num_heads * a.head_dim + 2 * cfg.d_model * a.num_kv_heads * a.head_dim
    if kinds.attention == "mla":  # the latent norms (Q and A scales) are counted here too
        m, D = cfg.mla, cfg.d_model
        N, A, R, H, Hv = m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        q = D * N * (H + R) if m.q_lora_rank is None else (
            D * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * N * (H + R))  # W_DQ, norm, W_UQ|W_QR
        kv = D * A + A + D * R + A * N * (H + Hv)  # W_DKV, norm, W_KR, W_UK|W_UV
        return q + kv + N * Hv * D  # + W_O
    raise ValueError(f"attention={kinds.attention!r} has no parameter count yet")


def _ffn_params(cfg: ModelConfig, kinds: BlockConfig) -> int:
    if kinds.ffn == "swiglu":  # gate, up [D,F] and down [F,D]
        return 3 * cfg.d_model * cfg.ffn_dim
    raise ValueError(f"ffn={kinds.ffn!r} has no parameter count yet")


def param_counts(cfg: ModelConfig) -> ParamCounts:
    blocks = cfg.layer_blocks
    V, D = cfg.vocab_size, cfg.d_model
    return ParamCounts(
        embedding=V * D,
        lm_head=0 if cfg.tie_embeddings else D * V,
        attention=sum(_attention_params(cfg, b) for b in blocks),
        ffn=sum(_ffn_params(cfg, b) for b in blocks),
        norms=(2 * len(blocks) + 1) * D,
    )


def param_count(cfg: ModelConfig) -> int:
    return param_counts(cfg).total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
    """Training FLOPs per token of ``QKᵀ`` and ``PV``: ``12·N·H·S_eff`` per layer.

    ``S_eff`` is the keys a query sees: ``seq_len`` by PaLM's convention (``causal=False``),
    or the causal average ``(seq_len+1)/2``; a sliding window caps it.
    """
    a = cfg.attention
    seen = (seq_len + 1) / 2 if causal else seq_len
    total = 0.0
    for kinds in cfg.layer_blocks:
        if kinds.attention == "mla":  # naive path: QKᵀ over H+R dims, PV over H_v
            m = cfg.mla
            total += 6.0 * m.num_heads * (m.qk_head_dim + m.v_head_dim) * seen
        else:
            window = seen if a.sliding_window is None else min(seen, a.sliding_window)
            total += 12.0 * a.num_heads * a.head_dim * window
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, causal: bool = False) -> float:
    """``6·N_matmul + attention`` FLOPs to train on one token of a ``seq_len`` sequence.

    ``N_matmul`` counts every weight that enters a matmul: all but the embedding lookup and
    norms; a tied embedding still costs its output matmul.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    counts = param_counts(cfg)
    matmul = counts.attention + counts.ffn + cfg.d_model * cfg.vocab_size
    return 6.0 * matmul + attention_flops_per_token(cfg, seq_len, causal=causal)


def kv_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Numbers a decoding cache holds per token, summed over layers (DeepSeek-V2, Table 1).

    MHA ``2·N·H`` per layer, GQA ``2·K·H``, MQA ``2·H`` (all ``"mha"`` blocks, through
    ``num_kv_heads``); MLA ``A + R`` (``d_c + d_h^R``: the latent ``c_KV`` and the shared ``k_R``).
    """
    total = 0
    for kinds in cfg.layer_blocks:
        if kinds.attention == "mha":
            total += 2 * cfg.attention.num_kv_heads * cfg.attention.head_dim
        elif kinds.attention == "mla":
            total += cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        else:
            raise ValueError(f"attention={kinds.attention!r} has no KV-cache size yet")
    return total


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of decoding cache per token over all layers, in ``dtype`` (default ``cfg.dtype``)."""
    return kv_cache_elements_per_token(cfg) * jnp.dtype(dtype or cfg.dtype).itemsize


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the hardware's peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops!r} is invalid: must be > 0")
    return tokens_per_second * flops_per_token / peak_flops
