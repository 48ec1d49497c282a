"""Frozen configuration dataclasses, validated on construction, with a JSON round trip.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the
field, the value and what is allowed, before any array is built or anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

from llmarch.json_config import build as _build

# The kinds a block may use. Later layers register here (e.g. "mla", "moe", "pkm").
ATTENTION_KINDS = ("mha", "mla")  # "mha" covers MHA, GQA and MQA through num_kv_heads.
FFN_KINDS = ("swiglu", "moe", "pkm")
SKIP_KINDS = ("swiglu", "pkm", "ultramem")  # modules that skip-layer spans may hold
MEMORY_SKIP_KINDS = ("pkm", "ultramem")  # the skip kinds that are memory layers (need ``memory``)
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
IMPLS = ("auto", "xla", "pallas")
# How an MLA layer attends: expand per-head K/V ("naive"), attend in the latent space with W_UK and
# W_UV folded into the query and output ("absorbed"), or choose by cost per call ("auto").
MLA_PATHS = ("naive", "absorbed", "auto")


def _fail(owner: str, field: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ValueError(f"{owner}.{field}={value!r} is invalid: {allowed}")


def check_number(owner: str, field: str, value: Any, allowed: str,
                 ok: typing.Callable[[float], bool]) -> None:
    """A float field must be a real, finite number for which ``ok`` holds. NaN fails every
    comparison, so a check such as ``value < 0`` alone would let it through."""
    if isinstance(value, bool) or not isinstance(value, int | float):  # JSON-able, unlike np.float32
        _fail(owner, field, value, "must be a Python int or float")
    if not math.isfinite(value) or not ok(value):
        _fail(owner, field, value, allowed)


INT32_MAX = 2**31 - 1  # step counters and schedules run as int32 on device


def check_int(owner: str, field: str, value: Any, *, low: int = 1, high: int = INT32_MAX) -> None:
    """A Python integer field (JSON-able, unlike a numpy integer) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(owner, field, value, "must be a Python int")
    if not low <= value <= high:
        _fail(owner, field, value, f"must be an integer in [{low}, {high}]")


def _positive(owner: str, **fields: Any) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            _fail(owner, name, value, "must be a positive integer")


