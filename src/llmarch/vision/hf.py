"""transformers' ``SiglipVisionModel`` <-> ``SiglipVision``: config fields, tensor names and layouts.

Every tensor is mapped explicitly by ``tensor_table`` (names after the tower's prefix, see ``ANCHOR``;
``L.`` is ``encoder.layers.{i}.``, our ``encoder.layers`` variables have a leading layers axis):

- ``embeddings.patch_embedding.weight [D,C,p,p]`` -> ``w_patch_od [O,D]``, ``O = C*p*p``:
  ``reshape(D, O).T`` (``Conv``); its bias ``[D]`` -> ``b_patch_d``.
- ``embeddings.position_embedding.weight [T,D]`` -> ``pos_td [T,D]`` as is.
- ``L.layer_norm1``, ``L.layer_norm2``, ``post_layernorm`` (weight, bias) -> ``attn_norm``,
  ``mlp_norm``, ``final_norm`` (scale, bias) as is.
- ``L.self_attn.{q,k,v}_proj.weight [N*H,D]`` -> ``attn.w_{q,k,v}_dnh [D,N,H]``: ``.T.reshape``
  (``Linear``); biases ``[N*H]`` -> ``b_{q,k,v}_nh [N,H]`` (``Reshape``).
- ``L.self_attn.out_proj.weight [D,N*H]`` -> ``attn.w_o_nhd [N,H,D]`` (``Linear(in_axes=2)``);
  bias -> ``b_o_d``.
- ``L.mlp.fc1.weight [F,D]``, ``fc2 [D,F]`` -> ``mlp.w_up_df [D,F]``, ``w_down_fd [F,D]`` (``Linear``);
  biases -> ``b_up_f``, ``b_down_d``.
- MAP head: ``head.probe [1,1,D]`` -> ``head.probe_d [D]``; ``head.attention.in_proj_weight
  [3D,D]`` / ``in_proj_bias [3D]`` (q, k, v row blocks, ``FUSED``) split into ``head.attn``'s q, k,
  v as above; ``out_proj``, ``layernorm``, ``mlp`` as in a layer (``head.attn``, ``head.norm``,
  ``head.mlp``).

The encoder's layers are stacked in our state, so layer ``i``'s tensor fills index ``i`` of the
leading ``layers`` axis. Conversions are exact (reshapes and transposes only), so a round trip
gives back the same bits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from llmarch import sharding
from llmarch.hf.fields import dtype_name
from llmarch.hf.files import (
    CONFIG_FILE,
    HF_CHECKPOINT,
    CheckpointTensors,
    listed,
    weight_files,
    write_checkpoint,
)
from llmarch.hf.rules import Linear, Same
from llmarch.json_config import read_json
from llmarch.run_format import existing_dir
from llmarch.vision.config import VisionConfig
from llmarch.vision.siglip import SiglipVision

# The tensor that finds the tower in a checkpoint: its names start with whatever precedes this one
# ("" in transformers 5's SiglipVisionModel, "vision_model." in SiglipModel and transformers 4,
# "model.vision_tower." or "vision_tower.vision_model." in LLaVA checkpoints).
ANCHOR = "embeddings.patch_embedding.weight"
MODEL_TYPE, HF_CLASS = "siglip_vision_model", "SiglipVisionModel"
LAYER = "encoder.layers.{}."
# config.json field -> VisionConfig field, with transformers' default for a field left out.
FIELDS = {
    "image_size": ("image_size", 224),
    "patch_size": ("patch_size", 16),
    "num_channels": ("num_channels", 3),
    "hidden_size": ("hidden_size", 768),
    "intermediate_size": ("intermediate_size", 3072),
    "num_hidden_layers": ("num_layers", 12),
    "num_attention_heads": ("num_heads", 12),
    "layer_norm_eps": ("layer_norm_eps", 1e-6),
    "hidden_act": ("activation", "gelu_pytorch_tanh"),
    "vision_use_head": ("use_head", True),
}
# torch.nn.MultiheadAttention fuses the head's q, k, v rows; we split them into these names.
FUSED = {
    "head.attention.in_proj_weight": "head.attention.{}_proj.weight",
    "head.attention.in_proj_bias": "head.attention.{}_proj.bias",
}


@dataclasses.dataclass(frozen=True)
class Reshape:
    """The same values in another shape: ``b_q_nh [N,H]`` vs ``[N*H]``, ``probe_d [D]`` vs ``[1,1,D]``."""

    hf: tuple[int, ...]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.hf

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.hf)

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Conv:
    """The patch conv ``[D,C,p,p]`` (kernel = stride = p) against ``w_patch_od [O,D]``, ``O = C*p*p``
    flattened in the conv's (channel, row, column) order, as ``siglip.patchify`` flattens a patch."""

    channels: int
    patch: int

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[1], self.channels, self.patch, self.patch)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w.T.reshape(self.hf_shape(w.shape))

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w.reshape(w.shape[0], -1).T


