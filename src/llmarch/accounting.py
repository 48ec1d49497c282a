"""Parameter and FLOP accounting from a config alone (no arrays are built).

Training FLOPs per token follow Kaplan et al. (2020) and PaLM (Chowdhery et al. 2022,
appendix B): ``6·N_matmul`` for the weight matmuls (forward 2, backward 4 per weight) plus
``12·L·N_heads·H·S`` for the attention scores and weighted sums over ``S`` keys.

Every per-kind formula (parameters, score FLOPs, cache elements, decode traffic) is declared with
its kind in ``llmarch.layers.kinds``; this module sums them over a config's layers. Weights stored
as low-rank factors (``ModelConfig.low_rank``, ``llmarch.lowrank``) count ``r·(K+N)`` per layer at
their stored rank r instead of ``K·N``, in parameters, FLOPs and decode traffic alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llmarch.checks import check_positive
from llmarch.config import ModelConfig
from llmarch.layers import kinds, kv_quant


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


def _ffn_like(cfg: ModelConfig) -> list[kinds.FFNKind]:
    """The FFN kind of every block, then the skip kind once per skip-layer span."""
    found = [kinds.ffn(b.ffn) for b in cfg.layer_blocks]
    return found + ([kinds.skip(cfg.skip_kind)] * len(cfg.skip_layers) if cfg.skip_layers else [])


def _ffn_and_memory(cfg: ModelConfig, *, active: bool) -> dict[str, int]:
    saved = low_rank_savings(cfg)  # factorized FFN/memory weights are dense ones: always active
    totals = {"ffn": -saved["ffn"], "memory": -saved["memory"]}
    for kind in _ffn_like(cfg):
        totals[kind.counted_as] += kind.params(cfg, active)
    return totals


def low_rank_savings(cfg: ModelConfig) -> dict[str, int]:
    """Parameters the low-rank factors save over their dense weights (``K·N − r·(K+N)`` per layer
    at the stored rank r; negative where factors are larger), by ``ParamCounts`` field."""
    saved = {"attention": 0, "ffn": 0, "memory": 0, "lm_head": 0}
    for w in cfg.low_rank or ():
        saved[w.counted_as] += w.params_saved
    return saved


def _output_matmul(cfg: ModelConfig) -> int:
    """Weights of the matmul to logits: ``D·V`` (a tied table too), less a factorized head's saving."""
    return cfg.d_model * cfg.vocab_size - low_rank_savings(cfg)["lm_head"]


def param_counts(cfg: ModelConfig) -> ParamCounts:
    blocks = cfg.layer_blocks
    V, D = cfg.vocab_size, cfg.d_model
    saved = low_rank_savings(cfg)
    return ParamCounts(
        embedding=V * D,
        lm_head=0 if cfg.tie_embeddings else D * V - saved["lm_head"],
        attention=sum(kinds.attention(b.attention).params(cfg) for b in blocks) - saved["attention"],
        norms=(2 * len(blocks) + 1) * D,
        **_ffn_and_memory(cfg, active=False),
    )


@dataclasses.dataclass(frozen=True)
class MTPParamCounts:
    """Parameters of the multi-token-prediction modules (``ModelConfig.mtp_depth``), all depths,
    apart from ``param_counts`` (the main model: DeepSeek-V3's 671B leaves them out).

    ``total`` is what the modules add to a model here: each depth's projection ``M_k`` ``[2D, D]``,
    its block's attention and FFN, and five norms (``enorm``, ``hnorm``, the block's two and the
    final norm before the shared head). The modules share the embedding and the output head with
    the main model, so those are counted there; DeepSeek's published checkpoint stores a copy of
    both in each MTP layer (``embed_tokens``, ``shared_head.head``), which ``published`` adds
    (``shared_copies``): its "14B" of MTP modules.
    """

    projection: int
    attention: int
    ffn: int  # the block's FFN (an MoE: every expert, as param_counts counts them)
    norms: int
    shared_copies: int  # a [V,D] embedding and a [D,V] head per depth (not built here)

    @property
    def total(self) -> int:
        return self.projection + self.attention + self.ffn + self.norms

    @property
    def published(self) -> int:
        return self.total + self.shared_copies


def mtp_param_counts(cfg: ModelConfig) -> MTPParamCounts:
    """The MTP modules' parameters (all zero for ``mtp_depth=0``); see ``MTPParamCounts``."""
    depth, D, V = cfg.mtp_depth, cfg.d_model, cfg.vocab_size
    block = cfg.mtp_block_config
    return MTPParamCounts(
        projection=depth * 2 * D * D,
        attention=depth * kinds.attention(block.attention).params(cfg),
        ffn=depth * kinds.ffn(block.ffn).params(cfg, False),
        norms=depth * 5 * D,
        shared_copies=depth * 2 * V * D,
    )


