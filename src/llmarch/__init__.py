"""llmarch: the architectures and techniques of LLM training and inference, in JAX."""

from llmarch import accounting, config, hf, ops, presets, sharding
from llmarch.config import AttentionConfig, BlockConfig, ModelConfig, RopeScaling
from llmarch.model import Transformer

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "accounting",
    "config",
    "hf",
    "ops",
    "presets",
    "sharding",
]
