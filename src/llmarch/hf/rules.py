"""How one Hugging Face tensor maps to one llmarch weight: the transforms, and the table types.

A table maps HF tensor names (after ``model.layers.{i}.`` for a block) to a ``Rule``: the path of
our variable and a transform between the two layouts. Our RoPE uses the rotate-half layout of HF
Llama, so q/k need no permutation; DeepSeek fuses some MLA weights (``Part``, with interleaved RoPE
columns); MoE checkpoints store one tensor per expert (``Expert``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from llmarch.config import ModelConfig

# Transforms between our weight layout and the HF (torch) one -------------------------------


@dataclasses.dataclass(frozen=True)
class Same:
    """Stored identically on both sides: norm scales, the embedding table ``[V,D]``."""

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w


@dataclasses.dataclass(frozen=True)
class Linear:
    """A torch ``nn.Linear`` weight ``[out, in]`` against our einsum weight ``[*in, *out]``.

    ``in_axes`` is how many leading axes of ours are contracted with the input: 1 for
    ``w_q_dnh [D,N,H]`` (HF ``[N*H, D]``), 2 for ``w_o_nhd [N,H,D]`` (HF ``[D, N*H]``).
    """

    in_axes: int = 1

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape[self.in_axes :]), math.prod(shape[: self.in_axes]))

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(math.prod(w.shape[: self.in_axes]), -1).T  # [out, in]

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w.T.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Part:
    """Our ``[in, *heads, sizes[index]]`` weight as a slice of a fused HF linear ``[(*heads, sum(sizes)),
    in]``, e.g. ``w_uk_anh [A,N,H]`` and ``w_uv_anh [A,N,H_v]`` in ``kv_b_proj [N*(H+H_v), A]``.
    ``interleave``: HF holds the slice's RoPE pairs as ``(x0,x1),(x2,x3)..``, we rotate halves."""

    sizes: tuple[int, ...]
    index: int
    interleave: bool = False

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape[1:-1]) * sum(self.sizes), shape[0])

    def _order(self, n: int) -> np.ndarray:  # our column j is HF column order[j]
        return np.r_[0:n:2, 1:n:2] if self.interleave else np.arange(n)

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        start = sum(self.sizes[: self.index])
        full = w.T.reshape(*shape[:-1], sum(self.sizes))  # [in, *heads, sum(sizes)]
        return full[..., start : start + shape[-1]][..., self._order(shape[-1])]

    def to_hf_slice(self, w: np.ndarray) -> np.ndarray:
        """Our weight in HF column order; ``to_hf_tensors`` concatenates the slices."""
        return w[..., np.argsort(self._order(w.shape[-1]))]


@dataclasses.dataclass(frozen=True)
class Expert:
    """Expert ``index`` of our ``[E, ...]`` weight is the HF tensor of that one expert (HF stores
    one tensor per expert, e.g. ``mlp.experts.3.gate_proj.weight [F,D]`` of ``w_gate_edf [E,D,F]``);
    ``inner`` maps the expert's slice."""

    index: int
    inner: Same | Linear

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.inner.hf_shape(shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return self.inner.to_hf(w)

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return self.inner.from_hf(w, shape)


Transform = Same | Linear | Part | Expert
Rule = tuple[tuple[str, ...], Transform]  # (llmarch state path, transform)
# A fused HF tensor maps to several of our weights: a list of rules, one ``Part`` each.
Table = dict[str, Rule | list[Rule]]
# A table whose names depend on the config: (cfg, config.json dict) -> table. The config.json dict
# carries what ModelConfig does not (DeepSeek's rope_interleave); on export it is the one written.
TableFn = Callable[[ModelConfig, Mapping[str, Any]], Table]


def table_of(table: Table | TableFn, cfg: ModelConfig, hf_config: Mapping[str, Any]) -> Table:
    return table(cfg, hf_config) if callable(table) else table
