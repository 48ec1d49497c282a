"""Every Hugging Face architecture llmarch reads and writes, and how one is chosen.

On import the ``config.json``'s ``model_type`` chooses (or, without one, its ``architectures``
class name). On export ``ModelConfig.hf_model_type`` (set by the import) chooses, so that a model
goes back out as the architecture it came in as; an explicit ``architecture=`` argument overrides
it. A config built in llmarch (``hf_model_type=None``) exports by ``default_architecture``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.architecture import Architecture
from llmarch.hf.deepseek_v3 import DEEPSEEK_V3
from llmarch.hf.llama import LLAMA
from llmarch.hf.mixtral import MIXTRAL
from llmarch.hf.qwen3 import QWEN3
from llmarch.hf.qwen3_moe import QWEN3_MOE

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, MIXTRAL, DEEPSEEK_V3, QWEN3, QWEN3_MOE)
BY_MODEL_TYPE: dict[str, Architecture] = {a.model_type: a for a in ARCHITECTURES}


def _allowed() -> str:
    return ", ".join(f"{a.model_type!r} ({a.hf_class})" for a in ARCHITECTURES)


def get(model_type: str, field: str = "architecture") -> Architecture:
    """The architecture of ``model_type``; ``field`` names where the value came from."""
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"{field}={model_type!r} is not supported; allowed: {_allowed()}")
    return BY_MODEL_TYPE[model_type]


def of_hf_config(hf: Mapping[str, Any]) -> Architecture:
    """The architecture a ``config.json`` dict describes, by ``model_type`` (or, when absent, by
    the class names in ``architectures``)."""
    kind, classes = hf.get("model_type"), hf.get("architectures") or []
    for a in ARCHITECTURES:
        if kind == a.model_type or (kind is None and a.hf_class in classes):
            return a
    raise ValueError(
        f"config.json model_type={kind!r} (architectures={classes}) is not supported; allowed: {_allowed()}"
    )


def default_architecture(cfg: ModelConfig) -> Architecture:
    """The architecture a config with no ``hf_model_type`` exports as, by its features: MLA blocks
    -> DeepSeek-V3; q/k norms -> Qwen3-MoE with MoE blocks, else Qwen3; MoE blocks -> Mixtral;
    otherwise Llama."""
    moe = any(b.ffn == "moe" for b in cfg.layer_blocks)
    if cfg.mla is not None:
        return DEEPSEEK_V3
    if cfg.attention.qk_norm:
        return QWEN3_MOE if moe else QWEN3
    return MIXTRAL if moe else LLAMA


def of_config(cfg: ModelConfig, architecture: str | None = None) -> Architecture:
    """The architecture ``cfg`` exports as: ``architecture`` when given, else ``cfg.hf_model_type``,
    else ``default_architecture(cfg)``."""
    if architecture is not None:
        return get(architecture)
    if cfg.hf_model_type is not None:
        return get(cfg.hf_model_type, "ModelConfig.hf_model_type")
    return default_architecture(cfg)
