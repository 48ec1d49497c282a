"""Mixtral (``MixtralForCausalLM``): GQA attention and an MoE FFN in every layer.

Checkpoints store the router as ``block_sparse_moe.gate.weight [E,D]`` and each expert's SwiGLU as
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up) ``[F,D]`` and ``w2`` (down) ``[D,F]``.
Routing is softmax top-k renormalized over the k (``MoEConfig(router="softmax", norm_topk=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import ModelConfig, MoEConfig, moe_blocks
from llmarch.hf.architecture import Architecture
from llmarch.hf.common import (
    MHA_TENSORS,
    attention_from_hf,
    attention_to_hf,
    check_llama,
    expert_tensors,
    model_from_hf,
    model_to_hf,
)
from llmarch.hf.fields import read_float, read_int
from llmarch.hf.rules import Linear, Table


def moe_tensors(cfg: ModelConfig, hf_config: Mapping[str, Any]) -> Table:
    """transformers ``MixtralSparseMoeBlock``'s tensors (as checkpoints store them)."""
    return {
        "block_sparse_moe.gate.weight": (("ffn", "w_router_de", "w"), Linear()),
        **expert_tensors(cfg, "block_sparse_moe.experts.{}.", "w1.weight", "w3.weight", "w2.weight"),
    }


def from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    check_llama(hf)
    if hf.get("sliding_window") is not None:
        raise ValueError(
            f"config.json sliding_window={hf['sliding_window']!r} is not supported for Mixtral; allowed: null"
        )
    moe = MoEConfig(
        num_experts=read_int(hf, "num_local_experts"),
        top_k=read_int(hf, "num_experts_per_tok"),
        expert_dim=read_int(hf, "intermediate_size"),
        router="softmax",
        norm_topk=True,
        aux_loss_coef=read_float(hf, "router_aux_loss_coef", 0.0),
    )
    layers = read_int(hf, "num_hidden_layers")
    return model_from_hf(
        hf,
        name,
        4096 * 32,
        model_type="mixtral",
        attention=attention_from_hf(hf),
        moe=moe,
        blocks=moe_blocks(layers),
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    if any(b.ffn != "moe" or b.attention != "mha" for b in cfg.layer_blocks):
        raise ValueError(
            "ModelConfig.blocks mix MoE and dense FFNs: Mixtral has an MoE in every layer; "
            "allowed for export: every block ('mha', 'moe')"
        )
    wanted = {
        "router": "softmax",
        "norm_topk": True,
        "route_scale": 1.0,
        "n_group": 1,
        "num_shared_experts": 0,
        "router_bias": False,
    }
    for field, allowed in wanted.items():
        if getattr(m, field) != allowed:
            raise ValueError(
                f"MoEConfig.{field}={getattr(m, field)!r} has no Mixtral equivalent; "
                f"allowed for export: {allowed!r}"
            )
    scaling, fields = attention_to_hf(cfg, "Mixtral")
    out = model_to_hf(
        cfg,
        scaling,
        cfg.attention.rope_theta,
        **fields,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.aux_loss_coef,
        sliding_window=None,
    )
    return {**out, "intermediate_size": m.expert_dim}


MIXTRAL = Architecture(
    model_type="mixtral",
    hf_class="MixtralForCausalLM",
    from_hf=from_hf,
    to_hf=to_hf,
    attention={"mha": MHA_TENSORS},
    ffn={"moe": moe_tensors},
)
