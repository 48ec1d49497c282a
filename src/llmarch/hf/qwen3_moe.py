"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's attention (per-head q/k norms) with MoE FFNs.

Layer ``i`` is sparse when ``i`` is not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step
== 0``, else a dense SwiGLU of ``intermediate_size``; our ``ModelConfig.blocks`` holds any such
layout. The router ``mlp.gate.weight [E,D]`` scores a softmax over all ``num_experts``; the top
``num_experts_per_tok`` probabilities are the gates, renormalized to sum 1 only with
``norm_topk_prob`` (``MoEConfig(router="softmax", norm_topk=norm_topk_prob)``, no shared experts,
no bias). Experts of ``moe_intermediate_size`` are stored one tensor each
(``mlp.experts.{e}.gate_proj.weight``), as transformers' ``save_pretrained`` writes them.
Qwen3MoeConfig has no ``layer_types``: ``use_sliding_window`` would window every layer, which
llmarch refuses to guess at (no Qwen3-MoE release uses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import BlockConfig, ModelConfig, MoEConfig
from llmarch.hf.architecture import Architecture
from llmarch.hf.common import (
    SWIGLU_TENSORS,
    attention_to_hf,
    check_llama,
    expert_tensors,
    model_from_hf,
    model_to_hf,
)
from llmarch.hf.fields import read_bool, read_float, read_int
from llmarch.hf.qwen3 import QWEN3_ATTENTION_TENSORS, qk_norm_attention
from llmarch.hf.rules import Linear, Table


def moe_tensors(cfg: ModelConfig, hf_config: Mapping[str, Any]) -> Table:
    """transformers ``Qwen3MoeSparseMoeBlock``'s tensors (as checkpoints store them)."""
    return {
        "mlp.gate.weight": (("ffn", "w_router_de", "w"), Linear()),
        **expert_tensors(cfg, "mlp.experts.{}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    }


def sparse_layers(hf: Mapping[str, Any]) -> list[bool]:
    """Which layers are MoE, as Qwen3MoeDecoderLayer decides it."""
    layers = read_int(hf, "num_hidden_layers")
    step = read_int(hf, "decoder_sparse_step", 1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
        raise ValueError(f"config.json mlp_only_layers={dense!r} is invalid: must be a list of layer indices")
    sparse = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
    if not any(sparse):
        raise ValueError(
            f"config.json decoder_sparse_step={step} with mlp_only_layers={dense} leaves no "
            f"MoE layer of num_hidden_layers={layers}: llmarch cannot keep the MoE fields "
            "of such a model; allowed: at least one sparse layer (or model_type 'qwen3')"
        )
    return sparse


def from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    check_llama(hf)
    if read_bool(hf, "use_sliding_window", False):
        raise ValueError("config.json use_sliding_window=True is not supported for Qwen3-MoE; allowed: false")
    # Qwen's checkpoints write num_experts; transformers 5 writes its alias num_local_experts.
    experts = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    if read_int(hf, experts, minimum=0) == 0:
        raise ValueError(
            f"config.json {experts}=0 is not supported for Qwen3-MoE (a dense model); "
            "allowed: a positive integer, or model_type 'qwen3'"
        )
    moe = MoEConfig(
        num_experts=read_int(hf, experts),
        top_k=read_int(hf, "num_experts_per_tok"),
        expert_dim=read_int(hf, "moe_intermediate_size"),
        router="softmax",
        norm_topk=read_bool(hf, "norm_topk_prob", False),  # Qwen3MoeConfig's default
        aux_loss_coef=read_float(hf, "router_aux_loss_coef", 0.001),
    )
    blocks = tuple(BlockConfig(ffn="moe" if s else "swiglu") for s in sparse_layers(hf))
    # head_dim None: hidden_size // heads when absent, as Qwen3MoeAttention reads it
    return model_from_hf(
        hf,
        name,
        32768,
        model_type="qwen3_moe",
        attention=qk_norm_attention(hf, None, None),
        moe=moe,
        blocks=blocks,
    )


def _layout(cfg: ModelConfig) -> dict[str, Any]:
    """``decoder_sparse_step`` and ``mlp_only_layers`` for ``cfg.blocks``: the plain step when one
    gives the layout, else step 1 with the dense layers listed."""
    sparse = [b.ffn == "moe" for b in cfg.layer_blocks]
    if any(b.ffn not in ("moe", "swiglu") for b in cfg.layer_blocks):
        return {}  # check_blocks names the FFN kind
    for step in range(1, cfg.num_layers + 1):
        if sparse == [(i + 1) % step == 0 for i in range(cfg.num_layers)]:
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, s in enumerate(sparse) if not s]}


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    if m is None:
        raise ValueError(
            "ModelConfig.moe=None has no Qwen3-MoE equivalent: it needs MoE layers; "
            "allowed for export: a MoEConfig (or hf_model_type 'qwen3' for a dense model)"
        )
    wanted = {
        "router": "softmax",
        "route_scale": 1.0,
        "n_group": 1,
        "num_shared_experts": 0,
        "router_bias": False,
    }
    for field, allowed in wanted.items():
        if getattr(m, field) != allowed:
            raise ValueError(
                f"MoEConfig.{field}={getattr(m, field)!r} has no Qwen3-MoE equivalent; "
                f"allowed for export: {allowed!r}"
            )
    scaling, fields = attention_to_hf(cfg, "Qwen3-MoE", qk_norm=True)
    return model_to_hf(
        cfg,
        scaling,
        cfg.attention.rope_theta,
        **fields,
        **_layout(cfg),
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        moe_intermediate_size=m.expert_dim,
        norm_topk_prob=m.norm_topk,
        router_aux_loss_coef=m.aux_loss_coef,
        use_sliding_window=False,
        sliding_window=None,
    )


QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    hf_class="Qwen3MoeForCausalLM",
    from_hf=from_hf,
    to_hf=to_hf,
    attention={"mha": QWEN3_ATTENTION_TENSORS},
    ffn={"swiglu": SWIGLU_TENSORS, "moe": moe_tensors},
)
