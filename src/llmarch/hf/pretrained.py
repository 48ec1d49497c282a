"""Hugging Face checkpoints: ``config.json`` plus safetensors weights, for Llama, Mixtral and DeepSeek-V3.

``load_pretrained(dir)`` reads what transformers' ``LlamaForCausalLM``, ``MixtralForCausalLM`` or
``DeepseekV3ForCausalLM`` ``save_pretrained`` wrote (one ``model.safetensors`` or shards with
``model.safetensors.index.json``); ``save_pretrained`` writes a directory that ``from_pretrained`` of
the same class loads. transformers is not needed.

This module holds the files and the API. Tensor names map through tables (``hf_tables``: the
transforms and the shared rows; ``hf_llama``, ``hf_mixtral``, ``hf_deepseek``: each architecture's
rows and config translation). DeepSeek fuses some MLA weights (``Part``) and with
``rope_interleave`` stores RoPE columns in interleaved pairs: permuted to rotate-half on import,
back on export. MoE checkpoints store one tensor per expert (``Expert``); DeepSeek's
``e_score_correction_bias`` is our non-trainable ``ExpertBias``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llmarch import sharding
from llmarch.config import DTYPES, ModelConfig
from llmarch.hf_deepseek import deepseek_from_hf, deepseek_to_hf, mla_tensors, moe_tensors  # noqa: F401
from llmarch.hf_llama import llama_from_hf, llama_to_hf
from llmarch.hf_mixtral import mixtral_from_hf, mixtral_to_hf
from llmarch.hf_tables import (  # noqa: F401  (re-exported: the tables are part of this API)
    ATTENTION_TENSORS,
    BLOCK_TENSORS,
    FFN_TENSORS,
    LAYER_PREFIX,
    LM_HEAD,
    MODEL_TENSORS,
    MOE_TENSORS,
    Entry,
    Expert,
    Linear,
    Part,
    Rule,
    Same,
    Transform,
    _bool,
    _model_type,
    architecture,
    block_tensors,
    tensor_plan,
)
from llmarch.json_config import json_kind, read_json
from llmarch.model import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
HF_CHECKPOINT = f"a Hugging Face checkpoint directory ({CONFIG_FILE} + *.safetensors)"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Old checkpoints carry RoPE's inverse frequencies as buffers; we recompute them from the config.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")

# Configs --------------------------------------------------------------------------------

_FROM_HF = {"llama": llama_from_hf, "mixtral": mixtral_from_hf, "deepseek_v3": deepseek_from_hf}
_TO_HF = {"llama": llama_to_hf, "mixtral": mixtral_to_hf, "deepseek_v3": deepseek_to_hf}


def config_from_hf(hf: Mapping[str, Any], *, name: str = "hf") -> ModelConfig:
    """The ModelConfig of a transformers Llama, Mixtral or DeepseekV3 ``config.json`` dict.

    Raises:
      ValueError: naming the field, for a model type or feature that llmarch cannot run, or a
        field of the wrong type or out of range.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json must hold a JSON object, not {json_kind(hf)}")
    return _FROM_HF[_model_type(hf)](hf, name)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.56+ and 5 read as a LlamaForCausalLM, a
    MixtralForCausalLM (MoE blocks) or a DeepseekV3ForCausalLM (MLA blocks)."""
    return _TO_HF[architecture(cfg)](cfg)


# Tensors <-> model ----------------------------------------------------------------------


def _index(e: Entry) -> tuple[int, ...]:
    """Where ``e``'s tensor sits in its variable: the run's layer, then the expert (if any)."""
    return (() if e.layer is None else (e.layer,)) + (
        (e.transform.index,) if isinstance(e.transform, Expert) else ())


def _listed(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_hf_tensors(model: Transformer, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """The model's weights as contiguous numpy arrays under HF names (HF layouts)."""
    cfg = model.cfg if cfg is None else cfg
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    plan = tensor_plan(cfg)
    unmapped = sorted(".".join(map(str, p)) for p in set(flat) - {e.path for e in plan})
    if unmapped:
        raise ValueError(f"model variables with no HF tensor name: {_listed(unmapped)}")
    host: dict[tuple, np.ndarray] = {}  # each stacked variable is fetched once
    out, slices = {}, {}
    for e in plan:
        if e.path not in flat:
            raise ValueError(f"{e.name}: the model has no variable {e.path} (does cfg match it?)")
        if e.path not in host:
            host[e.path] = np.asarray(jax.device_get(flat[e.path].get_value()))
        w = host[e.path][_index(e)]
        if isinstance(e.transform, Part):
            slices.setdefault(e.name, {})[e.transform.index] = e.transform.to_hf_slice(w)
        else:
            out[e.name] = np.ascontiguousarray(e.transform.to_hf(w))
    for name, parts in slices.items():  # fused: [in, *heads, sum(sizes)] -> [out, in]
        full = np.concatenate([parts[i] for i in sorted(parts)], axis=-1)
        out[name] = np.ascontiguousarray(full.reshape(full.shape[0], -1).T)
    return out