def _attention(cfg: VisionConfig, hf: str, ours: tuple[str, ...], out: str) -> dict:
    nh = (cfg.num_heads * cfg.head_dim,)
    table = {f"{hf}{x}_proj.weight": ((*ours, f"w_{x}_dnh", "w"), Linear()) for x in "qkv"}
    table |= {f"{hf}{x}_proj.bias": ((*ours, f"b_{x}_nh"), Reshape(nh)) for x in "qkv"}
    table[f"{hf}{out}.weight"] = ((*ours, "w_o_nhd", "w"), Linear(in_axes=2))
    table[f"{hf}{out}.bias"] = ((*ours, "b_o_d"), Same())
    return table


def _mlp_and_norm(hf: str, ours: tuple[str, ...], hf_norm: str, norm: str) -> dict:
    return {
        f"{hf}mlp.fc1.weight": ((*ours, "mlp", "w_up_df", "w"), Linear()),
        f"{hf}mlp.fc1.bias": ((*ours, "mlp", "b_up_f"), Same()),
        f"{hf}mlp.fc2.weight": ((*ours, "mlp", "w_down_fd", "w"), Linear()),
        f"{hf}mlp.fc2.bias": ((*ours, "mlp", "b_down_d"), Same()),
        f"{hf}{hf_norm}.weight": ((*ours, norm, "scale"), Same()),
        f"{hf}{hf_norm}.bias": ((*ours, norm, "bias"), Same()),
    }


def tensor_table(cfg: VisionConfig) -> dict[str, tuple[tuple[str, ...], int | None, Any]]:
    """HF name (after the prefix, the head's in_proj split by ``FUSED``) -> (our variable's path,
    its layer index or None, transform)."""
    table = {
        "embeddings.patch_embedding.weight": (("w_patch_od", "w"), Conv(cfg.num_channels, cfg.patch_size)),
        "embeddings.patch_embedding.bias": (("b_patch_d",), Same()),
        "embeddings.position_embedding.weight": (("pos_td",), Same()),
        "post_layernorm.weight": (("final_norm", "scale"), Same()),
        "post_layernorm.bias": (("final_norm", "bias"), Same()),
    }
    if cfg.use_head:
        table["head.probe"] = (("head", "probe_d"), Reshape((1, 1, cfg.hidden_size)))
        table |= _attention(cfg, "head.attention.", ("head", "attn"), "out_proj")
        table |= _mlp_and_norm("head.", ("head",), "layernorm", "norm")
    out = {name: (path, None, t) for name, (path, t) in table.items()}
    layer = _attention(cfg, "self_attn.", ("encoder", "layers", "attn"), "out_proj")
    layer |= _mlp_and_norm("", ("encoder", "layers"), "layer_norm2", "mlp_norm")
    layer |= {
        f"layer_norm1.{x}": (("encoder", "layers", "attn_norm", y), Same())
        for x, y in (("weight", "scale"), ("bias", "bias"))
    }
    for i in range(cfg.num_layers):
        out |= {LAYER.format(i) + name: (path, i, t) for name, (path, t) in layer.items()}
    return out


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> VisionConfig:
    """A ``VisionConfig`` from a ``SiglipVisionConfig`` dict (or a ``SiglipConfig``/LLaVA dict with a
    ``vision_config``); ``overrides`` replace fields (e.g. ``use_head=False``)."""
    hf = hf.get("vision_config", hf)
    kind = hf.get("model_type", MODEL_TYPE)
    if kind not in (MODEL_TYPE, "siglip"):
        raise ValueError(f"config.json model_type={kind!r} is not supported; allowed: {MODEL_TYPE!r}")
    fields = {ours: hf.get(name, default) for name, (ours, default) in FIELDS.items()}
    return VisionConfig(**{**fields, **overrides})


