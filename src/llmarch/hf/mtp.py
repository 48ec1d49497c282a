"""DeepSeek-V3's multi-token prediction (MTP) modules in a checkpoint: ``model.layers.{L + d}.*``.

DeepSeek's checkpoints (``num_nextn_predict_layers`` D > 0) store MTP depth ``d`` after the
``L = num_hidden_layers`` decoder layers, as layer ``L + d``: its embedding copy
(``embed_tokens.weight``), ``enorm``/``hnorm`` (the norms of the embedded next token and of the
previous depth's hidden state), ``eh_proj`` (``[D, 2D]``, FP8 in the published files), a full decoder
layer (``self_attn.*``, ``mlp.*``, its norms) and ``shared_head.norm``/``shared_head.head`` (copies
of the final norm and output head). transformers' ``DeepseekV3ForCausalLM`` does not load them.

``llmarch.hf.plan.mtp_entries`` maps them onto the model's MTP modules (``llmarch.layers.mtp``,
``ModelConfig.mtp_depth``): ``load_pretrained`` builds the model with ``mtp_depth`` set from the
layers the checkpoint holds, and ``save_pretrained`` writes them (``num_nextn_predict_layers``), for
DeepSeek-V3 only. Loading with ``mtp=False`` skips them (``skip_mtp_tensors``), with a logged warning
naming how many and why: the main model's next-token logits do not use them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.fields import read_int

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


def depth_held(files: Mapping[str, Any], hf_config: Mapping[str, Any]) -> int:
    """The MTP depth a checkpoint's tensors hold: ``num_nextn_predict_layers`` when every such layer
    has tensors in ``files``, 0 when none has (transformers writes ``num_nextn_predict_layers=1``
    into checkpoints without them).

    Raises:
      ValueError: some MTP layers present and others missing.
    """
    layers = mtp_layers(hf_config)
    present = [i for i in layers if any(n.startswith(f"model.layers.{i}.") for n in files)]
    if present and len(present) != len(layers):
        raise ValueError(
            f"{DEPTH_FIELD}={len(layers)} but only layers {present} of model.layers.{layers.start}-"
            f"{layers.stop - 1} have tensors: a checkpoint holds all its MTP layers or none"
        )
    return len(present)


def skip_mtp_tensors(
    files: Mapping[str, Path], hf_config: Mapping[str, Any], cfg: ModelConfig, root: Path
) -> dict[str, Path]:
    """``files`` (tensor name -> file) less the MTP tensors llmarch's model does not hold, each
    skip announced by a warning on ``llmarch.hf.mtp``'s logger; never silent."""
    names = mtp_tensor_names(files, hf_config)
    held = set(names) if cfg.mtp_depth else set()  # with MTP modules, mtp_entries maps every one
    skipped = [name for name in names if name not in held]
    if skipped:
        why = "the model is built with ModelConfig.mtp_depth=0"
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
