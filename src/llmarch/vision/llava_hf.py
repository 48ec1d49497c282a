"""transformers' ``LlavaForConditionalGeneration`` (SigLIP tower, Llama decoder) <-> ``Llava``.

A checkpoint is three models side by side, each read by the mapping that already exists for it:

- the tower (``vision_tower.`` + SigLIP names) by ``llmarch.vision.hf``, which finds its prefix
  (``vision_tower.``, ``vision_tower.vision_model.`` in transformers 4, ``model.vision_tower.`` in a
  transformers 5 state dict). LLaVA never reads the tower's MAP head or pooled vector, so ``head.*``
  is skipped and a saved checkpoint says ``vision_use_head: false``;
- the decoder by ``llmarch.hf`` (Llama's tensor plan), under its names renamed to a causal LM's:
  ``language_model.model.X`` -> ``model.X`` and ``language_model.lm_head.weight`` -> ``lm_head.weight``
  (what ``save_pretrained`` writes, in transformers 4 and 5), or ``model.language_model.X`` ->
  ``model.X`` with ``lm_head.weight`` as is (transformers 5's in-memory names);
- the projector: ``multi_modal_projector.linear_{1,2}.weight [out,in]`` -> ``projector.linear_{1,2}``
  ``[in,out]`` (``Linear``), ``.bias`` -> ``b_1_f``, ``b_2_d``.

``save_llava`` writes the names ``save_pretrained`` writes, so transformers 4 and 5 both load it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from llmarch import sharding
from llmarch.hf.config_json import config_from_hf as text_config_from_hf
from llmarch.hf.config_json import config_to_hf as text_config_to_hf
from llmarch.hf.convert import from_hf_tensors, to_hf_tensors
from llmarch.hf.fields import dtype_name, read_bool, read_int, read_object
from llmarch.hf.files import (
    CONFIG_FILE,
    listed,
    write_checkpoint,
)
from llmarch.hf.pretrained import Family, register_family
from llmarch.hf.rules import Linear, Same
from llmarch.vision import hf as vhf
from llmarch.vision.llava import Llava, LlavaConfig

MODEL_TYPE, HF_CLASS = "llava", "LlavaForConditionalGeneration"
# (decoder prefix, lm_head name, projector prefix): save_pretrained's names, then transformers 5's.
LAYOUTS = (
    ("language_model.model.", "language_model.lm_head.weight", "multi_modal_projector."),
    ("model.language_model.", "lm_head.weight", "model.multi_modal_projector."),
)
# Projector tensor (after its prefix) -> (our variable's path in Projector, transform).
PROJECTOR = {
    "linear_1.weight": (("linear_1", "w"), Linear()),
    "linear_1.bias": (("b_1_f",), Same()),
    "linear_2.weight": (("linear_2", "w"), Linear()),
    "linear_2.bias": (("b_2_d",), Same()),
}


class Renamed(Mapping):
    """A view of ``tensors`` under other names (``ours -> theirs``), read lazily as they are."""

    def __init__(self, tensors: Mapping[str, Any], names: Mapping[str, str]):
        self._tensors, self._names = tensors, dict(names)

    def __getitem__(self, name: str) -> Any:
        return self._tensors[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def config_from_hf(hf: Mapping[str, Any], *, name: str = "llava", **overrides: Any) -> LlavaConfig:
    """A ``LlavaConfig`` from a ``LlavaConfig`` ``config.json`` dict; ``overrides``: LlavaConfig fields.

    Raises:
      ValueError: naming the field, for another model_type, a tower other than SigLIP's, a decoder
        llmarch.hf cannot read, or a list of feature layers (HF concatenates them; not supported).
    """
    kind = hf.get("model_type")
    if kind != MODEL_TYPE:
        raise ValueError(f"config.json model_type={kind!r} is not supported here; allowed: {MODEL_TYPE!r}")
    for key in ("vision_config", "text_config"):  # HF's defaults (CLIP-L, Llama-7B) are never meant
        if not read_object(hf, key):
            raise ValueError(f"config.json has no {key!r}: the model needs it")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(
            f"config.json vision_feature_layer={layer!r} is not supported: allowed: one integer "
            "(several layers, concatenated, are not implemented)"
        )
    token = "image_token_index" if "image_token_index" in hf else "image_token_id"  # 4.x, 5.x names
    fields = dict(
        vision=vhf.config_from_hf(read_object(hf, "vision_config"), use_head=False),
        text=text_config_from_hf(read_object(hf, "text_config"), name=name),
        image_token_id=read_int(hf, token, 32000, minimum=0),
        vision_feature_layer=layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        projector_activation=hf.get("projector_hidden_act", "gelu"),
        projector_bias=read_bool(hf, "multimodal_projector_bias", True),
    )
    return LlavaConfig(**{**fields, **overrides})


def config_to_hf(cfg: LlavaConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``LlavaForConditionalGeneration`` of ``cfg``."""
    text, vision = text_config_to_hf(cfg.text), vhf.config_to_hf(cfg.vision)
    text.pop("architectures")
    vision.pop("architectures")
    return {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_tokens,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_activation,
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.text.tie_embeddings,
        "text_config": text,
        "vision_config": vision,
        "dtype": cfg.text.param_dtype,
    }


