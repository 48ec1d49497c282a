"""Llama (``LlamaForCausalLM``): the config translation (its MHA/GQA and SwiGLU tensor tables are
the shared ones in ``hf_tables``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import AttentionConfig, ModelConfig
from llmarch.hf_tables import _check_llama, _int, _model_from_hf, _model_to_hf, _rope, block_tensors


def attention_from_hf(hf: Mapping[str, Any]) -> AttentionConfig:
    """MHA/GQA with Llama-3 RoPE scaling, from a Llama-family ``config.json`` (also Mixtral's)."""
    heads = _int(hf, "num_attention_heads")
    kv_heads = _int(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config.json num_key_value_heads={kv_heads} is invalid: must divide "
                         f"num_attention_heads={heads}")
    hidden = _int(hf, "hidden_size")
    if hf.get("head_dim") is None and hidden < heads:
        raise ValueError(f"config.json hidden_size={hidden} is invalid without head_dim: must be >= "
                         f"num_attention_heads={heads} (head_dim defaults to hidden_size // heads)")
    head_dim = _int(hf, "head_dim", hidden // heads)  # transformers' default
    theta, scaling = _rope(hf)
    return AttentionConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                           rope_theta=theta, rope_scaling=scaling)


def llama_from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    _check_llama(hf)
    return _model_from_hf(hf, name, 2048, attention=attention_from_hf(hf))


def attention_to_hf(cfg: ModelConfig) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(rope_scaling, fields)`` of ``cfg.attention`` for a Llama-family ``config.json``."""
    a = cfg.attention
    if a.sliding_window is not None:
        raise ValueError(f"AttentionConfig.sliding_window={a.sliding_window} has no "
                         "Llama equivalent; allowed for export: None")
    s = a.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings}
    return scaling, dict(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                         head_dim=a.head_dim)


def llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scaling, fields = attention_to_hf(cfg)
    for kinds in cfg.layer_blocks:
        block_tensors(kinds, cfg)  # raises for block kinds without a mapping
    return _model_to_hf(cfg, "llama", scaling, cfg.attention.rope_theta, **fields, mlp_bias=False)
