"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): MLA tensors, MoE tensors and the config translation.

Layers before ``first_k_dense_replace`` are MLA + SwiGLU, the rest MLA + MoE: ``n_routed_experts``
experts stored one tensor each (``mlp.experts.{e}.gate_proj.weight``), sigmoid routing with
``e_score_correction_bias`` (our ``ExpertBias`` ``b_i``), group-limited to ``topk_group`` of
``n_group`` groups, ``routed_scaling_factor``, and ``n_shared_experts`` shared experts fused into
one SwiGLU of width ``n_shared_experts·moe_intermediate_size`` (``mlp.shared_experts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import MLAConfig, ModelConfig, MoEConfig, moe_blocks
from llmarch.hf.architecture import Architecture
from llmarch.hf.common import SWIGLU_TENSORS, check_llama, expert_tensors, model_from_hf, model_to_hf
from llmarch.hf.fields import read_bool, read_float, read_int, read_rope
from llmarch.hf.rules import Linear, Part, Same, Table


def rope_interleave(hf_config: Mapping[str, Any]) -> bool:
    """Whether the checkpoint stores the RoPE columns in interleaved pairs (DeepseekV3Config's
    default, and what ``to_hf`` writes)."""
    return read_bool(hf_config, "rope_interleave", True)


def mla_tensors(cfg: ModelConfig, hf_config: Mapping[str, Any]) -> Table:
    """transformers ``DeepseekV3Attention``'s tensors for ``cfg.mla``; a fused one maps to a list."""
    m, interleave = cfg.mla, rope_interleave(hf_config)
    H, R, Hv, A = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank

    def at(name: str) -> tuple[str, ...]:
        return ("attention", name, "w")

    qk = [
        (at("w_uq_qnh" if m.q_lora_rank else "w_q_dnh"), Part((H, R), 0)),
        (at("w_qr_qnr" if m.q_lora_rank else "w_qr_dnr"), Part((H, R), 1, interleave)),
    ]
    q = (
        {"self_attn.q_proj.weight": qk}
        if m.q_lora_rank is None
        else {
            "self_attn.q_a_proj.weight": (at("w_down_q_dq"), Linear()),
            "self_attn.q_a_layernorm.weight": (("attention", "q_norm", "scale"), Same()),
            "self_attn.q_b_proj.weight": qk,
        }
    )
    return {
        **q,
        "self_attn.kv_a_proj_with_mqa.weight": [
            (at("w_dkv_da"), Part((A, R), 0)),
            (at("w_kr_dr"), Part((A, R), 1, interleave)),
        ],
        "self_attn.kv_a_layernorm.weight": (("attention", "kv_norm", "scale"), Same()),
        "self_attn.kv_b_proj.weight": [
            (at("w_uk_anh"), Part((H, Hv), 0)),
            (at("w_uv_anh"), Part((H, Hv), 1)),
        ],
        "self_attn.o_proj.weight": (at("w_o_nhd"), Linear(in_axes=2)),
    }


def moe_tensors(cfg: ModelConfig, hf_config: Mapping[str, Any]) -> Table:
    """transformers ``DeepseekV3MoE``'s tensors for ``cfg.moe`` (the router, each expert, the
    shared experts and the bias)."""
    table: Table = {
        "mlp.gate.weight": (("ffn", "w_router_de", "w"), Linear()),
        "mlp.gate.e_score_correction_bias": (("ffn", "bias_e"), Same()),
        **expert_tensors(cfg, "mlp.experts.{}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    }
    if cfg.moe.num_shared_experts:
        table |= {
            f"mlp.shared_experts.{p}_proj.weight": (("ffn", "shared", f"w_{p}_{io}", "w"), Linear())
            for p, io in (("gate", "df"), ("up", "df"), ("down", "fd"))
        }
    return table


# Fields of DeepSeek's own configs that transformers' DeepseekV3 does not read; only the values that
# transformers implements are accepted.
_FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}


def _moe_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    for key, allowed in _FIXED.items():
        if hf.get(key, allowed) != allowed:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported; allowed: {allowed!r}")
    return MoEConfig(
        num_experts=read_int(hf, "n_routed_experts"),
        top_k=read_int(hf, "num_experts_per_tok"),
        expert_dim=read_int(hf, "moe_intermediate_size"),
        num_shared_experts=read_int(hf, "n_shared_experts", 0, minimum=0),
        router="sigmoid",
        norm_topk=read_bool(hf, "norm_topk_prob", True),
        route_scale=read_float(hf, "routed_scaling_factor", 1.0),
        n_group=read_int(hf, "n_group", 1),
        topk_group=read_int(hf, "topk_group", 1),
        router_bias=True,
    )


def from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    """A DeepseekV3 config: MLA blocks, SwiGLU before ``first_k_dense_replace`` and MoE after."""
    check_llama(hf)  # the same bias and activation checks
    layers = read_int(hf, "num_hidden_layers")
    dense = min(read_int(hf, "first_k_dense_replace", 3, minimum=0), layers)  # 3: DeepseekV3Config's default
    heads = read_int(hf, "num_attention_heads")
    if read_int(hf, "num_key_value_heads", heads) != heads:
        raise ValueError(
            f"config.json num_key_value_heads={hf['num_key_value_heads']!r} is not "
            f"supported; allowed: num_attention_heads={heads}"
        )
    theta, yarn = read_rope(hf, scaled="yarn")
    q_rank = None if hf.get("q_lora_rank") is None else read_int(hf, "q_lora_rank")
    mla = MLAConfig(
        num_heads=heads,
        q_lora_rank=q_rank,
        **{
            k: read_int(hf, k) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        },
        rope_theta=theta,
        rope_scaling=yarn,
    )
    moe = _moe_from_hf(hf) if dense < layers else None
    return model_from_hf(
        hf,
        name,
        4096,
        model_type="deepseek_v3",
        attention=mla.mha_baseline(),
        mla=mla,
        moe=moe,
        blocks=moe_blocks(layers, dense, attention="mla"),
    )


def _first_k_dense(cfg: ModelConfig) -> int:
    kinds = [b.ffn for b in cfg.layer_blocks]
    dense = next((i for i, k in enumerate(kinds) if k != "swiglu"), len(kinds))
    if any(k != "moe" for k in kinds[dense:]):
        raise ValueError(
            f"ModelConfig.blocks FFN kinds {kinds} have no DeepseekV3 equivalent; allowed "
            "for export: 'swiglu' blocks, then only 'moe' blocks (first_k_dense_replace)"
        )
    return dense


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    if m is None:
        return {}
    for field, value, allowed in (("router", m.router, "sigmoid"), ("router_bias", m.router_bias, True)):
        if value != allowed:
            raise ValueError(
                f"MoEConfig.{field}={value!r} has no DeepseekV3 equivalent; allowed for export: {allowed!r}"
            )
    return dict(
        n_routed_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        moe_intermediate_size=m.expert_dim,
        n_shared_experts=m.num_shared_experts,
        norm_topk_prob=m.norm_topk,
        routed_scaling_factor=m.route_scale,
        n_group=m.n_group,
        topk_group=m.topk_group,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers reads as a DeepseekV3ForCausalLM."""
    if any(b.attention != "mla" for b in cfg.layer_blocks):
        raise ValueError(
            "ModelConfig.blocks mix 'mla' with other attention kinds: no Hugging Face "
            "architecture has that; allowed for export: all 'mla' or all 'mha'"
        )
    m, s = cfg.mla, cfg.mla.rope_scaling
    yarn = (
        None
        if s is None
        else {
            "rope_type": "yarn",
            "factor": s.factor,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "mscale": s.mscale,
            "mscale_all_dim": s.mscale_all_dim,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    )
    return model_to_hf(
        cfg,
        yarn,
        m.rope_theta,
        first_k_dense_replace=_first_k_dense(cfg),
        **_moe_to_hf(cfg),
        num_nextn_predict_layers=cfg.mtp_depth,  # written as model.layers.{L + d}: llmarch.hf.mtp
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        rope_interleave=True,
    )  # to_hf_tensors writes the RoPE columns interleaved


DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    hf_class="DeepseekV3ForCausalLM",
    from_hf=from_hf,
    to_hf=to_hf,
    attention={"mla": mla_tensors},
    ffn={"swiglu": SWIGLU_TENSORS, "moe": moe_tensors},
)
