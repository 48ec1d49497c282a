"""``config.json`` <-> ModelConfig, through the architecture records (``llmarch.hf.architectures``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf import architectures
from llmarch.hf.plan import check_blocks
from llmarch.json_config import json_kind


def config_from_hf(hf: Mapping[str, Any], *, name: str = "hf") -> ModelConfig:
    """The ModelConfig of a transformers ``config.json`` dict of a supported architecture
    (``llmarch.hf.ARCHITECTURES``), with ``hf_model_type`` recording which.

    Raises:
      ValueError: naming the field, for a model type or feature that llmarch cannot run, or a
        field of the wrong type or out of range.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json must hold a JSON object, not {json_kind(hf)}")
    return architectures.of_hf_config(hf).from_hf(hf, name)


def config_to_hf(cfg: ModelConfig, *, architecture: str | None = None) -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.56+ and 5 read as the architecture ``cfg``
    exports as: ``architecture`` (a model_type) when given, else ``cfg.hf_model_type``, else the
    rule of ``llmarch.hf.architectures.default_architecture``.

    Raises:
      ValueError: naming the config field (or block kind) the architecture cannot hold, or an
        unknown model_type.
    """
    arch = architectures.of_config(cfg, architecture)
    fields = arch.to_hf(cfg)
    check_blocks(cfg, arch)
    return {"architectures": [arch.hf_class], "model_type": arch.model_type, **fields}
