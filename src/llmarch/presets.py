"""Named model configurations.

``tiny-*`` run in seconds on a CPU (tests, demos); the others carry real published shapes,
used for counting parameters, FLOPs and bytes, never instantiated in tests.
"""

from __future__ import annotations

from collections.abc import Callable

from llmarch.config import (
    AttentionConfig,
    BlockConfig,
    MemoryConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeScaling,
    YarnScaling,
    moe_blocks,
)

_TINY = dict(vocab_size=320, d_model=64, num_layers=2, ffn_dim=192, max_seq_len=256)


def _tiny_dense() -> ModelConfig:
    return ModelConfig(
        **_TINY, attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16), name="tiny-dense"
    )


def _small_20m() -> ModelConfig:
    """~21M parameters with byte vocabulary: the largest shape worth training on a laptop CPU."""
    return ModelConfig(
        vocab_size=320,
        d_model=512,
        num_layers=7,
        ffn_dim=1408,
        max_seq_len=1024,
        attention=AttentionConfig(num_heads=8, num_kv_heads=4, head_dim=64),
        name="small-20m",
    )


def _tiny_gqa() -> ModelConfig:
    return ModelConfig(
        **_TINY, attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16), name="tiny-gqa"
    )


def _mla_model(
    mla: MLAConfig, num_layers: int, moe: MoEConfig | None = None, first_k_dense_replace: int = 0, **kw
) -> ModelConfig:
    """A decoder whose every block is MLA; the FFNs SwiGLU, or with ``moe`` MoE after the first
    ``first_k_dense_replace`` blocks (DeepSeek). ``attention`` holds the MHA baseline."""
    blocks = (
        (BlockConfig(attention="mla"),) * num_layers
        if moe is None
        else moe_blocks(num_layers, first_k_dense_replace, attention="mla")
    )
    return ModelConfig(
        **kw, num_layers=num_layers, attention=mla.mha_baseline(), mla=mla, blocks=blocks, moe=moe
    )


def _tiny_mla() -> ModelConfig:
    mla = MLAConfig(
        num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
    )
    return _mla_model(mla, **_TINY, name="tiny-mla")


def _tiny_moe() -> ModelConfig:
    """Mixtral-style: GQA attention, every FFN 8 experts with softmax top-2 routing."""
    moe = MoEConfig(num_experts=8, top_k=2, expert_dim=128, router="softmax", aux_loss_coef=0.01)
    return ModelConfig(
        **{**_TINY, "num_layers": 2},
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
        moe=moe,
        blocks=moe_blocks(2),
        name="tiny-moe",
    )


def _tiny_deepseek() -> ModelConfig:
    """DeepSeek-V3-style: MLA; a dense first layer, then MoE with a shared expert, sigmoid routing
    limited to 2 of 4 groups, the aux-loss-free bias and the sequence-wise loss."""
    mla = MLAConfig(
        num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
    )
    moe = MoEConfig(
        num_experts=8,
        top_k=2,
        expert_dim=64,
        num_shared_experts=1,
        router="sigmoid",
        route_scale=2.5,
        n_group=4,
        topk_group=2,
        router_bias=True,
        bias_update_rate=1e-3,
        seq_aux_loss_coef=1e-4,
    )
    return _mla_model(
        mla, **{**_TINY, "num_layers": 3}, moe=moe, first_k_dense_replace=1, name="tiny-deepseek"
    )


def _tiny_deepseek_mtp() -> ModelConfig:
    """tiny-deepseek with DeepSeek-V3's multi-token prediction: one MTP module (an MLA + MoE block
    like the last layer's), sharing the embedding and output head."""
    return _tiny_deepseek().replace(mtp_depth=1, name="tiny-deepseek-mtp")


# DeepSeek's published shapes: MoE FFNs after the first `first_k_dense_replace` dense layers
# (3 in V3, 1 in V2-Lite). Totals: 671B (V3, the main model without its multi-token-prediction
# module) and 15.7B (V2-Lite); activated per token 37B and 2.4B (llmarch.accounting). V3's one MTP
# module (mtp_depth=1, an MLA + MoE block) adds 11.6B of its own, 13.5B with the copies of the
# embedding and head its checkpoint stores: the report's "14B" (accounting.mtp_param_counts).
_DEEPSEEK_YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0)


def _deepseek_v3() -> ModelConfig:
    mla = MLAConfig(
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_scaling=YarnScaling(**_DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=1.0),
    )
    moe = MoEConfig(
        num_experts=256,
        top_k=8,
        expert_dim=2048,
        num_shared_experts=1,
        router="sigmoid",
        route_scale=2.5,
        n_group=8,
        topk_group=4,
        router_bias=True,
        bias_update_rate=1e-3,
        seq_aux_loss_coef=1e-4,
    )  # γ and α of the paper's pre-training
    return _mla_model(
        mla,
        61,
        moe=moe,
        first_k_dense_replace=3,
        vocab_size=129_280,
        d_model=7168,
        ffn_dim=18_432,
        max_seq_len=163_840,
        norm_eps=1e-6,
        dtype="bfloat16",
        mtp_depth=1,
        name="deepseek-v3",
    )