def config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``SiglipVisionModel`` of ``cfg``."""
    fields = {name: getattr(cfg, ours) for name, (ours, _) in FIELDS.items()}
    return {"architectures": [HF_CLASS], "model_type": MODEL_TYPE, **fields, "dtype": cfg.param_dtype}


def to_numpy(w: Any) -> np.ndarray:
    """A checkpoint tensor (torch or array-like) as a numpy array; bfloat16 torch tensors as float32."""
    if hasattr(w, "detach"):  # a torch tensor; numpy has no bfloat16, so that one goes via float32
        w = w.detach().cpu()
        w = w.float() if str(w.dtype) == "torch.bfloat16" else w
        return w.numpy()
    return np.asarray(w)


def find_prefix(names) -> str:
    """The prefix of the one SigLIP tower among tensor ``names`` (see ``ANCHOR``)."""
    found = sorted(n.removesuffix(ANCHOR) for n in names if n.endswith(ANCHOR))
    if len(found) != 1:
        raise ValueError(
            f"found {len(found)} tensors named *{ANCHOR} ({listed(found)}): pass prefix= to say which "
            "tower to load (the part of the names before 'embeddings.')"
        )
    return found[0]


def from_hf(tensors: Mapping[str, Any], cfg: VisionConfig, *, prefix: str | None = None) -> SiglipVision:
    """A ``SiglipVision`` of ``cfg`` holding ``tensors`` (HF names and torch layouts: a state dict of
    torch tensors or arrays, or a checkpoint's lazy tensors), with no random init.

    ``prefix`` (None: found by ``find_prefix``) starts the tower's names. Tensors outside it are not
    the tower's (a SigLIP text tower, a LLaVA language model) and are not read; those under it must
    match ``tensor_table(cfg)`` exactly, except that a config without the head skips the checkpoint's
    ``head.*`` (LLaVA-style use of a tower trained with one: the choice is the caller's ``use_head``).

    Raises:
      ValueError: listing missing and unexpected tensor names, or naming a wrong shape.
    """
    prefix = find_prefix(tensors) if prefix is None else prefix
    ours = {k.removeprefix(prefix): k for k in tensors if k.startswith(prefix)}
    if not cfg.use_head:
        ours = {k: v for k, v in ours.items() if not k.startswith("head.")}
    hf: dict[str, Any] = {k: v for k, v in ours.items() if k not in FUSED}  # name -> key, read late
    D = cfg.hidden_size
    for fused, split in FUSED.items():
        if fused in ours:
            w = to_numpy(tensors[ours[fused]])
            if w.shape[0] != 3 * D:
                raise ValueError(
                    f"tensor {prefix}{fused} has shape {w.shape}: the config needs [{3 * D}, ...]"
                )
            hf |= {split.format(x): w[j * D : (j + 1) * D] for j, x in enumerate("qkv")}
    table = tensor_table(cfg)
    missing, unexpected = sorted(table.keys() - hf.keys()), sorted(hf.keys() - table.keys())
    if missing or unexpected:
        raise ValueError(
            f"tensors under {prefix!r} do not match the VisionConfig: missing [{listed(missing)}]; "
            f"unexpected [{listed(unexpected)}]"
        )
    with nnx.use_eager_sharding(False):  # shapes only; _place shards by the same logical names
        graphdef, state = nnx.split(nnx.eval_shape(lambda: SiglipVision(cfg, rngs=nnx.Rngs(0))))
    variables = dict(nnx.to_flat_state(state))
    values: dict[tuple, np.ndarray] = {}
    for name, (path, layer, t) in table.items():
        target = variables[path].get_value()
        shape = tuple(target.shape[layer is not None :])
        w = to_numpy(tensors[hf[name]] if isinstance(hf[name], str) else hf[name])
        if w.shape != t.hf_shape(shape):
            raise ValueError(
                f"tensor {prefix}{name} has shape {w.shape}: the config needs {t.hf_shape(shape)}"
            )
        w = t.from_hf(w, shape).astype(target.dtype)
        if layer is None:
            values[path] = w
        else:
            values.setdefault(path, np.empty(target.shape, target.dtype))[layer] = w
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in variables.items()])
    return nnx.merge(graphdef, sharding.place(state))


def to_hf(model: SiglipVision, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's weights as contiguous numpy arrays under HF names, in torch layouts; ``prefix=""``
    names them as transformers 5's ``SiglipVisionModel`` does (``"vision_model."`` for a SiglipModel)."""
    flat = {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model))}
    out = {}
    for name, (path, layer, t) in tensor_table(model.cfg).items():
        out[name] = np.ascontiguousarray(t.to_hf(flat[path] if layer is None else flat[path][layer]))
    for fused, split in FUSED.items():
        if split.format("q") in out:
            out[fused] = np.concatenate([out.pop(split.format(x)) for x in "qkv"])
    return {prefix + name: w for name, w in out.items()}