def from_hf_tensors(tensors: Mapping[str, Any], cfg: ModelConfig, *,
                    rope_interleave: bool = True) -> Transformer:
    """A model of ``cfg`` holding ``tensors`` (HF names and layouts), with no random init.

    ``tensors`` may be lazy (read on access). Under ``llmarch.sharding.use(mesh, rules)`` the
    parameters are placed sharded; otherwise on the default device. ``rope_interleave``: the
    DeepSeek checkpoint's flag.

    Raises:
      ValueError: listing missing and unexpected tensor names, or naming a wrong shape.
    """
    plan = tensor_plan(cfg, rope_interleave)
    present = {k for k in tensors if not _IGNORED.fullmatch(k)}
    expected = {e.name for e in plan}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        where = f" in {tensors.root}" if isinstance(tensors, _CheckpointTensors) else ""
        raise ValueError(f"checkpoint tensors{where} do not match the config: missing "
                         f"[{_listed(missing)}]; unexpected [{_listed(unexpected)}]")
    # Eager sharding off: shapes only here (Transformer's own mesh checks cannot run traced);
    # _place shards the filled state by the same logical names.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))  # path -> Variable of a ShapeDtypeStruct
    values: dict[tuple, np.ndarray] = {}
    for e in plan:
        target = variables[e.path].get_value()
        index = _index(e)
        shape = tuple(target.shape[len(index):])
        w = np.asarray(tensors[e.name])
        if w.shape != e.transform.hf_shape(shape):
            where = f" in {tensors.file(e.name)}" if isinstance(tensors, _CheckpointTensors) else ""
            raise ValueError(f"tensor {e.name} has shape {w.shape}{where}: the config needs "
                             f"{e.transform.hf_shape(shape)}")
        w = e.transform.from_hf(w, shape).astype(target.dtype)
        if not index:
            values[e.path] = w
        else:  # fill the run's stack (and expert axis) in place: no second copy of the layers
            values.setdefault(e.path, np.empty(target.shape, target.dtype))[index] = w
    unfilled = sorted(".".join(map(str, p)) for p in set(variables) - set(values))
    if unfilled:
        raise ValueError(f"model variables with no HF tensor: {_listed(unfilled)}")
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in variables.items()])
    return nnx.merge(graphdef, _place(state))


def _place(state: nnx.State) -> nnx.State:
    mesh, rules = jax.sharding.get_abstract_mesh(), tuple(flax_spmd.get_logical_axis_rules())
    if mesh.empty or not rules:
        return jax.device_put(state)
    return sharding.shard_state(state, jax.sharding.get_mesh(), rules)


# Files ----------------------------------------------------------------------------------


class _CheckpointTensors(Mapping[str, np.ndarray]):
    """A checkpoint's tensors by name, each read from its file only when asked for."""

    def __init__(self, root: Path, files: Mapping[str, Path]):
        self.root = root
        self._files = dict(files)  # tensor name -> safetensors file

    def file(self, name: str) -> Path:
        return self._files[name]

    def __getitem__(self, name: str) -> np.ndarray:
        # numpy cannot read bfloat16 from safetensors, flax can; reading onto the CPU keeps
        # the whole checkpoint off the accelerator until the final (maybe sharded) placement.
        with jax.default_device(jax.devices("cpu")[0]):
            try:
                with safe_open(self._files[name], framework="flax") as f:
                    return np.asarray(f.get_tensor(name))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"tensor {name} in {self._files[name]} cannot be read: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def checkpoint_dir(path: str | os.PathLike, expected: str) -> Path:
    """``path`` as a directory; ``expected`` says what the directory should hold.

    Raises:
      FileNotFoundError: when ``path`` does not exist or is not a directory.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist; expected {expected}")
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {str(root)!r} is not a directory; expected {expected}")
    return root


def _tensor_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (reading no tensor)."""
    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                         f"{e}") from None


