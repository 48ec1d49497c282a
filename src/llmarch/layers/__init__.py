"""The layers: each built on its own from its sub-config and explicit dimensions, e.g.
``MLA(d_model, MLAConfig(...), rngs=nnx.Rngs(0))``, with no ``ModelConfig`` and no mesh.

``kinds`` is the registry that names them for ``BlockConfig`` and says how ``llmarch.model``
builds each from a ``ModelConfig``; the helper modules (``moe_routing``, ``moe_dispatch``,
``memory_search``, ...) hold the math the layers are made of.
"""

from llmarch.layers import kinds
from llmarch.layers.attention import Attention, KVCache
from llmarch.layers.configs import (
    AttentionConfig,
    MemoryConfig,
    MLAConfig,
    MoEConfig,
    RopeScaling,
    YarnScaling,
)
from llmarch.layers.einsum import Einsum, param
from llmarch.layers.embed import Embed
from llmarch.layers.ffn import SwiGLU
from llmarch.layers.memory import MemoryLayer
from llmarch.layers.mla import MLA, MLACache
from llmarch.layers.moe import MoE
from llmarch.layers.norms import RMSNorm

__all__ = [
    "MLA",
    "Attention",
    "AttentionConfig",
    "Einsum",
    "Embed",
    "KVCache",
    "MLACache",
    "MLAConfig",
    "MemoryConfig",
    "MemoryLayer",
    "MoE",
    "MoEConfig",
    "RMSNorm",
    "RopeScaling",
    "SwiGLU",
    "YarnScaling",
    "kinds",
    "param",
]
