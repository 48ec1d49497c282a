"""A Hugging Face checkpoint directory on disk: ``config.json`` and safetensors weights, in one
``model.safetensors`` or in shards listed by ``model.safetensors.index.json``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llmarch.json_config import read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
HF_CHECKPOINT = f"a Hugging Face checkpoint directory ({CONFIG_FILE} + *.safetensors)"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# safetensors dtype names of the float8 formats (FP8 checkpoints, e.g. DeepSeek-V3's e4m3 weights).
FLOAT8 = {"F8_E4M3": jax.numpy.float8_e4m3fn, "F8_E5M2": jax.numpy.float8_e5m2}


def listed(names: list[str], limit: int = 12) -> str:
    """``names`` for an error message, the first ``limit`` of them."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class CheckpointTensors(Mapping[str, np.ndarray]):
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
                    if f.get_slice(name).get_dtype() in FLOAT8:  # safetensors' readers lack float8
                        return _read_raw(self._files[name], name)
                    return np.asarray(f.get_tensor(name))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"tensor {name} in {self._files[name]} cannot be read: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _read_raw(file: Path, name: str) -> np.ndarray:
    """Tensor ``name`` of a float8 dtype (``FLOAT8``), read from the safetensors layout: an 8-byte
    little-endian header size, a JSON header of ``{name: {dtype, shape, data_offsets}}``, the data."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + size + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, FLOAT8[entry["dtype"]]).reshape(entry["shape"])


def _tensor_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (reading no tensor)."""
    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def weight_files(root: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or the single weights file; each file's header
    is read, so that a truncated or corrupt file is named before anything is built."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no 'weight_map' object of tensor name -> file name")
        absent = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {listed(absent)}")
        for shard in sorted(set(weight_map.values())):
            held = set(_tensor_names(root / shard))
            lost = sorted(name for name, f in weight_map.items() if f == shard and name not in held)
            if lost:
                raise ValueError(
                    f"{index} places tensors in {root / shard} that it does not hold: {listed(lost)}"
                )
        return {name: root / f for name, f in weight_map.items()}
    single = root / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(
            f"{root} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; only safetensors checkpoints are supported"
        )
    return dict.fromkeys(_tensor_names(single), single)


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


def write_checkpoint(
    root: Path, hf_config: Mapping, tensors: Mapping[str, np.ndarray], max_shard_bytes: int
) -> None:
    """Writes ``config.json`` and the weights, sharded over ``max_shard_bytes``; weight files
    left by an earlier save are removed first, so that a stale index cannot shadow the new weights."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name in (WEIGHTS_FILE, INDEX_FILE) or SHARD_PATTERN.fullmatch(old.name):
            old.unlink()
    (root / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    metadata = {"format": "pt"}  # what transformers writes and checks: torch [out, in] layouts
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(dict(tensors), root / WEIGHTS_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SHARD_FILE.format(i + 1, len(shards))
        save_file(shard, root / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
