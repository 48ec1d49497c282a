"""Named model configurations.

``tiny-*`` run in seconds on a CPU (tests, demos); the others carry real published shapes,
used for counting parameters, FLOPs and bytes, never instantiated in tests.
"""

from __future__ import annotations

from collections.abc import Callable

from llmarch.config import AttentionConfig, BlockConfig, MLAConfig, ModelConfig, RopeScaling, YarnScaling

_TINY = dict(vocab_size=320, d_model=64, num_layers=2, ffn_dim=192, max_seq_len=256)


def _tiny_dense() -> ModelConfig:
    return ModelConfig(**_TINY, attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16),
                       name="tiny-dense")


def _small_20m() -> ModelConfig:
    """~21M parameters with byte vocabulary: the largest shape worth training on a laptop CPU."""
    return ModelConfig(vocab_size=320, d_model=512, num_layers=7, ffn_dim=1408, max_seq_len=1024,
                       attention=AttentionConfig(num_heads=8, num_kv_heads=4, head_dim=64),
                       name="small-20m")


def _tiny_gqa() -> ModelConfig:
    return ModelConfig(**_TINY, attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
                       name="tiny-gqa")


def _mla_model(mla: MLAConfig, num_layers: int, **kw) -> ModelConfig:
    """A decoder whose every block is MLA + SwiGLU; ``attention`` holds the MHA baseline."""
    return ModelConfig(**kw, num_layers=num_layers, attention=mla.mha_baseline(), mla=mla,
                       blocks=(BlockConfig(attention="mla"),) * num_layers)


def _tiny_mla() -> ModelConfig:
    mla = MLAConfig(num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16)
    return _mla_model(mla, **_TINY, name="tiny-mla")


# DeepSeek's published shapes. Their FFNs are mixture-of-experts after the first
# `first_k_dense_replace` layers (3 in V3, 1 in V2-Lite); until the MoE block kind exists every
# layer here is a dense SwiGLU of the dense layers' width, so the attention side, the KV cache and
# the dense layers are exact but total parameter counts are NOT the published ones (671B, 15.7B).
_DEEPSEEK_YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                      beta_slow=1.0)


def _deepseek_v3() -> ModelConfig:
    mla = MLAConfig(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128,
                    rope_scaling=YarnScaling(**_DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=1.0))
    return _mla_model(mla, 61, vocab_size=129_280, d_model=7168, ffn_dim=18_432,
                      max_seq_len=163_840, norm_eps=1e-6, dtype="bfloat16", name="deepseek-v3")


def _deepseek_v2_lite() -> ModelConfig:
    mla = MLAConfig(num_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128,
                    rope_scaling=YarnScaling(**_DEEPSEEK_YARN, mscale=0.707, mscale_all_dim=0.707))
    return _mla_model(mla, 27, vocab_size=102_400, d_model=2048, ffn_dim=10_944,
                      max_seq_len=163_840, norm_eps=1e-6, dtype="bfloat16", name="deepseek-v2-lite")


def _llama3(name: str, *, d_model: int, num_layers: int, num_heads: int, ffn_dim: int,
            head_dim: int = 128, tie: bool = False, scaling: RopeScaling | None = None,
            max_seq_len: int = 8192) -> ModelConfig:
    return ModelConfig(
        vocab_size=128_256, d_model=d_model, num_layers=num_layers, ffn_dim=ffn_dim,
        attention=AttentionConfig(num_heads=num_heads, num_kv_heads=8, head_dim=head_dim,
                                  rope_theta=500_000.0, rope_scaling=scaling),
        max_seq_len=max_seq_len, tie_embeddings=tie, dtype="bfloat16", name=name)


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny-dense": _tiny_dense,
    "tiny-gqa": _tiny_gqa,
    "tiny-mla": _tiny_mla,
    "small-20m": _small_20m,
    "llama3-8b": lambda: _llama3("llama3-8b", d_model=4096, num_layers=32, num_heads=32,
                                 ffn_dim=14_336),
    "llama3.1-8b": lambda: _llama3("llama3.1-8b", d_model=4096, num_layers=32, num_heads=32,
                                   ffn_dim=14_336, scaling=RopeScaling(), max_seq_len=131_072),
    "llama3-70b": lambda: _llama3("llama3-70b", d_model=8192, num_layers=80, num_heads=64,
                                  ffn_dim=28_672),
    "llama3.2-1b": lambda: _llama3("llama3.2-1b", d_model=2048, num_layers=16, num_heads=32,
                                   ffn_dim=8192, head_dim=64, tie=True,
                                   scaling=RopeScaling(factor=32.0), max_seq_len=131_072),
    "deepseek-v2-lite": _deepseek_v2_lite,
    "deepseek-v3": _deepseek_v3,
}


def names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get(name: str) -> ModelConfig:
    """The preset config ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"preset={name!r} is unknown; allowed: {list(_PRESETS)}")
    return _PRESETS[name]()
