"""Qwen3 (``Qwen3ForCausalLM``): Llama with an RMSNorm of each query and key head.

``self_attn.q_norm`` and ``k_norm`` ``[H]`` normalize every head over ``head_dim`` after the
projection and before RoPE, with ``rms_norm_eps`` (our ``AttentionConfig(qk_norm=True,
qk_norm_eps=...)``). ``head_dim`` is explicit (128 when absent, Qwen3Config's default, whatever
``hidden_size / num_attention_heads``). A sliding window is supported only on every layer or none:
``layer_types`` (or ``use_sliding_window`` with ``max_window_layers``) mixing full and sliding
layers is refused, as llmarch has one window per model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import AttentionConfig, ModelConfig
from llmarch.hf.architecture import Architecture
from llmarch.hf.common import (
    MHA_TENSORS,
    QK_NORM_TENSORS,
    SWIGLU_TENSORS,
    attention_from_hf,
    attention_to_hf,
    check_llama,
    model_from_hf,
    model_to_hf,
)
from llmarch.hf.fields import read_bool, read_float, read_int

QWEN3_ATTENTION_TENSORS = {**MHA_TENSORS, **QK_NORM_TENSORS}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_window(hf: Mapping[str, Any]) -> int | None:
    """The window every layer uses, None for full attention everywhere, as Qwen3Config reads it:
    ``sliding_window`` counts only with ``use_sliding_window``; ``layer_types`` (absent: sliding from
    layer ``max_window_layers`` on) says which layers use it.

    Raises:
      ValueError: for layer types that mix full and sliding layers, or name a layer type or a
        window that does not exist.
    """
    layers = read_int(hf, "num_hidden_layers")
    window = read_int(hf, "sliding_window") if read_bool(hf, "use_sliding_window", False) else None
    types = hf.get("layer_types")
    if types is None:
        first = read_int(hf, "max_window_layers", 28, minimum=0)  # Qwen3Config's default
        types = [_LAYER_TYPES[window is not None and i >= first] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(
            f"config.json layer_types={types!r} is invalid: must list num_hidden_layers="
            f"{layers} of {_LAYER_TYPES}"
        )
    if len(set(types)) > 1:
        raise ValueError(
            f"config.json layer_types={types!r} is not supported: llmarch has one attention "
            "kind for every layer; allowed: all 'full_attention' or all 'sliding_attention' "
            "(use_sliding_window with max_window_layers=0)"
        )
    if types[0] == "full_attention":
        return None
    if window is None:
        raise ValueError(
            f"config.json layer_types={types!r} is invalid with use_sliding_window="
            f"{hf.get('use_sliding_window')!r}: sliding layers need use_sliding_window=true "
            "and a sliding_window"
        )
    return window


def qk_norm_attention(hf: Mapping[str, Any], head_dim: int | None, window: int | None) -> AttentionConfig:
    """GQA with per-head q/k norms of eps ``rms_norm_eps`` (1e-6, the Qwen3 configs' default)."""
    return attention_from_hf(
        hf, head_dim, qk_norm=True, qk_norm_eps=read_float(hf, "rms_norm_eps", 1e-6), sliding_window=window
    )


def from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    check_llama(hf)
    return model_from_hf(
        hf, name, 32768, model_type="qwen3", attention=qk_norm_attention(hf, 128, sliding_window(hf))
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scaling, fields = attention_to_hf(cfg, "Qwen3", qk_norm=True, sliding_window=True)
    window = cfg.attention.sliding_window
    kind = "full_attention" if window is None else "sliding_attention"
    return model_to_hf(
        cfg,
        scaling,
        cfg.attention.rope_theta,
        **fields,
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=0 if window else cfg.num_layers,
        layer_types=[kind] * cfg.num_layers,
    )


QWEN3 = Architecture(
    model_type="qwen3",
    hf_class="Qwen3ForCausalLM",
    from_hf=from_hf,
    to_hf=to_hf,
    attention={"mha": QWEN3_ATTENTION_TENSORS},
    ffn={"swiglu": SWIGLU_TENSORS},
)