def _layout(names) -> tuple[str, str, str]:
    for layout in LAYOUTS:
        if any(n.startswith(layout[0]) for n in names):
            return layout
    raise ValueError(f"no LLaVA decoder tensors: none is named {' or '.join(p + '*' for p, _, _ in LAYOUTS)}")


def from_hf(tensors: Mapping[str, Any], cfg: LlavaConfig) -> Llava:
    """A ``Llava`` of ``cfg`` holding ``tensors`` (HF names and torch layouts: a checkpoint's lazy
    tensors or a state dict), with no random init; placed sharded under ``llmarch.sharding.use``.

    Raises:
      ValueError: listing tensors that belong to no part, or naming a part's missing, unexpected or
        wrongly shaped tensors.
    """
    names = list(tensors)
    text, head, proj = _layout(names)
    vision_prefix = vhf.find_prefix(names)
    text_names = {"model." + n.removeprefix(text): n for n in names if n.startswith(text)}
    if head in tensors:
        text_names["lm_head.weight"] = head
    proj_names = {n.removeprefix(proj): n for n in names if n.startswith(proj)}
    stray = sorted(n for n in names if not (n.startswith((vision_prefix, text, proj)) or n == head))
    if stray:
        raise ValueError(f"tensors that are no part of a LLaVA model: [{listed(stray)}]")
    vision = vhf.from_hf(tensors, cfg.vision, prefix=vision_prefix)
    try:
        language_model = from_hf_tensors(Renamed(tensors, text_names), cfg.text)
    except ValueError as e:
        raise ValueError(f"decoder tensors (under {text!r}, names shown as a causal LM's): {e}") from None
    with nnx.use_eager_sharding(False):  # shapes only; _place shards by the same logical names
        model = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model.projector)
    variables = dict(nnx.to_flat_state(state))
    table = {k: v for k, v in PROJECTOR.items() if v[0] in variables}
    missing, unexpected = sorted(table.keys() - proj_names.keys()), sorted(proj_names.keys() - table.keys())
    if missing or unexpected:
        raise ValueError(
            f"projector tensors under {proj!r} do not match the LlavaConfig: missing [{listed(missing)}]; "
            f"unexpected [{listed(unexpected)}]"
        )
    values = {}
    for name, (path, t) in table.items():
        target = variables[path].get_value()
        w = vhf.to_numpy(tensors[proj_names[name]])
        if w.shape != t.hf_shape(target.shape):
            raise ValueError(
                f"tensor {proj_names[name]} has shape {w.shape}: the config needs {t.hf_shape(target.shape)}"
            )
        values[path] = t.from_hf(w, target.shape).astype(target.dtype)
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in variables.items()])
    model.vision, model.language_model = vision, language_model
    model.projector = nnx.merge(graphdef, sharding.place(state))
    return model


def to_hf(model: Llava) -> dict[str, np.ndarray]:
    """The model's weights under the names ``save_pretrained`` writes, in torch layouts."""
    text, head, proj = LAYOUTS[0]
    out = vhf.to_hf(model.vision, prefix="vision_tower.")
    for name, w in to_hf_tensors(model.language_model, model.cfg.text).items():
        out[head if name == "lm_head.weight" else text + name.removeprefix("model.")] = w
    flat = dict(nnx.to_flat_state(nnx.state(model.projector)))
    for name, (path, t) in PROJECTOR.items():
        if path in flat:
            out[proj + name] = np.ascontiguousarray(t.to_hf(np.asarray(flat[path].get_value())))
    return out


def load_llava(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    config: LlavaConfig | Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> tuple[Llava, LlavaConfig]:
    """Loads a LLaVA checkpoint directory (``config.json`` + safetensors, as ``save_pretrained``
    writes) or a state dict (then ``config``, a LlavaConfig or a HF config dict, is required).

    Args:
      dtype: parameter and compute dtype of both models (e.g. ``"bfloat16"``); None keeps float32.
    Returns:
      ``(model, cfg)``.
    """
    tensors, config, root = vhf.read_source(path_or_state_dict, config, "LlavaConfig")
    try:
        cfg = config if isinstance(config, LlavaConfig) else config_from_hf(config, name=_name(root))
        if dtype is not None:
            name = dtype_name(dtype)
            cfg = cfg.replace(
                vision=cfg.vision.replace(dtype=name, param_dtype=name),
                text=cfg.text.replace(dtype=name, param_dtype=name),
            )
    except ValueError as e:
        raise ValueError(f"{root / CONFIG_FILE if root else 'config'}: {e}") from None
    return from_hf(tensors, cfg), cfg


def _name(root: Path | None) -> str:
    return "llava" if root is None else root.resolve().name


def save_llava(model: Llava, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes ``config.json`` and safetensors that ``LlavaForConditionalGeneration.from_pretrained``
    loads (the tower without its MAP head: ``vision_use_head: false``)."""
    write_checkpoint(Path(path), config_to_hf(model.cfg), to_hf(model), max_shard_bytes)


# llmarch.hf.load_pretrained / save_pretrained read and write LLaVA directories through this.
register_family(Family("llava", load=load_llava, save=save_llava, model_class=Llava))
