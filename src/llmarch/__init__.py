"""llmarch: the architectures and techniques of LLM training and inference, in JAX."""

# vision: imported for its registration of LLaVA with llmarch.hf (load_pretrained/save_pretrained),
# which sits below it and cannot import it.
from llmarch import accounting, config, hf, ops, presets, sharding, vision
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
    "vision",
]
