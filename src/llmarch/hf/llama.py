"""Llama (``LlamaForCausalLM``): MHA/GQA attention with Llama-3 RoPE scaling and a SwiGLU FFN in
every layer; the tables and config fields are the Llama family's (``llmarch.hf.common``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.architecture import Architecture
from llmarch.hf.common import (
    MHA_TENSORS,
    SWIGLU_TENSORS,
    attention_from_hf,
    attention_to_hf,
    check_llama,
    model_from_hf,
    model_to_hf,
)


def from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    check_llama(hf)
    return model_from_hf(hf, name, 2048, model_type="llama", attention=attention_from_hf(hf))


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scaling, fields = attention_to_hf(cfg, "Llama")
    return model_to_hf(cfg, scaling, cfg.attention.rope_theta, **fields, mlp_bias=False)


LLAMA = Architecture(
    model_type="llama",
    hf_class="LlamaForCausalLM",
    from_hf=from_hf,
    to_hf=to_hf,
    attention={"mha": MHA_TENSORS},
    ffn={"swiglu": SWIGLU_TENSORS},
)
