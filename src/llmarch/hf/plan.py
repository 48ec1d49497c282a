"""The tensor plan: every Hugging Face tensor of a model of a config, and the variable it fills.

A checkpoint holds the model's ends (``MODEL_TENSORS``) and, for each layer ``i``, tensors named
``model.layers.{i}.`` + a name from the layer's tables: the norms every block has
(``BLOCK_TENSORS``) and the architecture's table for the block's attention kind and FFN kind. Layers
of one run are stacked in our state, so a layer's tensor fills one index of the run's layers axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from llmarch.config import BlockConfig, ModelConfig
from llmarch.hf.architecture import Architecture
from llmarch.hf.mtp import mtp_entries
from llmarch.hf.rules import Linear, Rule, Same, Table, Transform, table_of
from llmarch.model import run_layout

LM_HEAD = "lm_head.weight"
MODEL_TENSORS: dict[str, Rule] = {
    "model.embed_tokens.weight": (("embed", "table_vd"), Same()),
    "model.norm.weight": (("final_norm", "scale"), Same()),
    LM_HEAD: (("lm_head", "w"), Linear()),  # [V,D] vs [D,V]; absent with tied embeddings
}
LAYER_PREFIX = "model.layers.{}."
# Below: names after LAYER_PREFIX -> path inside one block (the run adds the layers axis).
BLOCK_TENSORS: dict[str, Rule] = {
    "input_layernorm.weight": (("attn_norm", "scale"), Same()),
    "post_attention_layernorm.weight": (("ffn_norm", "scale"), Same()),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: ``layer`` indexes the run's stacked layers axis (None: not stacked)."""

    name: str
    path: tuple[str | int, ...]
    layer: int | None
    transform: Transform


def check_blocks(cfg: ModelConfig, arch: Architecture) -> None:
    """Raises ValueError when a block of ``cfg`` has a kind ``arch`` has no tensor table for, or when
    ``cfg`` has factorized weights or skip-layer modules (no architecture holds them)."""
    if cfg.low_rank:
        raise ValueError(
            f"ModelConfig.low_rank holds {len(cfg.low_rank)} factorized weights, which Hugging Face "
            "checkpoints cannot hold; allowed: None (export the checkpoint it was factorized from)"
        )
    if cfg.skip_layers:
        raise ValueError(
            f"ModelConfig.skip_layers={cfg.skip_layers} has no Hugging Face equivalent; allowed: ()"
        )
    for kinds in dict.fromkeys(cfg.layer_blocks):
        for field, kind, tables in (
            ("attention", kinds.attention, arch.attention),
            ("ffn", kinds.ffn, arch.ffn),
        ):
            if kind not in tables:
                raise ValueError(
                    f"BlockConfig.{field}={kind!r} has no {arch.hf_class} tensors "
                    f"(model_type {arch.model_type!r}); allowed: {sorted(tables)}"
                )


def block_tensors(
    kinds: BlockConfig, cfg: ModelConfig, arch: Architecture, hf_config: Mapping[str, Any]
) -> Table:
    """The HF tensors of one block of ``kinds`` (of ``cfg``), by name after ``LAYER_PREFIX``."""
    return {
        **BLOCK_TENSORS,
        **table_of(arch.attention[kinds.attention], cfg, hf_config),
        **table_of(arch.ffn[kinds.ffn], cfg, hf_config),
    }


def tensor_plan(cfg: ModelConfig, arch: Architecture, hf_config: Mapping[str, Any]) -> list[Entry]:
    """Every HF tensor of a model of ``cfg`` (fused ones once per ``Part``) and where it lives.

    ``hf_config``: the ``config.json`` dict read (on import) or written (on export).
    """
    check_blocks(cfg, arch)
    copies, mtp = mtp_entries(cfg, arch, hf_config)  # DeepSeek's MTP layers after the decoder's
    plan = copies + [
        Entry(name, path, None, t)
        for name, (path, t) in MODEL_TENSORS.items()
        if not (name == LM_HEAD and cfg.tie_embeddings)
    ]
    for r, (kinds, first, count) in enumerate(run_layout(cfg)):
        table = block_tensors(kinds, cfg, arch, hf_config)
        for j in range(count):
            prefix = LAYER_PREFIX.format(first + j)
            plan += [
                Entry(prefix + suffix, ("runs", r, "layers", *sub), j, t)
                for suffix, rules in table.items()
                for sub, t in (rules if isinstance(rules, list) else [rules])
            ]
    return plan + mtp
