"""Mixtral (``MixtralForCausalLM``): GQA attention and an MoE FFN in every layer.

Checkpoints store the router as ``block_sparse_moe.gate.weight [E,D]`` and each expert's SwiGLU as
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up) ``[F,D]`` and ``w2`` (down) ``[D,F]``.
Routing is softmax top-k renormalized over the k (``MoEConfig(router="softmax", norm_topk=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import ModelConfig, MoEConfig, moe_blocks
from llmarch.hf_llama import attention_from_hf, attention_to_hf
from llmarch.hf_tables import (
    MOE_TENSORS,
    Expert,
    Linear,
    Rule,
    _check_llama,
    _float,
    _int,
    _model_from_hf,
    _model_to_hf,
)


def moe_tensors(cfg: ModelConfig) -> dict[str, Rule | list[Rule]]:
    """transformers ``MixtralSparseMoeBlock``'s tensors (as checkpoints store them)."""
    table: dict[str, Rule | list[Rule]] = {
        "block_sparse_moe.gate.weight": (("ffn", "w_router_de", "w"), Linear())}
    for e in range(cfg.moe.num_experts):
        prefix = f"block_sparse_moe.experts.{e}."
        table |= {prefix + "w1.weight": (("ffn", "w_gate_edf", "w"), Expert(e, Linear())),
                  prefix + "w3.weight": (("ffn", "w_up_edf", "w"), Expert(e, Linear())),
                  prefix + "w2.weight": (("ffn", "w_down_efd", "w"), Expert(e, Linear()))}
    return table


MOE_TENSORS["mixtral"] = moe_tensors


def mixtral_from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    _check_llama(hf)
    if hf.get("sliding_window") is not None:
        raise ValueError(f"config.json sliding_window={hf['sliding_window']!r} is not supported for "
                         "Mixtral; allowed: null")
    moe = MoEConfig(num_experts=_int(hf, "num_local_experts"), top_k=_int(hf, "num_experts_per_tok"),
                    expert_dim=_int(hf, "intermediate_size"), router="softmax", norm_topk=True,
                    aux_loss_coef=_float(hf, "router_aux_loss_coef", 0.0))
    layers = _int(hf, "num_hidden_layers")
    return _model_from_hf(hf, name, 4096 * 32, attention=attention_from_hf(hf), moe=moe,
                          blocks=moe_blocks(layers))


def mixtral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    if any(b.ffn != "moe" or b.attention != "mha" for b in cfg.layer_blocks):
        raise ValueError("ModelConfig.blocks mix MoE and dense FFNs: Mixtral has an MoE in every layer; "
                         "allowed for export: every block ('mha', 'moe')")
    wanted = {"router": "softmax", "norm_topk": True, "route_scale": 1.0, "n_group": 1,
              "num_shared_experts": 0, "router_bias": False}
    for field, allowed in wanted.items():
        if getattr(m, field) != allowed:
            raise ValueError(f"MoEConfig.{field}={getattr(m, field)!r} has no Mixtral equivalent; "
                             f"allowed for export: {allowed!r}")
    scaling, fields = attention_to_hf(cfg)
    out = _model_to_hf(cfg, "mixtral", scaling, cfg.attention.rope_theta, **fields,
                       num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                       router_aux_loss_coef=m.aux_loss_coef, sliding_window=None)
    return {**out, "intermediate_size": m.expert_dim}
