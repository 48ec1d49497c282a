"""Runs a model that ``llmarch.export.stablehlo`` exported, with jax, numpy and safetensors only.

This file imports nothing from llmarch, and ``export_stablehlo`` copies it into every export
directory, so a deployment needs neither llmarch nor its model code: the computation is the
serialized StableHLO of the prefill and decode steps (``jax.export``), the weights are a
safetensors file, and ``manifest.json`` says how the two fit (see ``load_stablehlo``).

    import stablehlo_loader                      # this file, from the export directory
    m = stablehlo_loader.load_stablehlo("out_dir")
    tokens = m.generate([[72, 105], [87]], max_new_tokens=16)   # greedy; batch = m.batch rows
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export
from safetensors.numpy import load_file

MANIFEST = "manifest.json"
FORMAT = "llmarch-stablehlo"
VERSION = 1


@dataclasses.dataclass
class StableHLOModel:
    """The exported steps bound to their weights.

    Shapes are fixed at export: ``batch`` rows, prompts of at most ``prefill_len`` tokens, and
    ``max_len`` cache slots (positions ``0..max_len-1``). The cache is a dict of named arrays
    (``manifest["cache"]``), passed in and returned by every step.
    """

    manifest: dict[str, Any]
    params: dict[str, jax.Array]
    prefill_fn: Any  # jax.jit(Exported.call)
    decode_fn: Any

    @property
    def batch(self) -> int:
        return self.manifest["batch"]

    @property
    def prefill_len(self) -> int:
        return self.manifest["prefill_len"]

    @property
    def max_len(self) -> int:
        return self.manifest["max_len"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def init_cache(self) -> dict[str, jax.Array]:
        """An empty cache: zeros of every cache array's shape and dtype."""
        return {c["name"]: jnp.zeros(c["shape"], c["dtype"]) for c in self.manifest["cache"]}

    def _ints(self, name: str, value: Any, shape: tuple[int, ...], high: int) -> jax.Array:
        array = np.asarray(value)
        if array.shape != shape or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} has shape {array.shape} and dtype {array.dtype}: expected int {shape}")
        if array.size and (array.min() < 0 or array.max() >= high):
            raise ValueError(f"{name} spans [{array.min()}, {array.max()}]: allowed range is [0, {high})")
        return jnp.asarray(array, jnp.int32)

    def prefill(
        self, tokens: Any, lengths: Any, cache: dict[str, jax.Array] | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Runs the prompts ``tokens [batch, prefill_len]`` (row b's prompt is its first
        ``lengths[b]`` tokens, the rest padding) into ``cache`` (None: an empty one).

        Returns ``(logits [batch, V] float32 of each row's last prompt token, cache)``. Padding
        writes cache slots past a row's prompt, which its later steps overwrite before reading.
        """
        tokens = self._ints("tokens", tokens, (self.batch, self.prefill_len), self.vocab_size)
        lengths = self._ints("lengths", lengths, (self.batch,), self.prefill_len + 1)
        if int(lengths.min()) < 1:
            raise ValueError(f"lengths={np.asarray(lengths).tolist()}: every prompt needs >= 1 token")
        return self.prefill_fn(self.params, tokens, lengths, self.init_cache() if cache is None else cache)

    def decode(
        self, tokens: Any, positions: Any, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One step: ``tokens [batch]`` at ``positions [batch]`` -> ``(logits [batch, V], cache)``."""
        tokens = self._ints("tokens", tokens, (self.batch,), self.vocab_size)
        positions = self._ints("positions", positions, (self.batch,), self.max_len)
        return self.decode_fn(self.params, tokens, positions, cache)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of ``batch`` prompts (token ids) by ``max_new_tokens`` tokens each;
        returns the new tokens of each row."""
        if len(prompts) != self.batch:
            raise ValueError(f"prompts has {len(prompts)} rows: this export takes batch={self.batch}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an int >= 1")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.prefill_len:
            raise ValueError(f"prompt lengths {lengths}: each must be in [1, prefill_len={self.prefill_len}]")
        if max(lengths) + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"longest prompt {max(lengths)} + max_new_tokens {max_new_tokens} - 1 exceeds "
                f"max_len={self.max_len}"
            )
        tokens = np.zeros((self.batch, self.prefill_len), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = p
        logits, cache = self.prefill(tokens, np.asarray(lengths, np.int32))
        positions = np.asarray(lengths, np.int32)
        out = [np.asarray(jnp.argmax(logits, axis=-1), np.int32)]
        for _ in range(max_new_tokens - 1):
            logits, cache = self.decode(out[-1], positions, cache)
            out.append(np.asarray(jnp.argmax(logits, axis=-1), np.int32))
            positions = positions + 1
        return np.stack(out, axis=1).tolist()


def load_stablehlo(out_dir: str | pathlib.Path) -> StableHLOModel:
    """Reads an export directory: ``manifest.json``, the weights, and the serialized steps.

    Raises:
      FileNotFoundError: a missing manifest, weights or step file.
      ValueError: a manifest of another format or version, or weights that do not match it.
    """
    root = pathlib.Path(out_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a StableHLO export directory")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: format={manifest.get('format')!r} version={manifest.get('version')!r}; "
            f"this loader reads format={FORMAT!r} version={VERSION}"
        )
    weights = load_file(root / manifest["weights"])
    for p in manifest["params"]:
        w = weights.get(p["name"])
        if w is None or list(w.shape) != p["shape"] or str(w.dtype) != p["dtype"]:
            found = None if w is None else (list(w.shape), str(w.dtype))
            raise ValueError(f"{root / manifest['weights']}: {p['name']} is {found}, the manifest says {p}")
    params = {p["name"]: jax.device_put(weights[p["name"]]) for p in manifest["params"]}
    steps = {}
    for step in ("prefill", "decode"):
        exported = jax_export.deserialize(
            bytearray((root / manifest["functions"][step]["file"]).read_bytes())
        )
        steps[step] = jax.jit(exported.call)
    return StableHLOModel(manifest, params, steps["prefill"], steps["decode"])
