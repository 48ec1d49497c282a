"""The layout a decoding loop runs a model in on CPU: its layers unstacked.

A scan over stacked layers copies every layer's slice of every weight at each step on XLA:CPU
(the C++ weight kernel cannot read a slice in place) and, with a contiguous cache, slices the
stacked cache and stacks it anew; ``llmarch.model.with_unstacked_layers`` gives separate arrays,
read in place, and a per-layer cache each layer updates in place. The ``Engine`` unstacks on CPU
(``EngineConfig.unstack_layers``); ``generate`` and ``SpeculativeDecoder`` call ``for_decoding``.
"""

from __future__ import annotations

import weakref

import jax
from flax import nnx

from llmarch.model import Transformer, with_unstacked_layers


def _on_cpu(leaves) -> bool:
    return all(d.platform == "cpu" for leaf in leaves for d in leaf.devices())


def weights_on_cpu(model: nnx.Module) -> bool:
    """Whether every array of ``model`` lives on a CPU device."""
    return _on_cpu(jax.tree.leaves(nnx.state(model)))


# model -> (weak references to its arrays when copied, its unstacked copy): see for_decoding.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_decoding(model: Transformer) -> Transformer:
    """``model`` as a token-by-token decoding loop over a contiguous cache should run it: on CPU,
    ``with_unstacked_layers(model)``; elsewhere, or already unstacked, the model itself.

    The copy is kept for the next call while the model's arrays are the same objects (jax arrays
    are immutable: a training update replaces them, and the next call copies anew)."""
    if not isinstance(model, Transformer) or all(isinstance(run.layers, nnx.List) for run in model.runs):
        return model
    leaves = jax.tree.leaves(nnx.state(model))
    if not _on_cpu(leaves):
        return model
    cached = _COPIES.get(model)
    if cached is not None and len(cached[0]) == len(leaves):
        if all(ref() is leaf for ref, leaf in zip(cached[0], leaves, strict=True)):
            return cached[1]
    copy = with_unstacked_layers(model)
    _COPIES[model] = ([weakref.ref(leaf) for leaf in leaves], copy)
    return copy