def _deepseek_v2_lite() -> ModelConfig:
    mla = MLAConfig(
        num_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_scaling=YarnScaling(**_DEEPSEEK_YARN, mscale=0.707, mscale_all_dim=0.707),
    )
    moe = MoEConfig(
        num_experts=64,
        top_k=6,
        expert_dim=1408,
        num_shared_experts=2,
        router="softmax",
        norm_topk=False,
        aux_loss_coef=1e-3,
    )
    return _mla_model(
        mla,
        27,
        moe=moe,
        first_k_dense_replace=1,
        vocab_size=102_400,
        d_model=2048,
        ffn_dim=10_944,
        max_seq_len=163_840,
        norm_eps=1e-6,
        dtype="bfloat16",
        name="deepseek-v2-lite",
    )


def _mixtral_8x7b() -> ModelConfig:
    moe = MoEConfig(num_experts=8, top_k=2, expert_dim=14_336, router="softmax", aux_loss_coef=0.02)
    return ModelConfig(
        vocab_size=32_000,
        d_model=4096,
        num_layers=32,
        ffn_dim=14_336,
        attention=AttentionConfig(num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6),
        max_seq_len=32_768,
        moe=moe,
        blocks=moe_blocks(32),
        dtype="bfloat16",
        name="mixtral-8x7b",
    )


def _llama3(
    name: str,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    ffn_dim: int,
    head_dim: int = 128,
    tie: bool = False,
    scaling: RopeScaling | None = None,
    max_seq_len: int = 8192,
) -> ModelConfig:
    return ModelConfig(
        vocab_size=128_256,
        d_model=d_model,
        num_layers=num_layers,
        ffn_dim=ffn_dim,
        attention=AttentionConfig(
            num_heads=num_heads, num_kv_heads=8, head_dim=head_dim, rope_theta=500_000.0, rope_scaling=scaling
        ),
        max_seq_len=max_seq_len,
        tie_embeddings=tie,
        dtype="bfloat16",
        name=name,
    )


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny-dense": _tiny_dense,
    "tiny-gqa": _tiny_gqa,
    "tiny-mla": _tiny_mla,
    "tiny-moe": _tiny_moe,
    "tiny-deepseek": _tiny_deepseek,
    "tiny-deepseek-mtp": _tiny_deepseek_mtp,
    "small-20m": _small_20m,
    "llama3-8b": lambda: _llama3("llama3-8b", d_model=4096, num_layers=32, num_heads=32, ffn_dim=14_336),
    "llama3.1-8b": lambda: _llama3(
        "llama3.1-8b",
        d_model=4096,
        num_layers=32,
        num_heads=32,
        ffn_dim=14_336,
        scaling=RopeScaling(),
        max_seq_len=131_072,
    ),
    "llama3-70b": lambda: _llama3("llama3-70b", d_model=8192, num_layers=80, num_heads=64, ffn_dim=28_672),
    "llama3.2-1b": lambda: _llama3(
        "llama3.2-1b",
        d_model=2048,
        num_layers=16,
        num_heads=32,
        ffn_dim=8192,
        head_dim=64,
        tie=True,
        scaling=RopeScaling(factor=32.0),
        max_seq_len=131_072,
    ),
    "deepseek-v2-lite": _deepseek_v2_lite,
    "deepseek-v3": _deepseek_v3,
    "mixtral-8x7b": _mixtral_8x7b,
}


# -- memory layers (PKM, UltraMem) ----------------------------------------------------------------


def _tiny_pkm() -> ModelConfig:
    """PKM (Lample et al. 2019) in place of the second block's FFN: 4 heads, top-16 of 64² slots,
    value rows of width D. Its activated parameters (queries 16,384 + keys 16,384 + the 4·16 rows
    read, 4,096, + LayerNorm) match the SwiGLU it replaces (36,864)."""
    mem = MemoryConfig(num_keys=64, topk=16, num_heads=4, key_dim=32)
    return ModelConfig(
        **_TINY,
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16),
        blocks=(BlockConfig(), BlockConfig(ffn="pkm")),
        memory=mem,
        name="tiny-pkm",
    )


def _tiny_ultramem() -> ModelConfig:
    """UltraMem with every part on: skip-layer span (0, 1), raw scores, halved value width (32) with
    projection, TDQKR rank 2 with 2 cores (MCS), IVE with 4 virtual blocks over 1,024 physical rows,
    LayerNormed keys, value LR 4 → 1. The SwiGLUs are halved (F=96) so that the activated
    parameters (37,088 in the memory) match tiny-dense's."""
    mem = MemoryConfig(
        num_keys=64,
        topk=16,
        num_heads=2,
        key_dim=36,
        value_dim=32,
        score="raw",
        output_proj=True,
        tucker_rank=2,
        num_cores=2,
        virtual_blocks=4,
        key_norm=True,
        value_init_std=0.02,
        value_lr=4.0,
        value_lr_final=1.0,
    )
    return ModelConfig(
        **{**_TINY, "ffn_dim": 96},
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16),
        skip_layers=((0, 1),),
        skip_kind="ultramem",
        memory=mem,
        name="tiny-ultramem",
    )


