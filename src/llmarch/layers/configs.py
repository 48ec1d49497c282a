"""The layers' own configs: one frozen, validated dataclass per attention, FFN and memory kind.

A layer is built from its config and explicit dimensions (``MLA(d_model, MLAConfig(...), rngs=...)``),
so these live with the layers, not with the model; ``llmarch.config`` re-exports them beside
``ModelConfig``, which holds one of each for the blocks that use it.
"""

from __future__ import annotations

import dataclasses

from llmarch.checks import check_choice, check_int, check_number, check_positive, fail

# How an MLA layer attends: expand per-head K/V ("naive"), attend in the latent space with W_UK and
# W_UV folded into the query and output ("absorbed"), or choose by cost per call ("auto").
MLA_PATHS = ("naive", "absorbed", "auto")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (``rope_type="llama3"`` in transformers)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        check_number("RopeScaling", "factor", self.factor, "must be >= 1", lambda v: v >= 1.0)
        check_number("RopeScaling", "high_freq_factor", self.high_freq_factor, "must be > 0", lambda v: v > 0)
        check_number("RopeScaling", "low_freq_factor", self.low_freq_factor, "must be > 0", lambda v: v > 0)
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            fail(
                "RopeScaling",
                "low_freq_factor",
                self.low_freq_factor,
                f"must satisfy 0 < low_freq_factor < high_freq_factor={self.high_freq_factor}",
            )
        check_positive("RopeScaling", original_max_position_embeddings=self.original_max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Multi-head attention with ``num_kv_heads`` groups: MHA (K=N), GQA (1<K<N), MQA (K=1)."""

    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    # Qwen3's RMSNorm of each query and key head over H, after the projection and before RoPE. Its
    # eps is its own field, so that the layer needs nothing but this config (Qwen3 uses rms_norm_eps).
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6

    def __post_init__(self):
        check_positive(
            "AttentionConfig",
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )
        if not isinstance(self.qk_norm, bool):
            fail("AttentionConfig", "qk_norm", self.qk_norm, "must be True or False")
        check_number(
            "AttentionConfig", "qk_norm_eps", self.qk_norm_eps, "must be in (0, 1)", lambda v: 0 < v < 1
        )
        if self.num_heads % self.num_kv_heads:
            fail(
                "AttentionConfig",
                "num_kv_heads",
                self.num_kv_heads,
                f"must divide num_heads={self.num_heads}",
            )
        if self.head_dim % 2:
            fail("AttentionConfig", "head_dim", self.head_dim, "must be even for RoPE")
        check_number("AttentionConfig", "rope_theta", self.rope_theta, "must be > 0", lambda v: v > 0)
        if self.sliding_window is not None:
            check_positive("AttentionConfig", sliding_window=self.sliding_window)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            fail("AttentionConfig", "rope_scaling", self.rope_scaling, "must be a RopeScaling or None")

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
        check_number("YarnScaling", "factor", self.factor, "must be >= 1", lambda v: v >= 1.0)
        check_positive("YarnScaling", original_max_position_embeddings=self.original_max_position_embeddings)
        if not 0 < self.beta_slow <= self.beta_fast:
            fail(
                "YarnScaling",
                "beta_slow",
                self.beta_slow,
                f"must satisfy 0 < beta_slow <= beta_fast={self.beta_fast}",
            )
        for name in ("mscale", "mscale_all_dim"):
            check_number(
                "YarnScaling", name, getattr(self, name), "must be >= 0 (0 means unset)", lambda v: v >= 0
            )


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
        check_positive(
            "MLAConfig",
            num_heads=self.num_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )
        if self.q_lora_rank is not None:
            check_positive("MLAConfig", q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            fail("MLAConfig", "qk_rope_head_dim", self.qk_rope_head_dim, "must be even for RoPE")
        check_number("MLAConfig", "rope_theta", self.rope_theta, "must be > 0", lambda v: v > 0)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
            fail("MLAConfig", "rope_scaling", self.rope_scaling, "must be a YarnScaling or None")
        check_choice("MLAConfig", "path", self.path, MLA_PATHS)

    @property
    def qk_head_dim(self) -> int:  # the width that scores are taken over: H + R
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def mha_baseline(self) -> AttentionConfig:
        """The MHA that DeepSeek-V2's Table 1 compares MLA with: N heads of ``qk_nope_head_dim``.

        An all-MLA ModelConfig carries it as ``attention`` (which only "mha" blocks use), so that
        accounting can set MLA's cache against the MHA of the same heads.
        """
        return AttentionConfig(
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.qk_nope_head_dim,
            rope_theta=self.rope_theta,
        )


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
    ``ep_exchange`` picks the exchange: ``"padded"`` buffers of every expert shard's worst case
    (capacity buffers under ``"capacity"``), ``"ring"`` (the same buffers, the all-to-all decomposed
    into per-peer ``ppermute`` steps, each beside expert GEMMs independent of it: COMET-style
    overlap in the program; any strategy), ``"ragged"`` (``jax.lax.ragged_all_to_all``: only the
    routed rows move; dropless; TPU/GPU, not XLA:CPU), ``"emulated"`` (the ragged path over
    ``all_gather``, for CPU tests), or ``"auto"``: ragged on TPU/GPU with ``ep_chunks=1``, else
    padded (``llmarch.layers.moe_ragged``).
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
    ep_exchange: str = "auto"

    def __post_init__(self):
        check_positive(
            "MoEConfig",
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_dim=self.expert_dim,
            n_group=self.n_group,
            topk_group=self.topk_group,
            ep_chunks=self.ep_chunks,
        )
        check_int("MoEConfig", "num_shared_experts", self.num_shared_experts, low=0)
        check_choice("MoEConfig", "router", self.router, MOE_ROUTERS)
        check_choice("MoEConfig", "strategy", self.strategy, MOE_STRATEGIES)
        check_choice(
            "MoEConfig", "ep_exchange", self.ep_exchange, ("auto", "padded", "ring", "ragged", "emulated")
        )
        if self.ep_exchange in ("ring", "ragged", "emulated") and self.ep_chunks > 1:
            fail(
                "MoEConfig",
                "ep_exchange",
                self.ep_exchange,
                f"cannot run with ep_chunks={self.ep_chunks} (chunks pipeline the padded all-to-all; "
                "'ring' overlaps per peer instead); allowed with ep_chunks > 1: 'auto' or 'padded'",
            )
        if self.top_k > self.num_experts:
            fail("MoEConfig", "top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            fail(
                "MoEConfig",
                "n_group",
                self.n_group,
                f"must divide num_experts={self.num_experts} (experts are split into equal groups)",
            )
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            fail(
                "MoEConfig",
                "n_group",
                self.n_group,
                f"must leave >= 2 experts per group (a group scores by its top 2); "
                f"num_experts={self.num_experts}",
            )
        if self.topk_group > self.n_group:
            fail("MoEConfig", "topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        reachable = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > reachable:
            fail(
                "MoEConfig",
                "top_k",
                self.top_k,
                f"must be <= topk_group·num_experts/n_group={reachable}, the experts routing can reach",
            )
        check_number("MoEConfig", "route_scale", self.route_scale, "must be > 0", lambda v: v > 0)
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            check_number("MoEConfig", name, getattr(self, name), "must be >= 0", lambda v: v >= 0)
        if self.bias_update_rate > 0 and not self.router_bias:
            fail(
                "MoEConfig",
                "bias_update_rate",
                self.bias_update_rate,
                "must be 0 unless router_bias=True (the bias it updates)",
            )
        check_number("MoEConfig", "capacity_factor", self.capacity_factor, "must be > 0", lambda v: v > 0)

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
        check_positive(
            "MemoryConfig",
            num_keys=self.num_keys,
            topk=self.topk,
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            num_cores=self.num_cores,
            virtual_blocks=self.virtual_blocks,
        )
        if self.value_dim is not None:
            check_positive("MemoryConfig", value_dim=self.value_dim)
        check_int("MemoryConfig", "tucker_rank", self.tucker_rank, low=0)  # 0: PKM's scoring
        if self.topk > self.num_keys:
            fail("MemoryConfig", "topk", self.topk, f"must be <= num_keys={self.num_keys} (m <= P)")
        check_choice("MemoryConfig", "score", self.score, MEMORY_SCORES)
        if self.num_cores > 1 and self.tucker_rank == 0:
            fail(
                "MemoryConfig",
                "num_cores",
                self.num_cores,
                "must be 1 with tucker_rank=0: multi-core scoring needs TDQKR cores (tucker_rank >= 1)",
            )
        if self.num_cores > 1 and self.score != "raw":
            fail(
                "MemoryConfig",
                "score",
                self.score,
                f"must be 'raw' with num_cores={self.num_cores}: each core's score scales its chunk",
            )
        if self.num_keys**2 % self.virtual_blocks:
            fail(
                "MemoryConfig",
                "virtual_blocks",
                self.virtual_blocks,
                f"must divide the num_keys²={self.num_keys**2} grid slots",
            )
        if self.virtual_blocks > 1 and not self.output_proj:
            fail(
                "MemoryConfig",
                "output_proj",
                self.output_proj,
                f"must be True with virtual_blocks={self.virtual_blocks}: IVE projects each block",
            )
        if self.value_init_std is not None and not self.value_init_std > 0:
            fail("MemoryConfig", "value_init_std", self.value_init_std, "must be > 0 or None")
        for name in ("aux_alpha", "aux_tau"):
            check_number("MemoryConfig", name, getattr(self, name), "must be >= 0", lambda v: v >= 0)
        for name in ("value_lr", "value_lr_final"):
            check_number("MemoryConfig", name, getattr(self, name), "must be > 0", lambda v: v > 0)

    @property
    def num_slots(self) -> int:  # the P² grid (virtual slots with IVE)
        return self.num_keys**2

    @property
    def physical_rows(self) -> int:  # rows of the value table
        return self.num_keys**2 // self.virtual_blocks

    @property
    def reads_per_token(self) -> int:  # value rows one token reads: heads × m
        return self.num_heads * self.topk

    def width(self, d_model: int) -> int:  # the value row width
        return d_model if self.value_dim is None else self.value_dim
