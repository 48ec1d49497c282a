"""Parameter and FLOP accounting from a config alone (no arrays are built).

Training FLOPs per token follow Kaplan et al. (2020) and PaLM (Chowdhery et al. 2022,
appendix B): ``6·N_matmul`` for the weight matmuls (forward 2, backward 4 per weight) plus
``12·L·N_heads·H·S`` for the attention scores and weighted sums over ``S`` keys.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from llmarch.config import MEMORY_SKIP_KINDS, BlockConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    embedding: int  # the input table [V,D]
    lm_head: int  # the output projection [D,V]; 0 when tied to the embedding
    attention: int  # all layers
    ffn: int  # all layers
    norms: int  # all layers plus the final norm
    memory: int = 0  # memory layers (PKM/UltraMem): FFN "pkm" blocks and memory skip modules

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.ffn + self.norms + self.memory

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


def _ffn_params(cfg: ModelConfig, kinds: BlockConfig, *, active: bool = False) -> int:
    """One block's FFN parameters; ``active``: only those one token uses (MoE: the k routed
    experts, not all E)."""
    if kinds.ffn == "swiglu":  # gate, up [D,F] and down [F,D]
        return 3 * cfg.d_model * cfg.ffn_dim
    if kinds.ffn == "moe":  # router [D,E], routed experts 3·D·F each, shared experts 3·D·F_shared
        m, D = cfg.moe, cfg.d_model
        routed = m.top_k if active else m.num_experts
        return D * m.num_experts + routed * 3 * D * m.expert_dim + 3 * D * m.shared_dim
    if kinds.ffn == "pkm":  # a memory layer: counted in ParamCounts.memory
        return 0
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
        memory=memory_params(cfg),
    )


def active_param_counts(cfg: ModelConfig) -> ParamCounts:
    """The parameters one token activates: as ``param_counts``, but an MoE FFN counts its router,
    shared experts and ``top_k`` of its routed experts (the convention of Mixtral's 12.9B of 46.7B
    and DeepSeek-V3's 37B of 671B; embeddings and lm_head included)."""
    blocks = cfg.layer_blocks
    return dataclasses.replace(param_counts(cfg),
                               ffn=sum(_ffn_params(cfg, b, active=True) for b in blocks),
                               memory=memory_params(cfg, active=True))


def active_param_count(cfg: ModelConfig) -> int:
    return active_param_counts(cfg).total


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
    norms; a tied embedding still costs its output matmul; of MoE layers, the activated weights.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    counts = active_param_counts(cfg)  # an MoE token multiplies by its k experts only
    matmul = counts.attention + counts.ffn + counts.memory + cfg.d_model * cfg.vocab_size
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


# -- memory layers (PKM / UltraMem) ---------------------------------------------------------------


def _memory_layers(cfg: ModelConfig) -> tuple[int, int]:
    """``(blocks, skips)``: the model's ``"pkm"`` FFN blocks and its memory skip-layer modules."""
    skips = len(cfg.skip_layers) if cfg.skip_kind in MEMORY_SKIP_KINDS else 0
    return sum(b.ffn == "pkm" for b in cfg.layer_blocks), skips


def _memory_params(cfg: ModelConfig, *, skip: bool, active: bool) -> int:
    """One memory layer (``llmarch.layers.memory``); ``active``: the value rows one token reads
    (heads × top-m) instead of the whole table. Queries, keys, cores and projections count whole:
    every token multiplies by all of them (the keys too: each query is scored against all 2·P)."""
    m, D = cfg.memory, cfg.d_model
    Z, U, W = max(m.tucker_rank, 1), m.width(D), m.virtual_blocks
    rows = min(m.reads_per_token, m.physical_rows) if active else m.physical_rows
    return (2 * D * m.num_heads * m.key_dim + 2 * m.key_dim  # W_q row/col, query LayerNorm
            + 2 * m.num_heads * m.num_keys * Z * m.key_dim + (2 * m.key_dim if m.key_norm else 0)
            + (m.num_cores * m.num_heads * Z * Z if m.tucker_rank else 0)
            + rows * U
            + (D * W * U if m.gate else 0) + (W * U * D if m.output_proj else 0)
            + (D if skip else 0))  # a skip-layer memory's own RMSNorm


def memory_params(cfg: ModelConfig, *, active: bool = False) -> int:
    """All memory layers' parameters (``ParamCounts.memory``); ``active``: per token."""
    if cfg.memory is None:
        return 0
    blocks, skips = _memory_layers(cfg)
    return (blocks * _memory_params(cfg, skip=False, active=active)
            + skips * _memory_params(cfg, skip=True, active=active))


@dataclasses.dataclass(frozen=True)
class DecodeTraffic:
    """Bytes one decoding step reads for a batch of B sequences (one new token each).

    ``dense``: weights every step reads whatever B is (attention, dense FFNs, norms, the logits'
    matrix, MoE routers and shared experts, memory queries/keys/cores/projections) plus the B
    embedding rows; ``sparse``: the expected MoE experts or memory value rows the batch touches;
    ``kv_cache``: the cache of ``context_len`` positions per sequence.
    """

    dense: float
    sparse: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.dense + self.sparse + self.kv_cache


def _distinct(n: int, draws: float, p: float) -> float:
    """Expected distinct items among ``n`` when each of ``draws`` independent draws picks a given
    item with probability ``p``: ``n·(1 − (1 − p)^draws)``."""
    return n * (1.0 - (1.0 - p) ** draws)


def expected_distinct_experts(num_experts: int, top_k: int, batch: int | np.ndarray) -> np.ndarray:
    """``E·(1 − (1 − k/E)^B)``: distinct experts that B tokens activate under uniform routing."""
    return _distinct(num_experts, np.asarray(batch, np.float64), top_k / num_experts)


def expert_bytes_read(distinct: float | np.ndarray, d_model: int, expert_dim: int,
                      bytes_per_param: int) -> float | np.ndarray:
    """``U·3·D·F·bytes``: routed-expert weights a decode step must read for ``U`` distinct experts."""
    return distinct * 3 * d_model * expert_dim * bytes_per_param


def decode_traffic(cfg: ModelConfig, batch_size: int, *, context_len: int = 0,
                   dtype: str | None = None) -> DecodeTraffic:
    """The decode-step traffic model (UltraMem's Figure 1c argument, from the config alone).

    Routing and memory picks are assumed uniform and independent: an MoE layer's batch touches
    ``E·(1 − (1 − k/E)^B)`` experts of ``3·D·F`` weights each; a memory layer's touches
    ``M·(1 − (1 − 1/M)^{B·J})`` ≈ ``B·J`` value rows of ``U`` numbers (J = heads × top-m), so its
    sparse bytes grow with the batch, an MoE's with the experts woken up. Weights in ``dtype``
    (default ``cfg.dtype``), the KV cache too.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive integer")
    nbytes = jnp.dtype(dtype or cfg.dtype).itemsize
    D, B = cfg.d_model, batch_size
    counts = param_counts(cfg)
    dense = counts.attention + counts.norms + D * cfg.vocab_size + B * D  # + the B embedding rows
    sparse = 0.0
    for kinds in cfg.layer_blocks:
        if kinds.ffn == "moe":
            m = cfg.moe
            dense += D * m.num_experts + 3 * D * m.shared_dim
            sparse += _distinct(m.num_experts, B, m.top_k / m.num_experts) * 3 * D * m.expert_dim
        elif kinds.ffn != "pkm":
            dense += _ffn_params(cfg, kinds)
    blocks, skips = _memory_layers(cfg)
    for skip in [False] * blocks + [True] * skips:
        m = cfg.memory
        U, M = m.width(D), m.physical_rows
        dense += _memory_params(cfg, skip=skip, active=True) - min(m.reads_per_token, M) * U
        sparse += _distinct(M, B * m.reads_per_token, 1.0 / M) * U
    kv = kv_cache_elements_per_token(cfg) * context_len * B
    return DecodeTraffic(dense=dense * nbytes, sparse=sparse * nbytes, kv_cache=kv * nbytes)
