"""One Hugging Face architecture as a record: what ``llmarch.hf`` needs to import and export it.

Each ``llmarch.hf.<model_type>`` module declares one ``Architecture``; ``llmarch.hf.architectures``
gathers them. Nothing is registered by importing a module: the tuple there is the whole list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.rules import Table, TableFn


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A transformers causal LM that llmarch reads and writes.

    Attributes:
      model_type: ``config.json``'s ``model_type``, e.g. ``"qwen3"``; also ``ModelConfig.hf_model_type``.
      hf_class: the transformers class ``config.json``'s ``architectures`` names, e.g. ``"Qwen3ForCausalLM"``.
      from_hf: ``(config.json dict, name) -> ModelConfig``; raises ValueError naming an unsupported or
        invalid field.
      to_hf: ``ModelConfig -> config.json fields`` (all but ``architectures`` and ``model_type``);
        raises ValueError naming a config field the architecture cannot hold.
      attention: block attention kind (``BlockConfig.attention``) -> its tensors in one layer.
      ffn: block FFN kind (``BlockConfig.ffn``) -> its tensors in one layer.
    """

    model_type: str
    hf_class: str
    from_hf: Callable[[Mapping[str, Any], str], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    attention: Mapping[str, Table | TableFn]
    ffn: Mapping[str, Table | TableFn]