def read_source(path_or_state_dict: Any, config: Any, config_type: str) -> tuple[Any, Any, Path | None]:
    """``(tensors, config, root)`` of a checkpoint directory (its ``config.json`` unless ``config``
    is given) or of a state dict (``config``, a ``config_type`` or a HF config dict, required);
    ``root`` is None for a state dict."""
    if isinstance(path_or_state_dict, Mapping):
        if config is None:
            raise ValueError(
                f"config=None is invalid with a state dict: pass a {config_type} or a HF config dict"
            )
        return path_or_state_dict, config, None
    root = existing_dir(path_or_state_dict, HF_CHECKPOINT)
    if config is None:
        if not (root / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{root / CONFIG_FILE} does not exist: a checkpoint needs {CONFIG_FILE}")
        config = read_json(root / CONFIG_FILE)
    return CheckpointTensors(root, weight_files(root)), config, root


def load_siglip_vision(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    config: VisionConfig | Mapping[str, Any] | None = None,
    prefix: str | None = None,
    use_head: bool | None = None,
    dtype: Any = None,
) -> tuple[SiglipVision, VisionConfig]:
    """Loads a SigLIP vision tower from a checkpoint directory (``config.json`` + safetensors, as
    ``save_pretrained`` writes) or from a state dict (then ``config`` is required: a VisionConfig or a
    HF config dict).

    Args:
      prefix: where the tower's tensor names start; None finds it (``find_prefix``).
      use_head: None keeps the checkpoint's ``vision_use_head``; False drops the MAP head.
      dtype: parameter and compute dtype (e.g. ``"bfloat16"``); None keeps float32.
    Returns:
      ``(model, cfg)``.
    """
    overrides = {} if use_head is None else {"use_head": use_head}
    if dtype is not None:
        overrides |= {"dtype": dtype_name(dtype), "param_dtype": dtype_name(dtype)}
    tensors, config, _ = read_source(path_or_state_dict, config, "VisionConfig")
    try:
        cfg = (
            config.replace(**overrides)
            if isinstance(config, VisionConfig)
            else config_from_hf(config, **overrides)
        )
    except ValueError as e:
        raise ValueError(f"{getattr(tensors, 'root', 'config')}: {e}") from None
    return from_hf(tensors, cfg, prefix=prefix), cfg


def save_siglip_vision(
    model: SiglipVision, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 10**9
) -> None:
    """Writes ``config.json`` and safetensors that ``SiglipVisionModel.from_pretrained`` loads."""
    write_checkpoint(Path(path), config_to_hf(model.cfg), to_hf(model), max_shard_bytes)
