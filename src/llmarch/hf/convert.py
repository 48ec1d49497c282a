"""A model's weights <-> Hugging Face tensors (names and layouts), following the tensor plan."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from llmarch import sharding
from llmarch.config import ModelConfig
from llmarch.hf import architectures
from llmarch.hf.config_json import config_to_hf
from llmarch.hf.files import CheckpointTensors, listed
from llmarch.hf.plan import Entry, tensor_plan
from llmarch.hf.rules import Expert, Part
from llmarch.model import Transformer
from llmarch.quant.fp8_delayed import FP8Meta

# Old checkpoints carry RoPE's inverse frequencies as buffers; we recompute them from the config.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")


def _index(e: Entry) -> tuple[int, ...]:
    """Where ``e``'s tensor sits in its variable: the run's layer, then the expert (if any)."""
    return (() if e.layer is None else (e.layer,)) + (
        (e.transform.index,) if isinstance(e.transform, Expert) else ()
    )


def to_hf_tensors(
    model: Transformer, cfg: ModelConfig | None = None, *, architecture: str | None = None
) -> dict[str, np.ndarray]:
    """The model's weights as contiguous numpy arrays under HF names (HF layouts) of the
    architecture ``cfg`` exports as (see ``config_to_hf``)."""
    cfg = model.cfg if cfg is None else cfg
    # FP8 delayed-scaling amax histories are training state, not weights: never exported.
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(FP8Meta))))
    plan = tensor_plan(
        cfg, architectures.of_config(cfg, architecture), config_to_hf(cfg, architecture=architecture)
    )
    unmapped = sorted(".".join(map(str, p)) for p in set(flat) - {e.path for e in plan})
    if unmapped:
        raise ValueError(f"model variables with no HF tensor name: {listed(unmapped)}")
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


def from_hf_tensors(
    tensors: Mapping[str, Any], cfg: ModelConfig, *, hf_config: Mapping[str, Any] | None = None
) -> Transformer:
    """A model of ``cfg`` holding ``tensors`` (HF names and layouts), with no random init.

    ``tensors`` may be lazy (read on access). Under ``llmarch.sharding.use(mesh, rules)`` the
    parameters are placed sharded; otherwise on the default device. The architecture is the one
    ``cfg`` exports as; ``hf_config``: the ``config.json`` dict that came with the tensors, for the
    layout fields ModelConfig does not hold (DeepSeek's ``rope_interleave``); None: their defaults.

    Raises:
      ValueError: listing missing and unexpected tensor names, or naming a wrong shape.
    """
    plan = tensor_plan(cfg, architectures.of_config(cfg), {} if hf_config is None else hf_config)
    present = {k for k in tensors if not IGNORED.fullmatch(k)}
    expected = {e.name for e in plan}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        where = f" in {tensors.root}" if isinstance(tensors, CheckpointTensors) else ""
        raise ValueError(
            f"checkpoint tensors{where} do not match the config: missing "
            f"[{listed(missing)}]; unexpected [{listed(unexpected)}]"
        )
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
        shape = tuple(target.shape[len(index) :])
        w = np.asarray(tensors[e.name])
        if w.shape != e.transform.hf_shape(shape):
            where = f" in {tensors.file(e.name)}" if isinstance(tensors, CheckpointTensors) else ""
            raise ValueError(
                f"tensor {e.name} has shape {w.shape}{where}: the config needs {e.transform.hf_shape(shape)}"
            )
        w = e.transform.from_hf(w, shape).astype(target.dtype)
        if not index:
            values[e.path] = w
        else:  # fill the run's stack (and expert axis) in place: no second copy of the layers
            values.setdefault(e.path, np.empty(target.shape, target.dtype))[index] = w
    unfilled = sorted(".".join(map(str, p)) for p in set(variables) - set(values))
    if unfilled:
        raise ValueError(f"model variables with no HF tensor: {listed(unfilled)}")
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in variables.items()])
    return nnx.merge(graphdef, sharding.place(state))
