"""DeepSeek-V3's multi-token prediction (MTP) modules in a checkpoint: ``model.layers.{L + d}.*``.

DeepSeek's checkpoints (``num_nextn_predict_layers`` D > 0) store MTP depth ``d`` after the
``L = num_hidden_layers`` decoder layers, as layer ``L + d``: its embedding copy
(``embed_tokens.weight``), ``enorm``/``hnorm`` (the norms of the embedded next token and of the
previous depth's hidden state), ``eh_proj`` (``[D, 2D]``, FP8 in the published files), a full decoder
layer (``self_attn.*``, ``mlp.*``, its norms) and ``shared_head.norm``/``shared_head.head`` (copies
of the final norm and output head). transformers' ``DeepseekV3ForCausalLM`` does not load them.

llmarch reads them only where ``mtp_entries`` maps them onto the model's MTP modules
(``llmarch.layers.mtp``, ``ModelConfig.mtp_depth``). That mapping is not written yet, so
``without_mtp`` skips them with a logged warning naming how many and why (the main model's logits
do not use them), and exporting a model with MTP modules is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmarch.config import ModelConfig
from llmarch.hf.fields import read_int

if TYPE_CHECKING:
    from llmarch.hf.plan import Entry

logger = logging.getLogger(__name__)

DEPTH_FIELD = "num_nextn_predict_layers"


def mtp_layers(hf_config: Mapping[str, Any]) -> range:
    """The layer indices ``config.json`` gives MTP modules: ``L .. L + D - 1``."""
    layers = read_int(hf_config, "num_hidden_layers")
    return range(layers, layers + read_int(hf_config, DEPTH_FIELD, 0, minimum=0))


def mtp_tensor_names(names: list[str] | Mapping[str, Any], hf_config: Mapping[str, Any]) -> list[str]:
    """The names (of ``names``) under an MTP layer's prefix ``model.layers.{L + d}.``."""
    prefixes = tuple(f"model.layers.{i}." for i in mtp_layers(hf_config))
    return sorted(name for name in names if prefixes and name.startswith(prefixes))


def mtp_entries(cfg: ModelConfig, hf_config: Mapping[str, Any]) -> list[Entry]:
    """The tensor-plan entries (``llmarch.hf.plan.Entry``) of the MTP modules of llmarch's model of
    ``cfg``: ``tensor_plan`` appends them after the layers'.

    None yet: this is the one function to write to import and export them. llmarch's model holds
    them as ``mtp[d]`` (``llmarch.layers.mtp.MTPModule``: ``enorm``, ``hnorm``, ``eh_proj``, a
    one-layer ``block`` run, ``norm``), which maps as ``model.layers.{L + d}.`` + ``enorm.weight`` ->
    ``("mtp", d, "enorm", "scale")``, ``hnorm.weight``, ``eh_proj.weight`` (``Linear()``),
    ``shared_head.norm.weight`` -> ``norm``, and the architecture's block tables
    (``plan.block_tensors`` of ``cfg.mtp_block_config``) under ``("mtp", d, "block", "layers")`` at
    layer 0; ``embed_tokens`` and ``shared_head.head`` are copies of the shared embedding and head.
    ``config_from_hf`` would then set ``mtp_depth`` when a checkpoint holds the tensors (transformers
    writes ``num_nextn_predict_layers=1`` into checkpoints without them).

    Raises:
      ValueError: for ``cfg.mtp_depth > 0``, until the mapping exists.
    """
    depth = getattr(cfg, "mtp_depth", 0)
    if depth:
        raise ValueError(
            f"ModelConfig.mtp_depth={depth} has no Hugging Face tensors in llmarch yet "
            "(llmarch.hf.mtp.mtp_entries); allowed: 0, e.g. cfg.replace(mtp_depth=0) and the model without "
            "its MTP modules"
        )
    return []


def without_mtp(
    files: Mapping[str, Path], hf_config: Mapping[str, Any], cfg: ModelConfig, root: Path
) -> dict[str, Path]:
    """``files`` (tensor name -> file) less the MTP tensors llmarch's model does not hold, each
    skip announced by a warning on ``llmarch.hf.mtp``'s logger; never silent."""
    names = mtp_tensor_names(files, hf_config)
    held = {e.name for e in mtp_entries(cfg, hf_config)}
    skipped = [name for name in names if name not in held]
    if skipped:
        why = (
            "llmarch's ModelConfig has no MTP modules"
            if not hasattr(cfg, "mtp_depth")
            else "llmarch.hf does not map MTP modules yet (llmarch.hf.mtp.mtp_entries), so the model is "
            f"built with ModelConfig.mtp_depth={cfg.mtp_depth}"
        )
        layers = mtp_layers(hf_config)
        logger.warning(
            "%s: skipped %d multi-token prediction tensors (%s=%d: model.layers.%d-%d.*): %s; the main "
            "model's next-token logits do not use them",
            root,
            len(skipped),
            DEPTH_FIELD,
            len(layers),
            layers.start,
            layers.stop - 1,
            why,
        )
    return {name: f for name, f in files.items() if name not in skipped}