def _weight_files(root: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or the single weights file; each file's header
    is read, so that a truncated or corrupt file is named before anything is built."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no 'weight_map' object of tensor name -> file name")
        absent = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {_listed(absent)}")
        for shard in sorted(set(weight_map.values())):
            held = set(_tensor_names(root / shard))
            lost = sorted(name for name, f in weight_map.items() if f == shard and name not in held)
            if lost:
                raise ValueError(f"{index} places tensors in {root / shard} that it does not hold: "
                                 f"{_listed(lost)}")
        return {name: root / f for name, f in weight_map.items()}
    single = root / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{root} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; only "
                                "safetensors checkpoints are supported")
    return dict.fromkeys(_tensor_names(single), single)


def dtype_name(dtype: Any) -> str:
    """The name in ``DTYPES`` of a dtype (or dtype name) for parameters and computation."""
    try:
        name = np.dtype(jax.numpy.dtype(dtype)).name
    except TypeError:  # not a dtype at all, e.g. "float33"
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {DTYPES}")
    return name


def load_pretrained(path: str | os.PathLike, *,
                    dtype: Any = None) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face Llama, Mixtral or DeepSeek-V3 checkpoint directory.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or its shards and
        ``model.safetensors.index.json``).
      dtype: dtype of the parameters and of the computation, e.g. ``"bfloat16"``; None keeps
        both float32 (whatever the checkpoint's dtype), as DESIGN.md's numerics ask.
    Returns:
      ``(model, cfg)``.
    Raises:
      FileNotFoundError: for a missing directory (or a file in its place), config or weights file.
      ValueError: naming the file, for one that is not valid JSON or safetensors, an unsupported or
        invalid config field, or tensors that do not match the config.
    """
    root = checkpoint_dir(path, HF_CHECKPOINT)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: a checkpoint needs {CONFIG_FILE}")
    hf_config = read_json(config_path)
    try:
        cfg = config_from_hf(hf_config, name=root.resolve().name)
        interleave = _bool(hf_config, "rope_interleave", True)  # DeepseekV3Config's default
    except ValueError as e:  # name the file: "config.json x=..." or "ModelConfig.x=... (from it)"
        message = str(e)
        message = (str(config_path) + message.removeprefix(CONFIG_FILE)
                   if message.startswith(CONFIG_FILE) else f"{config_path}: {message}")
        raise ValueError(message) from None
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype_name(dtype), param_dtype=dtype_name(dtype))
    return from_hf_tensors(_CheckpointTensors(root, _weight_files(root)), cfg,
                           rope_interleave=interleave), cfg


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    return shards


def save_pretrained(model: Transformer, cfg: ModelConfig, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes ``config.json`` and safetensors weights that transformers' Llama (Mixtral for an MoE
    model, DeepseekV3 for an MLA model) loads.

    Over ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors``
    with a ``model.safetensors.index.json``. Weight files left by an earlier save in ``path``
    are removed first, so that a stale index cannot shadow the new weights.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
            or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is invalid: must be a positive int")
    hf_config = config_to_hf(cfg)
    if config_to_hf(model.cfg) != hf_config:
        raise ValueError("cfg does not describe model: their Hugging Face configs differ "
                         f"(cfg.name={cfg.name!r}, model.cfg.name={model.cfg.name!r})")
    tensors = to_hf_tensors(model, cfg)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_PATTERN.fullmatch(old.name):
            old.unlink()
    (root / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    metadata = {"format": "pt"}  # what transformers writes and checks: torch [out, in] layouts
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, root / WEIGHTS_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SHARD_FILE.format(i + 1, len(shards))
        save_file(shard, root / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
             "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