def _choice(owner: str, field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(owner, field, value, f"must be one of {allowed}")


def _sub_config(field: str, value: Any, cls: type, article: str, used_by: str | None, *,
                unused: str) -> None:
    """``ModelConfig.<field>`` must be a ``cls`` exactly when some part of the model (``used_by``,
    None when nothing) needs it; ``unused`` says why it must be None otherwise."""
    if value is not None and not isinstance(value, cls):
        _fail("ModelConfig", field, value, f"must be {article} {cls.__name__} or None")
    if used_by and value is None:
        _fail("ModelConfig", field, None, f"must be {article} {cls.__name__}: {used_by}")
    if value is not None and not used_by:
        _fail("ModelConfig", field, f"<{cls.__name__}>", f"must be None: {unused}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (``rope_type="llama3"`` in transformers)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor < 1.0:
            _fail("RopeScaling", "factor", self.factor, "must be >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            _fail(
                "RopeScaling",
                "low_freq_factor",
                self.low_freq_factor,
                f"must satisfy 0 < low_freq_factor < high_freq_factor={self.high_freq_factor}",
            )
        _positive("RopeScaling", original_max_position_embeddings=self.original_max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Multi-head attention with ``num_kv_heads`` groups: MHA (K=N), GQA (1<K<N), MQA (K=1)."""

    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # a query sees at most this many keys, itself included

    def __post_init__(self):
        _positive("AttentionConfig", num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                  head_dim=self.head_dim)
        if self.num_heads % self.num_kv_heads:
            _fail("AttentionConfig", "num_kv_heads", self.num_kv_heads,
                  f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            _fail("AttentionConfig", "head_dim", self.head_dim, "must be even for RoPE")
        if not self.rope_theta > 0:
            _fail("AttentionConfig", "rope_theta", self.rope_theta, "must be > 0")
        if self.sliding_window is not None:
            _positive("AttentionConfig", sliding_window=self.sliding_window)

    @property
    def groups(self) -> int:  # G = N / K
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (Peng et al. 2023) as DeepSeek-V2/V3 configure it (``rope_type="yarn"``).

    ``mscale`` and ``mscale_all_dim`` follow transformers' semantics, 0 meaning unset: the
    rotary ``cos/sin`` are scaled by ``m(factor, mscale) / m(factor, mscale_all_dim)`` when both
    are set (else by ``m(factor, 1)``), and the softmax scale by ``m(factor, mscale_all_dim)^2``
    when ``mscale_all_dim`` is set, with ``m(s, k) = 0.1·k·ln(s) + 1``.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        if not self.factor >= 1.0:
            _fail("YarnScaling", "factor", self.factor, "must be >= 1")
        _positive("YarnScaling", original_max_position_embeddings=self.original_max_position_embeddings)
        if not 0 < self.beta_slow <= self.beta_fast:
            _fail("YarnScaling", "beta_slow", self.beta_slow,
                  f"must satisfy 0 < beta_slow <= beta_fast={self.beta_fast}")
        for name in ("mscale", "mscale_all_dim"):
            if not getattr(self, name) >= 0:
                _fail("YarnScaling", name, getattr(self, name), "must be >= 0 (0 means unset)")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434; DeepSeek-V3, 2412.19437).

    Queries: ``c_Q = RMSNorm(W_DQ h)`` [Q], then per head ``q_C = W_UQ c_Q`` [H] and
    ``q_R = RoPE(W_QR c_Q)`` [R]; ``q_lora_rank=None`` projects ``h`` directly (DeepSeek-V2-Lite).
    Keys/values: ``c_KV = RMSNorm(W_DKV h)`` [A], ``k_C = W_UK c_KV``, ``v = W_UV c_KV``, and one
    RoPE key shared by all heads ``k_R = RoPE(W_KR h)`` [R]. A decoding cache holds only
    ``c_KV`` and ``k_R``. ``path`` picks how the layer attends (see ``MLA_PATHS``).
    """

    num_heads: int  # N
    kv_lora_rank: int  # A, d_c in the paper
    qk_nope_head_dim: int  # H of q_C and k_C, d_h
    qk_rope_head_dim: int  # R, d_h^R
    v_head_dim: int  # H of the values
    q_lora_rank: int | None = None  # Q, d_c'; None: no query compression
    rope_theta: float = 10_000.0
    rope_scaling: YarnScaling | None = None
    path: str = "auto"

    def __post_init__(self):
        _positive("MLAConfig", num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank,
                  qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                  v_head_dim=self.v_head_dim)
        if self.q_lora_rank is not None:
            _positive("MLAConfig", q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            _fail("MLAConfig", "qk_rope_head_dim", self.qk_rope_head_dim, "must be even for RoPE")
        if not self.rope_theta > 0:
            _fail("MLAConfig", "rope_theta", self.rope_theta, "must be > 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
            _fail("MLAConfig", "rope_scaling", self.rope_scaling, "must be a YarnScaling or None")
        _choice("MLAConfig", "path", self.path, MLA_PATHS)

    @property
    def qk_head_dim(self) -> int:  # the width that scores are taken over: H + R
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def mha_baseline(self) -> AttentionConfig:
        """The MHA that DeepSeek-V2's Table 1 compares MLA with: N heads of ``qk_nope_head_dim``.

        An all-MLA ModelConfig carries it as ``attention`` (which only "mha" blocks use), so that
        accounting can set MLA's cache against the MHA of the same heads.
        """
        return AttentionConfig(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                               head_dim=self.qk_nope_head_dim, rope_theta=self.rope_theta)


# Mixture of experts (llmarch.layers.moe): how a token's affinities to the experts are scored, and
# how the routed expert FFNs are computed (all on one set of weights).
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_STRATEGIES = ("dropless", "capacity", "dense")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts FFN: E routed SwiGLU experts of width ``expert_dim``, k per token.

    Routing (``router``): ``"softmax"`` scores ``s = softmax(logits)`` (Mixtral: with ``norm_topk``
    the gates are the softmax over the k selected logits); ``"sigmoid"`` scores ``s = σ(logits)``
    (DeepSeek-V3). The k experts are the top-k of ``s + b`` where ``b`` is the per-expert bias
    (``router_bias``; zero-initialized, non-trainable), restricted to the ``topk_group`` best of
    ``n_group`` expert groups (a group scores by the sum of its two best ``s + b``); the gates come
    from the unbiased ``s``, renormalized over the k when ``norm_topk``, times ``route_scale``.
    ``num_shared_experts`` experts (one SwiGLU of width ``num_shared_experts·expert_dim``) see every
    token. Which layers are MoE is ``ModelConfig.blocks`` (``moe_blocks`` builds DeepSeek's
    ``first_k_dense_replace`` layout).

    Balancing: ``aux_loss_coef`` (Switch/GShard batch-wise loss ``α·Σ_i f_i·P_i``),
    ``seq_aux_loss_coef`` (DeepSeek-V3's sequence-wise loss), ``z_loss_coef`` (ST-MoE router
    z-loss), and ``bias_update_rate`` γ (DeepSeek-V3's auxiliary-loss-free balancing: after each
    train step ``b_i += γ·sign(mean load − load_i)``; needs ``router_bias``).

    Compute (``strategy``): ``"dropless"`` sorts token copies by expert and runs grouped matmuls;
    ``"capacity"`` gives each expert ``ceil(capacity_factor·n·k/E)`` slots (n tokens) and drops (and counts)
    the rest; ``"dense"`` runs every expert on every token (a reference for tests). Under a mesh
    whose ``expert`` axis has size > 1 the experts are sharded and tokens travel by all-to-all
    (``llmarch.layers.moe_parallel``), in ``ep_chunks`` pipelined chunks (1: no overlap).
    """

    num_experts: int  # E
    top_k: int  # k
    expert_dim: int  # F of one routed expert (moe_intermediate_size)
    num_shared_experts: int = 0
    router: str = "softmax"
    norm_topk: bool = True
    route_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias b_i
    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # γ
    strategy: str = "dropless"
    capacity_factor: float = 1.25
    ep_chunks: int = 1

    def __post_init__(self):
        _positive("MoEConfig", num_experts=self.num_experts, top_k=self.top_k,
                  expert_dim=self.expert_dim, n_group=self.n_group, topk_group=self.topk_group,
                  ep_chunks=self.ep_chunks)
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
            _fail("MoEConfig", "num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        _choice("MoEConfig", "router", self.router, MOE_ROUTERS)
        _choice("MoEConfig", "strategy", self.strategy, MOE_STRATEGIES)
        if self.top_k > self.num_experts:
            _fail("MoEConfig", "top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            _fail("MoEConfig", "n_group", self.n_group,
                  f"must divide num_experts={self.num_experts} (experts are split into equal groups)")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            _fail("MoEConfig", "n_group", self.n_group,
                  f"must leave >= 2 experts per group (a group scores by its top 2); "
                  f"num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            _fail("MoEConfig", "topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        reachable = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > reachable:
            _fail("MoEConfig", "top_k", self.top_k,
                  f"must be <= topk_group·num_experts/n_group={reachable}, the experts routing can reach")
        if not self.route_scale > 0:
            _fail("MoEConfig", "route_scale", self.route_scale, "must be > 0")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                _fail("MoEConfig", name, getattr(self, name), "must be >= 0")
        if self.bias_update_rate > 0 and not self.router_bias:
            _fail("MoEConfig", "bias_update_rate", self.bias_update_rate,
                  "must be 0 unless router_bias=True (the bias it updates)")
        if not self.capacity_factor > 0:
            _fail("MoEConfig", "capacity_factor", self.capacity_factor, "must be > 0")

    @property
    def shared_dim(self) -> int:  # F of the shared experts together
        return self.num_shared_experts * self.expert_dim


MEMORY_SCORES = ("softmax", "raw")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """A product-key memory layer: PKM (Lample et al. 2019, arXiv 1907.05242) and UltraMem
    (Huang et al., ICLR 2025, arXiv 2411.12364), each UltraMem part switchable (``llmarch.layers.memory``).

    Keys: ``num_keys`` (P) row and P column sub-keys per head over a grid of ``P²`` slots; a token
    reads ``topk`` (m) slots per head, ``num_heads·topk`` rows of the value table in all.
    ``tucker_rank`` r = 0 scores a slot PKM's way, ``s_row[i] + s_col[j]``; r >= 1 is TDQKR, the
    grid score ``S_row C S_colᵀ`` with ``num_cores`` (h) Tucker cores ``C_c [r,r]``, candidates by the
    leading singular vectors of ``ΣC_c``, and the aux loss ``aux_alpha·mean(relu(σ_{2..r} − aux_tau)²)``.
    ``num_cores`` > 1 is multi-core scoring (MCS): a value row is h chunks, chunk c scaled by core c's
    score. ``virtual_blocks`` (W) > 1 is implicit value expansion (IVE): the P² grid slots are W
    virtual blocks over ``P²/W`` physical rows through a fixed random permutation, pooled per block
    and projected. ``score="raw"`` uses the scores as weights (UltraMem), ``"softmax"`` normalizes
    the m scores of a head (PKM). ``value_dim`` (None: d_model) with ``output_proj`` is UltraMem's
    halved value width and projection; ``gate`` is Memory+'s SiLU gate (Berges et al. 2024).
    ``value_lr``/``value_lr_final`` are the value table's learning-rate multiplier λ, decaying
    linearly from λ₀ = 4 to 1 in UltraMem (``llmarch.train.optim.model_lr_groups`` makes the
    optimizer's ``LrGroup``, which the trainer applies).
    """

    num_keys: int  # P
    topk: int  # m
    num_heads: int = 1  # memory heads
    key_dim: int = 32  # width of a query half and of a sub-key
    value_dim: int | None = None  # width of a value row; None: d_model
    score: str = "softmax"
    output_proj: bool = False
    gate: bool = False
    tucker_rank: int = 0  # r; 0: PKM's additive scoring
    num_cores: int = 1  # h
    virtual_blocks: int = 1  # W
    key_norm: bool = False  # LayerNorm on the keys too (the query always has one)
    value_init_std: float | None = None  # None: value_dim**-0.5 (Lample et al.)
    aux_alpha: float = 0.001
    aux_tau: float = 0.15
    value_lr: float = 1.0  # λ₀
    value_lr_final: float = 1.0

    def __post_init__(self):
        _positive("MemoryConfig", num_keys=self.num_keys, topk=self.topk, num_heads=self.num_heads,
                  key_dim=self.key_dim, num_cores=self.num_cores, virtual_blocks=self.virtual_blocks)
        if self.value_dim is not None:
            _positive("MemoryConfig", value_dim=self.value_dim)
        r = self.tucker_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            _fail("MemoryConfig", "tucker_rank", self.tucker_rank, "must be an integer >= 0 (0: PKM scoring)")
        if self.topk > self.num_keys:
            _fail("MemoryConfig", "topk", self.topk, f"must be <= num_keys={self.num_keys} (m <= P)")
        _choice("MemoryConfig", "score", self.score, MEMORY_SCORES)
        if self.num_cores > 1 and self.tucker_rank == 0:
            _fail("MemoryConfig", "num_cores", self.num_cores,
                  "must be 1 with tucker_rank=0: multi-core scoring needs TDQKR cores (tucker_rank >= 1)")
        if self.num_cores > 1 and self.score != "raw":
            _fail("MemoryConfig", "score", self.score,
                  f"must be 'raw' with num_cores={self.num_cores}: each core's score scales its chunk")
        if self.num_keys ** 2 % self.virtual_blocks:
            _fail("MemoryConfig", "virtual_blocks", self.virtual_blocks,
                  f"must divide the num_keys²={self.num_keys ** 2} grid slots")
        if self.virtual_blocks > 1 and not self.output_proj:
            _fail("MemoryConfig", "output_proj", self.output_proj,
                  f"must be True with virtual_blocks={self.virtual_blocks}: IVE projects each block")
        if self.value_init_std is not None and not self.value_init_std > 0:
            _fail("MemoryConfig", "value_init_std", self.value_init_std, "must be > 0 or None")
        for name in ("aux_alpha", "aux_tau"):
            if not getattr(self, name) >= 0:
                _fail("MemoryConfig", name, getattr(self, name), "must be >= 0")
        for name in ("value_lr", "value_lr_final"):
            if not getattr(self, name) > 0:
                _fail("MemoryConfig", name, getattr(self, name), "must be > 0")

    @property
    def num_slots(self) -> int:  # the P² grid (virtual slots with IVE)
        return self.num_keys ** 2

    @property
    def physical_rows(self) -> int:  # rows of the value table
        return self.num_keys ** 2 // self.virtual_blocks

    @property
    def reads_per_token(self) -> int:  # value rows one token reads: heads × m
        return self.num_heads * self.topk

    def width(self, d_model: int) -> int:  # the value row width
        return d_model if self.value_dim is None else self.value_dim


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Which attention and which FFN one decoder block uses."""

    attention: str = "mha"
    ffn: str = "swiglu"

    def __post_init__(self):
        _choice("BlockConfig", "attention", self.attention, ATTENTION_KINDS)
        _choice("BlockConfig", "ffn", self.ffn, FFN_KINDS)


def moe_blocks(num_layers: int, first_k_dense_replace: int = 0,
               attention: str = "mha") -> tuple[BlockConfig, ...]:
    """DeepSeek's layout: the first ``first_k_dense_replace`` blocks dense SwiGLU, the rest MoE."""
    if not 0 <= first_k_dense_replace <= num_layers:
        _fail("moe_blocks", "first_k_dense_replace", first_k_dense_replace,
              f"must be in [0, num_layers={num_layers}]")
    return tuple(BlockConfig(attention=attention, ffn="swiglu" if i < first_k_dense_replace else "moe")
                 for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    ``blocks`` gives each layer's kinds; ``None`` means ``num_layers`` default blocks. Runs of
    identical consecutive blocks are stacked and scanned, so compile time stays flat in depth.
    """

    vocab_size: int  # V
    d_model: int  # D
    num_layers: int  # L
    ffn_dim: int  # F
    attention: AttentionConfig
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    blocks: tuple[BlockConfig, ...] | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    logits_dtype: str = "float32"  # the output's dtype; the loss upcasts to float32 anyway
    remat: str = "none"
    impl: str = "auto"  # kernel implementation for every op, see llmarch.ops
    init_std: float = 0.02
    name: str = "custom"
    mla: MLAConfig | None = None  # used by the blocks whose attention is "mla"
    moe: MoEConfig | None = None  # used by the blocks whose ffn is "moe"
    memory: MemoryConfig | None = None  # ffn "pkm" blocks; skip_kind "pkm"/"ultramem"
    # Skip-layer modules (UltraMem's wiring): for each (i, j), a module of kind `skip_kind`
    # reads the residual stream entering block i and adds its output to the stream leaving
    # block j (i <= j). Spans may not overlap.
    skip_layers: tuple[tuple[int, int], ...] = ()
    skip_kind: str | None = None

    def __post_init__(self):
        _positive("ModelConfig", vocab_size=self.vocab_size, d_model=self.d_model,
                  num_layers=self.num_layers, ffn_dim=self.ffn_dim, max_seq_len=self.max_seq_len)
        if not isinstance(self.attention, AttentionConfig):
            _fail("ModelConfig", "attention", self.attention, "must be an AttentionConfig")
        if not 0 < self.norm_eps < 1:
            _fail("ModelConfig", "norm_eps", self.norm_eps, "must be in (0, 1)")
        if not self.init_std > 0:
            _fail("ModelConfig", "init_std", self.init_std, "must be > 0")
        _choice("ModelConfig", "dtype", self.dtype, DTYPES)
        _choice("ModelConfig", "param_dtype", self.param_dtype, DTYPES)
        _choice("ModelConfig", "logits_dtype", self.logits_dtype, DTYPES)
        _choice("ModelConfig", "remat", self.remat, REMAT_POLICIES)
        _choice("ModelConfig", "impl", self.impl, IMPLS)
        if self.blocks is not None:
            if not isinstance(self.blocks, tuple) or not all(
                isinstance(b, BlockConfig) for b in self.blocks
            ):
                _fail("ModelConfig", "blocks", self.blocks, "must be a tuple of BlockConfig or None")
            if len(self.blocks) != self.num_layers:
                _fail("ModelConfig", "blocks", f"<{len(self.blocks)} blocks>",
                      f"must have num_layers={self.num_layers} entries")
        _sub_config("mla", self.mla, MLAConfig, "an",
                    "blocks use attention 'mla'" if any(b.attention == "mla" for b in self.layer_blocks)
                    else None, unused="no block uses attention 'mla'")
        _sub_config("moe", self.moe, MoEConfig, "a",
                    "blocks use ffn 'moe'" if any(b.ffn == "moe" for b in self.layer_blocks) else None,
                    unused="no block uses ffn 'moe'")

        self._check_skip_layers()
        self._check_memory()

    def _check_skip_layers(self) -> None:
        if not isinstance(self.skip_layers, tuple):
            _fail("ModelConfig", "skip_layers", self.skip_layers, "must be a tuple of (i, j) pairs")
        for pair in self.skip_layers:
            if (not isinstance(pair, tuple) or len(pair) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
                _fail("ModelConfig", "skip_layers", pair, "each entry must be a pair of ints (i, j)")
            i, j = pair
            if not 0 <= i <= j < self.num_layers:
                _fail("ModelConfig", "skip_layers", pair,
                      f"needs 0 <= i <= j < num_layers={self.num_layers}")
        spans = sorted(self.skip_layers)
        for (i0, j0), (i1, j1) in zip(spans, spans[1:], strict=False):
            if i1 <= j0:
                _fail("ModelConfig", "skip_layers", self.skip_layers,
                      f"spans ({i0}, {j0}) and ({i1}, {j1}) overlap; they must be disjoint")
        if self.skip_layers and self.skip_kind not in SKIP_KINDS:
            _fail("ModelConfig", "skip_kind", self.skip_kind, f"must be one of {SKIP_KINDS} with skip_layers")
        if not self.skip_layers and self.skip_kind is not None:
            _fail("ModelConfig", "skip_kind", self.skip_kind, "must be None without skip_layers")

    def _check_memory(self) -> None:
        uses = ["ffn 'pkm' blocks"] if any(b.ffn == "pkm" for b in self.layer_blocks) else []
        if self.skip_kind in MEMORY_SKIP_KINDS:
            uses.append(f"skip_kind {self.skip_kind!r}")
        _sub_config("memory", self.memory, MemoryConfig, "a", f"the model has {uses[0]}" if uses else None,
                    unused="no block uses ffn 'pkm' and skip_kind is not 'pkm'/'ultramem'")
        if self.memory is None:
            return
        width = self.memory.width(self.d_model)
        if width % self.memory.num_cores:
            _fail("MemoryConfig", "value_dim", width,
                  f"must be divisible by num_cores={self.memory.num_cores} (MCS splits a value row "
                  "into one chunk per core); value_dim=None means d_model")
        if width != self.d_model and not self.memory.output_proj:
            _fail("MemoryConfig", "output_proj", False,
                  f"must be True when the value width {width} differs from d_model={self.d_model}")

    @property
    def layer_blocks(self) -> tuple[BlockConfig, ...]:
        return self.blocks if self.blocks is not None else (BlockConfig(),) * self.num_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # JSON round trip ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _build(cls, data, "ModelConfig")

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
