"""Running a ``Transformer``'s multi-token-prediction modules (DeepSeek-V3 §2.2; the modules and
their math: ``llmarch.layers.mtp``).

The decoder builds the modules (``Transformer.mtp``, one per depth k = 1..``cfg.mtp_depth``) but
its forward pass never runs them: training runs every depth over whole rows (``hidden``, then the
loss in ``llmarch.train.step.mtp_losses``), self-speculative decoding runs depth 1 a position at a
time with its own cache (``init_cache``, ``step``, ``logits``; ``llmarch.inference.mtp_speculative``).
Each depth embeds its tokens with the model's shared embedding and reads out through the shared
output head, so these are functions of the whole model.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp

from llmarch.checks import check_positive
from llmarch.layers import kv_quant
from llmarch.layers.mtp import shift_left
from llmarch.model import Aux, AuxByModule, Transformer, mtp_aux_key, segment_positions


def init_cache(model: Transformer, batch_size: int, max_len: int | None = None, dtype: Any = None) -> list:
    """Each MTP module's own decoding cache (its block's, as ``Transformer.init_cache`` makes a
    run's), one list entry per depth; for ``step``. ``max_len`` and ``dtype`` as there."""
    cfg = model.cfg
    if model.mtp is None:
        raise ValueError(f"model {cfg.name!r} has no MTP modules (ModelConfig.mtp_depth=0)")
    max_len = cfg.max_seq_len if max_len is None else max_len
    check_positive("", batch_size=batch_size, max_len=max_len)
    dtype = kv_quant.storage_dtype("auto" if dtype is None else dtype, cfg.dtype, owner="")
    return [m.block.init_cache(cfg, batch_size, max_len, dtype) for m in model.mtp]


def step(
    model: Transformer,
    k: int,
    h: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    cache: Any = None,
) -> tuple[jax.Array, Any, Aux]:
    """MTP depth ``k`` (1..mtp_depth): ``(h^k [B,T,D], cache, aux)`` from ``h = h^{k-1}``
    ``[B,T,D]`` (``h^0``: ``ModelOutput.trunk``) and ``tokens [B,T]`` = ``t_{i+k}``, aligned
    with h's positions ``positions [B,T]``. With ``cache`` (``init_cache(model, ...)[k-1]``) the
    positions are also the slots written, as in ``Transformer.__call__``: the decoding form."""
    if model.mtp is None or not 1 <= k <= len(model.mtp):
        raise ValueError(f"k={k} is invalid: must be in [1, mtp_depth={model.cfg.mtp_depth}]")
    emb = model.embed.encode(tokens, jnp.dtype(model.cfg.dtype))  # the shared embedding
    with jax.named_scope(f"mtp{k}"):
        h, (cache, aux) = model.mtp[k - 1](h, emb, positions, segment_ids, cache)
    return h, cache, aux


def hidden(
    model: Transformer,
    trunk: jax.Array,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[list[jax.Array], AuxByModule]:
    """Every MTP depth over a whole row, for training: ``([h^1, ..., h^D], aux)``, each
    ``[B,T,D]``, from ``trunk = h^0`` and the model's input ``tokens [B,T]``. Depth k at
    position i reads ``tokens[i+k]`` (``layers.mtp.shift_left``; meaningless, and to be masked,
    for the last k positions); ``aux`` is keyed by ``llmarch.model.mtp_aux_key``. Logits: ``logits``."""
    if positions is None:
        positions = segment_positions(segment_ids, tokens.shape)
    states, aux = [trunk], collections.OrderedDict()
    for k in range(1, model.cfg.mtp_depth + 1):
        h, _, aux[mtp_aux_key(k - 1)] = step(
            model, k, states[-1], shift_left(tokens, k), positions, segment_ids
        )
        states.append(h)
    return states[1:], aux


def logits(model: Transformer, k: int, h: jax.Array) -> jax.Array:
    """``[B,T,V]`` logits of depth k (position i: ``t_{i+k+1}``): ``h^k`` through the module's
    own final norm (``model.mtp[k-1].norm``), then the shared output head (``Transformer.head``)."""
    return model.head(model.mtp[k - 1].norm(h))
