"""What the Llama family of ``config.json`` files and checkpoints share (Llama, Mixtral, Qwen3,
Qwen3-MoE, and DeepSeek-V3's ends): the model-level fields, GQA attention with its RoPE, and the
attention, SwiGLU and per-expert tensor tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import AttentionConfig, ModelConfig
from llmarch.hf.fields import read_bool, read_float, read_int, read_rope
from llmarch.hf.rules import Expert, Linear, Same, Table

ACTIVATIONS = ("silu", "swish")  # the same function under two names in transformers

MHA_TENSORS: Table = {
    "self_attn.q_proj.weight": (("attention", "w_q_dnh", "w"), Linear()),
    "self_attn.k_proj.weight": (("attention", "w_k_dkh", "w"), Linear()),
    "self_attn.v_proj.weight": (("attention", "w_v_dkh", "w"), Linear()),
    "self_attn.o_proj.weight": (("attention", "w_o_nhd", "w"), Linear(in_axes=2)),
}
# Qwen3's per-head norms of q and k (AttentionConfig.qk_norm), one [H] scale each.
QK_NORM_TENSORS: Table = {
    "self_attn.q_norm.weight": (("attention", "q_norm", "scale"), Same()),
    "self_attn.k_norm.weight": (("attention", "k_norm", "scale"), Same()),
}
SWIGLU_TENSORS: Table = {
    "mlp.gate_proj.weight": (("ffn", "w_gate_df", "w"), Linear()),
    "mlp.up_proj.weight": (("ffn", "w_up_df", "w"), Linear()),
    "mlp.down_proj.weight": (("ffn", "w_down_fd", "w"), Linear()),
}


def expert_tensors(cfg: ModelConfig, prefix: str, gate: str, up: str, down: str) -> Table:
    """Each routed expert's SwiGLU as checkpoints store it, one tensor per expert:
    ``prefix.format(e) + gate`` is expert e's slice of ``w_gate_edf [E,D,F]``, and so on."""
    table: Table = {}
    for e in range(cfg.moe.num_experts):
        table |= {
            prefix.format(e) + gate: (("ffn", "w_gate_edf", "w"), Expert(e, Linear())),
            prefix.format(e) + up: (("ffn", "w_up_edf", "w"), Expert(e, Linear())),
            prefix.format(e) + down: (("ffn", "w_down_efd", "w"), Expert(e, Linear())),
        }
    return table


def check_llama(hf: Mapping[str, Any]) -> None:
    """Refuses projection biases and activations other than SiLU (llmarch has neither)."""
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ValueError(
                f"config.json {field}={hf[field]!r} is not supported: llmarch "
                "projections have no bias; allowed: false"
            )
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; allowed: {ACTIVATIONS}")


def attention_from_hf(hf: Mapping[str, Any], head_dim: int | None = None, **fields: Any) -> AttentionConfig:
    """MHA/GQA with Llama-3 RoPE scaling from a Llama-family ``config.json``.

    ``head_dim``: the architecture's default for an absent ``head_dim`` (None: hidden_size // heads,
    as LlamaConfig has it; Qwen3Config's is 128). ``fields``: further AttentionConfig fields.
    """
    heads = read_int(hf, "num_attention_heads")
    kv_heads = read_int(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(
            f"config.json num_key_value_heads={kv_heads} is invalid: must divide num_attention_heads={heads}"
        )
    if head_dim is None:
        hidden = read_int(hf, "hidden_size")
        if hf.get("head_dim") is None and hidden < heads:
            raise ValueError(
                f"config.json hidden_size={hidden} is invalid without head_dim: must be "
                f">= num_attention_heads={heads} (head_dim defaults to hidden_size // heads)"
            )
        head_dim = hidden // heads
    theta, scaling = read_rope(hf)
    return AttentionConfig(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=read_int(hf, "head_dim", head_dim),
        rope_theta=theta,
        rope_scaling=scaling,
        **fields,
    )


def attention_to_hf(
    cfg: ModelConfig, name: str, *, qk_norm: bool = False, sliding_window: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(rope_scaling, fields)`` of ``cfg.attention`` for architecture ``name``'s ``config.json``.

    ``qk_norm``: whether ``name`` has per-head q/k norms (it must match the config);
    ``sliding_window``: whether ``name`` can hold a window (the caller writes its fields).
    """
    a = cfg.attention
    if a.sliding_window is not None and not sliding_window:
        raise ValueError(
            f"AttentionConfig.sliding_window={a.sliding_window} has no {name} "
            "equivalent; allowed for export: None"
        )
    if a.qk_norm != qk_norm:
        raise ValueError(
            f"AttentionConfig.qk_norm={a.qk_norm} has no {name} equivalent; allowed for export: {qk_norm}"
        )
    if qk_norm and a.qk_norm_eps != cfg.norm_eps:
        raise ValueError(
            f"AttentionConfig.qk_norm_eps={a.qk_norm_eps} has no {name} equivalent: it "
            f"has one rms_norm_eps; allowed for export: ModelConfig.norm_eps={cfg.norm_eps}"
        )
    s = a.rope_scaling
    scaling = (
        None
        if s is None
        else {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    )
    return scaling, dict(
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim
    )


def model_from_hf(
    hf: Mapping[str, Any],
    name: str,
    max_positions: int,
    *,
    model_type: str,
    norm_eps: float = 1e-6,
    **kw: Any,
) -> ModelConfig:
    """The ModelConfig fields every Llama-family ``config.json`` has, plus ``kw``; ``max_positions``
    and ``norm_eps`` are the architecture's defaults for absent fields."""
    return ModelConfig(
        vocab_size=read_int(hf, "vocab_size"),
        d_model=read_int(hf, "hidden_size"),
        num_layers=read_int(hf, "num_hidden_layers"),
        ffn_dim=read_int(hf, "intermediate_size"),
        max_seq_len=read_int(hf, "max_position_embeddings", max_positions),
        norm_eps=read_float(hf, "rms_norm_eps", norm_eps),
        tie_embeddings=read_bool(hf, "tie_word_embeddings", False),
        init_std=read_float(hf, "initializer_range", 0.02),
        name=name,
        hf_model_type=model_type,
        **kw,
    )


def model_to_hf(
    cfg: ModelConfig, scaling: dict[str, Any] | None, theta: float, **fields: Any
) -> dict[str, Any]:
    """The ``config.json`` fields every Llama-family architecture has, with ``fields`` after the
    layer count."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        **fields,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        "rope_theta": theta,
        "rope_scaling": scaling,
        "dtype": cfg.param_dtype,  # the dtype the weights are stored in
    }