# UltraMem's model sizes (Huang et al., ICLR 2025, arXiv 2411.12364), for accounting only. The
# paper's table of hyper-parameters was not available here, so these are RECONSTRUCTED from what
# its names and text fix, and say no more than that:
# - Dense-151M/680M/1.6B name non-embedding parameters 12·D²·L of GPT-style blocks (4D² attention,
#   8D² FFN): D=1024/L=12 -> 151.0M, D=1536/L=24 -> 679.5M, D=2048/L=32 -> 1.611B. Here the FFN is a
#   SwiGLU of F = floor(8D/3) (8D² within 0.02%), heads of 128, GPT-NeoX's 50,432-entry vocabulary.
# - "-x12" / "2in34": the paper pairs UltraMem-1.6B-x12 with MoE-1.6B-2in34 of the same parameters
#   and compute, ~12x the dense model's ("twelve times more parameters than a dense model"). Top-2
#   of 34 SwiGLU experts of half the dense FFN width computes as the dense FFN does and holds
#   11.7x its non-embedding parameters; we use 2in34 at every size (the paper's names of the
#   smaller MoE models were not available) and choose P so that UltraMem's total matches it.
# - The UltraMem parts take the official implementation's defaults (github.com/ZihaoHuang-notabot/
#   Ultra-Sparse-Memory-Network, olmo/ultramem_layer.py): tucker rank 2, 2 cores, value expansion
#   W=4, raw scores, value width D/2 with projection, LayerNormed query and keys; 2 memory heads,
#   top-32, key width 128 (our choices). One memory layer per skip span of 3, 4, 4 blocks (4, 6, 8
#   memory layers); P = 1764, 2500, 2888 puts the totals within 0.02% of the MoE's.
_PAPER_BACKBONES = {"151m": (1024, 12, 3), "680m": (1536, 24, 4), "1.6b": (2048, 32, 4)}  # D, L, span
_PAPER_KEYS = {"151m": 1764, "680m": 2500, "1.6b": 2888}  # P: P²/4 physical rows per memory layer
_PAPER_EXPERTS = {"151m": 34, "680m": 34, "1.6b": 34}


def _paper_backbone(size: str, **kw) -> ModelConfig:
    D, L, _ = _PAPER_BACKBONES[size]
    return ModelConfig(
        vocab_size=50_432,
        d_model=D,
        num_layers=L,
        ffn_dim=8 * D // 3,
        max_seq_len=2048,
        attention=AttentionConfig(num_heads=D // 128, num_kv_heads=D // 128, head_dim=128),
        dtype="bfloat16",
        **kw,
    )


def _ultramem_paper(size: str) -> ModelConfig:
    D, L, span = _PAPER_BACKBONES[size]
    mem = MemoryConfig(
        num_keys=_PAPER_KEYS[size],
        topk=32,
        num_heads=2,
        key_dim=128,
        value_dim=D // 2,
        score="raw",
        output_proj=True,
        tucker_rank=2,
        num_cores=2,
        virtual_blocks=4,
        key_norm=True,
        value_init_std=0.02,
        value_lr=4.0,
        value_lr_final=1.0,
    )
    spans = tuple((i, i + span - 1) for i in range(0, L, span))
    return _paper_backbone(size, skip_layers=spans, skip_kind="ultramem", memory=mem, name=f"ultramem-{size}")


def _moe_paper(size: str) -> ModelConfig:
    D, L, _ = _PAPER_BACKBONES[size]
    E = _PAPER_EXPERTS[size]
    moe = MoEConfig(num_experts=E, top_k=2, expert_dim=(8 * D // 3) // 2)
    return _paper_backbone(size, moe=moe, blocks=moe_blocks(L), name=f"moe-{size}-2in{E}")


_PRESETS.update(
    {
        "tiny-pkm": _tiny_pkm,
        "tiny-ultramem": _tiny_ultramem,
        **{f"dense-{s}": (lambda s=s: _paper_backbone(s, name=f"dense-{s}")) for s in _PAPER_BACKBONES},
        **{f"ultramem-{s}": (lambda s=s: _ultramem_paper(s)) for s in _PAPER_BACKBONES},
        **{f"moe-{s}-2in{e}": (lambda s=s: _moe_paper(s)) for s, e in _PAPER_EXPERTS.items()},
    }
)


def names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get(name: str) -> ModelConfig:
    """The preset config ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"preset={name!r} is unknown; allowed: {list(_PRESETS)}")
    return _PRESETS[name]()
