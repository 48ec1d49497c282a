"""Named model configurations.

``tiny-*`` run in seconds on a CPU (tests, demos); the others carry real published shapes,
used for counting parameters, FLOPs and bytes, never instantiated in tests.
"""

from __future__ import annotations

from collections.abc import Callable

from llmarch.config import AttentionConfig, ModelConfig, RopeScaling

_TINY = dict(vocab_size=320, d_model=64, num_layers=2, ffn_dim=192, max_seq_len=256)


def _tiny_dense() -> ModelConfig:
    return ModelConfig(**_TINY, attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16),
                       name="tiny-dense")


def _tiny_gqa() -> ModelConfig:
    return ModelConfig(**_TINY, attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
                       name="tiny-gqa")


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
    "llama3-8b": lambda: _llama3("llama3-8b", d_model=4096, num_layers=32, num_heads=32,
                                 ffn_dim=14_336),
    "llama3.1-8b": lambda: _llama3("llama3.1-8b", d_model=4096, num_layers=32, num_heads=32,
                                   ffn_dim=14_336, scaling=RopeScaling(), max_seq_len=131_072),
    "llama3-70b": lambda: _llama3("llama3-70b", d_model=8192, num_layers=80, num_heads=64,
                                  ffn_dim=28_672),
    "llama3.2-1b": lambda: _llama3("llama3.2-1b", d_model=2048, num_layers=16, num_heads=32,
                                   ffn_dim=8192, head_dim=64, tie=True,
                                   scaling=RopeScaling(factor=32.0), max_seq_len=131_072),
}


def names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get(name: str) -> ModelConfig:
    """The preset config ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"preset={name!r} is unknown; allowed: {list(_PRESETS)}")
    return _PRESETS[name]()
