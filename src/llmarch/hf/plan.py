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


def mtp_entries(
    cfg: ModelConfig, arch: Architecture, hf_config: Mapping[str, Any]
) -> tuple[list[Entry], list[Entry]]:
    """``(copies, own)``: the tensor-plan entries (``llmarch.hf.plan.Entry``) of the MTP modules of
    llmarch's model of ``cfg`` (``ModelConfig.mtp_depth``; none without). Depth ``d`` is checkpoint
    layer ``L + d`` (``model.layers.{L + d}.``):

    - own: ``enorm.weight``, ``hnorm.weight``, ``eh_proj.weight`` (``[D, 2D]``, our ``w [2D, D]``
      transposed), ``shared_head.norm.weight`` (the module's ``norm``), and the decoder-layer
      tensors of ``cfg.mtp_block_config`` (the architecture's block table) filling layer 0 of the
      module's one-block run ``("mtp", d, "block", "layers", ...)``;
    - copies: ``embed_tokens.weight`` and ``shared_head.head.weight``, the shared embedding and
      output head again, as DeepSeek's checkpoints store them (and vLLM and SGLang read them).
      ``tensor_plan`` puts them before the main model's entries, so on import the main tensors win.
    """
    if cfg.mtp_depth and arch.model_type != "deepseek_v3":
        raise ValueError(
            f"ModelConfig.mtp_depth={cfg.mtp_depth}: only DeepSeek-V3 checkpoints hold MTP modules, "
            f"not {arch.model_type!r}; allowed: 0 (cfg.replace(mtp_depth=0) and a model without them)"
        )
    copies: list[Entry] = []
    own: list[Entry] = []
    table = block_tensors(cfg.mtp_block_config, cfg, arch, hf_config) if cfg.mtp_depth else {}
    head = (("embed", "table_vd"), Same()) if cfg.tie_embeddings else (("lm_head", "w"), Linear())
    for d in range(cfg.mtp_depth):
        prefix = LAYER_PREFIX.format(cfg.num_layers + d)
        copies += [
            Entry(prefix + "embed_tokens.weight", ("embed", "table_vd"), None, Same()),
            Entry(prefix + "shared_head.head.weight", head[0], None, head[1]),
        ]
        own += [
            Entry(prefix + "enorm.weight", ("mtp", d, "enorm", "scale"), None, Same()),
            Entry(prefix + "hnorm.weight", ("mtp", d, "hnorm", "scale"), None, Same()),
            Entry(prefix + "eh_proj.weight", ("mtp", d, "eh_proj", "w"), None, Linear()),
            Entry(prefix + "shared_head.norm.weight", ("mtp", d, "norm", "scale"), None, Same()),
        ]
        own += [
            Entry(prefix + suffix, ("mtp", d, "block", "layers", *sub), 0, t)
            for suffix, rules in table.items()
            for sub, t in (rules if isinstance(rules, list) else [rules])
        ]
    return copies, own
