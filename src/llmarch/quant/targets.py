"""The linear weights of a ``Transformer`` that quantization replaces, and how each is a matrix.

The linear weights are the model's ``Einsum`` layers. Which of a weight's axes are contracted (K)
and which are outputs (N) is learned by tracing one forward pass with ``jax.eval_shape`` and
recording the equation each ``Einsum`` is called with (the layers name their contractions only at
their call sites). MoE experts, which the dispatch code multiplies as ``[E, D, F]`` arrays rather
than calling, are batch-E matrices ``[E, K, N]`` by construction. Left in float: the MoE router
(its logits pick the experts; every serving stack keeps it unquantized), the memory layers' keys
and values tables (lookups, not linears), norms, and the embeddings and the LM head unless asked
(``include_embeddings``, ``include_lm_head``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch.config import ModelConfig
from llmarch.layers.einsum import Einsum
from llmarch.layers.embed import Embed
from llmarch.layers.moe import MoE
from llmarch.quant.config import QuantConfig
from llmarch.quant.linear import Layout, QuantizedEinsum, QuantizedEmbed
from llmarch.quant.tensor import QuantizedTensor, check_groups

_EXPERTS = ("w_gate_edf", "w_up_edf", "w_down_efd")  # MoE's stacked expert weights [E, K, N]
_ROUTER = "w_router_de"
_TAG = "_quant_tag"  # a static attribute naming an Einsum while a forward pass is traced


@dataclasses.dataclass
class Linear:
    """One linear weight of a model: where it is, and how it is viewed as ``[*batch, K, N]``.

    Attributes:
      path: its path in the model (``"runs/0/layers/attention/w_q_dnh"``).
      parent: the module holding it, under attribute (or list index) ``key``.
      module: the ``Einsum`` (or, with ``include_embeddings``, the ``Embed``, whose ``[V,D]``
        table is the matrix ``[D, V]`` of its LM-head use).
      layout: its matrix view (one layer's).
      lead: 1 when its arrays carry a scanned run's layers axis, else 0.
    """

    path: str
    parent: Any
    key: str | int
    module: Einsum | Embed
    layout: Layout
    lead: int

    def matrix(self) -> np.ndarray:
        """The float32 weight as ``[*lead, *batch, K, N]`` (host numpy)."""
        return np.asarray(self.layout.to_matrix(np.asarray(self.value(), np.float32), self.lead))

    def value(self) -> jax.Array:
        """The weight as stored, ``[*lead, *layout.shape]``."""
        return self.module.table_vd[...] if isinstance(self.module, Embed) else self.module.w[...]

    def install(self, qt: QuantizedTensor) -> QuantizedEinsum | QuantizedEmbed:
        """Replaces the layer in its parent by a ``QuantizedEinsum`` (``QuantizedEmbed``) of ``qt``."""
        if isinstance(self.module, Embed):
            layer = QuantizedEmbed(qt, self.layout)
        else:
            layer = QuantizedEinsum(qt, self.layout, lead=self.lead)
        if isinstance(self.key, int):
            self.parent[self.key] = layer
        else:
            setattr(self.parent, self.key, layer)
        return layer


def is_quantized(model: nnx.Module) -> bool:
    return any(isinstance(m, QuantizedEinsum) for _, m in nnx.iter_modules(model))


def linears(model: nnx.Module, cfg: ModelConfig, qcfg: QuantConfig) -> list[Linear]:
    """The model's linear weights that ``qcfg`` quantizes, in module order, each checked against
    the group size (and nibble packing) before anything is quantized."""
    eqns = _traced_equations(model, cfg)
    found = []
    for path, parent, key, module in _einsums(model):
        name = path.rsplit("/", 1)[-1]
        if name == _ROUTER or (name == "lm_head" and not qcfg.include_lm_head):
            continue
        names = tuple(module.w.get_metadata().get("out_sharding") or (None,) * module.w[...].ndim)
        if isinstance(parent, MoE) and name in _EXPERTS:
            rank = 3
            perm, batch, contracted = (0, 1, 2), 1, 1
        elif path in eqns:
            inputs, out = eqns[path].replace(" ", "").split("->")
            lhs, rhs = inputs.split(",")
            rank = len(rhs)
            perm, batch, contracted = _perm(lhs, rhs, out)
        else:
            continue  # never called as a linear by the forward pass
        lead = module.w[...].ndim - rank
        shape = tuple(module.w[...].shape[lead:])
        layout = Layout(shape, names[lead:], perm, batch, contracted)
        if qcfg.method != "fp8":
            check_groups(layout.matrix_shape, qcfg.bits, qcfg.group_size, where=path)
        found.append(Linear(path, parent, key, module, layout, lead))
    if qcfg.include_embeddings:
        table = model.embed.table_vd
        layout = Layout(tuple(table.shape), tuple(table.get_metadata().get("out_sharding")), (1, 0), 0, 1)
        if qcfg.method != "fp8":
            check_groups(layout.matrix_shape, qcfg.bits, qcfg.group_size, where="embed")
        found.append(Linear("embed", model, "embed", model.embed, layout, 0))
    return found


def _perm(lhs: str, rhs: str, out: str) -> tuple[tuple[int, ...], int, int]:
    batch = [i for i, c in enumerate(rhs) if c in lhs and c in out]
    contracted = [i for i, c in enumerate(rhs) if c in lhs and c not in out]
    rest = [i for i, c in enumerate(rhs) if c not in lhs]
    return (*batch, *contracted, *rest), len(batch), len(contracted)


def _einsums(model: nnx.Module) -> Iterator[tuple[str, Any, str | int, Einsum]]:
    """``(path, parent, key, einsum)`` for every ``Einsum`` of the model."""
    modules = dict(nnx.iter_modules(model))
    for path, module in modules.items():
        if isinstance(module, Einsum) and path:
            parent = modules[path[:-1]] if path[:-1] in modules else _walk(model, path[:-1])
            yield "/".join(map(str, path)), parent, path[-1], module


def _walk(model: nnx.Module, path: tuple) -> Any:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _traced_equations(model: nnx.Module, cfg: ModelConfig) -> dict[str, str]:
    """Each called ``Einsum``'s equation in one (abstract) forward pass, by path; the first call's
    when a weight is used twice."""
    tagged = list(_einsums(model))
    seen: dict[str, str] = {}
    original = Einsum.__call__

    def recording(self, eqn, x):
        tag = getattr(self, _TAG, None)
        if tag is not None:
            seen.setdefault(tag, eqn)
        return original(self, eqn, x)

    tokens = jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)
    with contextlib.ExitStack() as stack:
        for path, _, _, module in tagged:
            setattr(module, _TAG, path)  # static: it survives the split/merge of a scanned run
            stack.callback(delattr, module, _TAG)
        Einsum.__call__ = recording
        stack.callback(setattr, Einsum, "__call__", original)
        jax.eval_shape(lambda: model(tokens))
    return seen