def active_param_counts(cfg: ModelConfig) -> ParamCounts:
    """The parameters one token activates: as ``param_counts``, but an MoE FFN counts its router,
    shared experts and ``top_k`` of its routed experts (the convention of Mixtral's 12.9B of 46.7B
    and DeepSeek-V3's 37B of 671B; embeddings and lm_head included), a memory layer the value rows
    one token reads."""
    return dataclasses.replace(param_counts(cfg), **_ffn_and_memory(cfg, active=True))


def active_param_count(cfg: ModelConfig) -> int:
    return active_param_counts(cfg).total


def param_count(cfg: ModelConfig) -> int:
    return param_counts(cfg).total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
    """Training FLOPs per token of ``QKᵀ`` and ``PV``: ``12·N·H·S_eff`` per layer.

    ``S_eff`` is the keys a query sees: ``seq_len`` by PaLM's convention (``causal=False``),
    or the causal average ``(seq_len+1)/2``; a sliding window caps it.
    """
    seen = (seq_len + 1) / 2 if causal else seq_len
    return sum(kinds.attention(b.attention).score_flops(cfg, seen) for b in cfg.layer_blocks)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, causal: bool = False) -> float:
    """``6·N_matmul + attention`` FLOPs to train on one token of a ``seq_len`` sequence.

    ``N_matmul`` counts every weight that enters a matmul: all but the embedding lookup and
    norms; a tied embedding still costs its output matmul; of MoE layers, the activated weights;
    a factorized weight, its factors ``r·(K+N)``.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    counts = active_param_counts(cfg)  # an MoE token multiplies by its k experts only
    matmul = counts.attention + counts.ffn + counts.memory + _output_matmul(cfg)
    return 6.0 * matmul + attention_flops_per_token(cfg, seq_len, causal=causal)


def kv_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Numbers a decoding cache holds per token, summed over layers (DeepSeek-V2, Table 1).

    MHA ``2·N·H`` per layer, GQA ``2·K·H``, MQA ``2·H`` (all ``"mha"`` blocks, through
    ``num_kv_heads``); MLA ``A + R`` (``d_c + d_h^R``: the latent ``c_KV`` and the shared ``k_R``).
    """
    return sum(kinds.attention(b.attention).kv_elements(cfg) for b in cfg.layer_blocks)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of decoding cache per token over all layers, in ``dtype`` (a float dtype or a
    ``kv_cache_dtype`` name; default ``cfg.dtype``).

    Read off the shapes of each kind's own (contiguous) cache for one token, so a quantized cache
    ("int8", "fp8_e4m3": ``llmarch.layers.kv_quant``) counts its float32 scales too, one per
    cached vector: GQA ``2·K·(H + 4)`` bytes per layer in int8, MLA ``A + R + 8``.
    """
    storage = kv_quant.storage_dtype("auto" if dtype is None else dtype, cfg.dtype, owner="")

    def layer_bytes(name: str) -> int:
        one = jax.eval_shape(lambda: kinds.attention(name).init_cache(cfg, 1, 1, storage))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(one))

    per_kind = {name: layer_bytes(name) for name in {b.attention for b in cfg.layer_blocks}}
    return sum(per_kind[b.attention] for b in cfg.layer_blocks)


def kv_page_bytes(cfg: ModelConfig, page_size: int, dtype: str | None = None) -> int:
    """Bytes of one cache page of ``page_size`` tokens over all layers (as ``kv_cache_bytes_per_token``)."""
    check_positive("", page_size=page_size)
    return page_size * kv_cache_bytes_per_token(cfg, dtype)


def pages_for_memory(cfg: ModelConfig, memory_bytes: int, page_size: int, dtype: str | None = None) -> int:
    """The pages a pool of ``memory_bytes`` holds: more as the cache dtype shrinks (int8 about
    4x float32's, less the scales)."""
    check_positive("", memory_bytes=memory_bytes)
    return memory_bytes // kv_page_bytes(cfg, page_size, dtype)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the hardware's peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops!r} is invalid: must be > 0")
    return tokens_per_second * flops_per_token / peak_flops


# -- memory layers (PKM / UltraMem) ---------------------------------------------------------------


def memory_params(cfg: ModelConfig, *, active: bool = False) -> int:
    """All memory layers' parameters (``ParamCounts.memory``); ``active``: per token."""
    return _ffn_and_memory(cfg, active=active)["memory"]


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


def expected_distinct_experts(num_experts: int, top_k: int, batch: int | np.ndarray) -> np.ndarray:
    """``E·(1 − (1 − k/E)^B)``: distinct experts that B tokens activate under uniform routing."""
    return kinds.expected_distinct(num_experts, np.asarray(batch, np.float64), top_k / num_experts)


def expert_bytes_read(
    distinct: float | np.ndarray, d_model: int, expert_dim: int, bytes_per_param: int
) -> float | np.ndarray:
    """``U·3·D·F·bytes``: routed-expert weights a decode step must read for ``U`` distinct experts."""
    return distinct * 3 * d_model * expert_dim * bytes_per_param


def decode_traffic(
    cfg: ModelConfig,
    batch_size: int,
    *,
    context_len: int = 0,
    dtype: str | None = None,
    kv_cache_dtype: str | None = None,
) -> DecodeTraffic:
    """The decode-step traffic model (UltraMem's Figure 1c argument, from the config alone).

    Routing and memory picks are assumed uniform and independent: an MoE layer's batch touches
    ``E·(1 − (1 − k/E)^B)`` experts of ``3·D·F`` weights each; a memory layer's touches
    ``M·(1 − (1 − 1/M)^{B·J})`` ≈ ``B·J`` value rows of ``U`` numbers (J = heads × top-m), so its
    sparse bytes grow with the batch, an MoE's with the experts woken up. Weights in ``dtype``
    (default ``cfg.dtype``); the KV cache in ``kv_cache_dtype`` (default: ``dtype``), whose
    quantized kinds count their scales (``kv_cache_bytes_per_token``).
    """
    check_positive("", batch_size=batch_size)
    nbytes = jnp.dtype(dtype or cfg.dtype).itemsize
    D, B = cfg.d_model, batch_size
    counts = param_counts(cfg)
    dense = counts.attention + counts.norms + _output_matmul(cfg) + B * D  # + the B embedding rows
    saved = low_rank_savings(cfg)
    dense -= saved["ffn"] + saved["memory"]  # factorized FFN/memory weights: read whole every step
    sparse = 0.0
    for kind in _ffn_like(cfg):
        kind_dense, kind_sparse = kind.traffic(cfg, B)
        dense += kind_dense
        sparse += kind_sparse
    kv = kv_cache_bytes_per_token(cfg, kv_cache_dtype or dtype) * context_len * B
    return DecodeTraffic(dense=dense * nbytes, sparse=sparse * nbytes, kv_cache=kv)


@dataclasses.dataclass(frozen=True)
class EPExchangeBytes:
    """Bytes of one device's dropless expert-parallel all-to-all buffers, for one MoE layer and one
    direction (the combine sends the same shapes back), ``n`` tokens per device, ``ep`` expert shards
    of ``E_l = E/ep`` experts (``llmarch.layers.moe_parallel`` / ``moe_ragged``)."""

    padded_send: int  # [E,C=n,D]: every expert a slot for each of the n tokens
    padded_recv: int  # [ep,E_l,n,D]: the same count of rows
    ragged_send: int  # [n·k,D]: exactly the routed copies
    ragged_recv_worst: int  # [ep·n·min(k,E_l),D]: the static buffer that is dropless for any routing
    ragged_recv_balanced: int  # [n·k,D]: what a device receives on average (perfect balance)


def ep_exchange_bytes(
    cfg: ModelConfig, tokens_per_device: int, ep: int, dtype: str = "bfloat16"
) -> EPExchangeBytes:
    """The padded and the ragged exchange's buffers for ``cfg``'s MoE at ``tokens_per_device`` and EP
    degree ``ep``, activations in ``dtype``. The padded path holds ``E/k`` times the routed rows on
    both sides; the ragged path sends exactly ``n·k`` rows, but a static receive buffer that never
    drops must hold ``ep·n·min(k,E_l)``: ``min(k,E_l)/E_l`` of the padded one, no saving once
    ``E_l <= k`` (a smaller ``recv_rows`` trades that for counted drops on overflow)."""
    check_positive("ep_exchange_bytes", tokens_per_device=tokens_per_device, ep=ep)
    if cfg.moe is None:
        raise ValueError("ep_exchange_bytes: cfg.moe is None: allowed: a config with MoE blocks")
    E, k, n = cfg.moe.num_experts, cfg.moe.top_k, tokens_per_device
    if E % ep:
        raise ValueError(f"ep_exchange_bytes: ep={ep} is invalid: must divide num_experts={E}")
    row = cfg.d_model * jnp.dtype(dtype).itemsize
    return EPExchangeBytes(
        padded_send=E * n * row,
        padded_recv=E * n * row,
        ragged_send=n * k * row,
        ragged_recv_worst=ep * n * min(k, E // ep) * row,
        ragged_recv_balanced=n * k * row,
    )
