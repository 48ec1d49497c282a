"""Batched generation: with a KV cache (prefill, then one token per step) or by full
recomputation, the simple reference that cached decoding must equal.

Recomputation runs the whole sequence again at every step, in a fixed-size buffer so one
compiled program serves every step (causality makes the padding after position t
irrelevant to t's logits). The cached path compiles one prefill and one decode step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch.inference.sampling import sample_logits
from llmarch.inference.unstacked import for_decoding
from llmarch.layers import kv_quant
from llmarch.model import Transformer, check_inputs


def generate(
    model: Transformer,
    prompt: np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    kv_cache_dtype: str = "auto",
) -> np.ndarray:
    """Continues each row of ``prompt [B,T0]`` by ``max_new_tokens`` tokens; returns ``[B,T0+n]``.

    Rows share one length (no padding). ``temperature=0`` is greedy, else tokens are drawn by
    ``sampling.sample_logits`` (top-k, then nucleus top-p); ``use_cache=False`` recomputes the
    whole sequence at every step. ``kv_cache_dtype``: the cache's storage, as
    ``EngineConfig.kv_cache_dtype`` ("int8", "fp8_e4m3": quantized per token and head).
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt has shape {prompt.shape}: expected [batch, length >= 1]")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be > 0")
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt length {T0} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"max_seq_len={model.cfg.max_seq_len}"
        )
    if top_k is not None and not 0 < top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k={top_k} is invalid: must be in [1, vocab_size={model.cfg.vocab_size}]")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1]")
    check_inputs(model.cfg, prompt)
    cache_dtype = kv_quant.storage_dtype(kv_cache_dtype, model.cfg.dtype, owner="").name
    # On CPU, unstacked layers: a scan over stacked ones copies every layer's weights per step.
    graphdef, state = nnx.split(for_decoding(model) if use_cache else model)
    # The state flattened once: a jitted call flattens an nnx.State pytree (sorting its keys)
    # every time, about a millisecond per step for a small model; a list of arrays costs nothing.
    leaves, treedef = jax.tree.flatten(state)
    how = dict(graphdef=graphdef, treedef=treedef, temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    out = np.zeros((B, total), np.int32)
    out[:, :T0] = prompt
    if not use_cache:
        for i, t in enumerate(range(T0, total)):
            out[:, t] = _next_token(leaves, jnp.asarray(out), t, keys, i, **how)
        return out
    token, cache = _prefill(leaves, jnp.asarray(prompt), keys, total=total, cache_dtype=cache_dtype, **how)
    # The tokens stay on the device until the end: no step waits for the last one to reach the
    # host, so dispatching the next step overlaps the device computing this one.
    tokens = [token]
    for i, t in enumerate(range(T0, total - 1), start=1):
        token, cache = _decode(leaves, token, t, cache, keys, i, **how)
        tokens.append(token)
    out[:, T0:] = np.stack(jax.device_get(tokens), axis=1)
    return out


# Module-level programs (the model's graphdef and the sampling settings static), so repeated
# generate calls with the same shapes reuse their compiled prefill and decode steps.
_STATIC = ("graphdef", "treedef", "temperature", "top_k", "top_p")


def _model(graphdef, treedef, leaves):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _next_token(leaves, buffer, t, keys, i, *, graphdef, treedef, temperature, top_k, top_p):
    logits = _model(graphdef, treedef, leaves)(buffer)  # [B,total,V]
    last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
    return sample_logits(last, keys[i], temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "total", "cache_dtype"))
def _prefill(leaves, tokens, keys, *, graphdef, treedef, temperature, top_k, top_p, total, cache_dtype):
    model = _model(graphdef, treedef, leaves)
    B, T0 = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T0), (B, T0))
    out = model(tokens, positions=positions, cache=model.init_cache(B, total, cache_dtype))
    token = sample_logits(out.logits[:, -1], keys[0], temperature=temperature, top_k=top_k, top_p=top_p)
    return token, out.cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode(leaves, token, t, cache, keys, i, *, graphdef, treedef, temperature, top_k, top_p):
    positions = jnp.full((token.shape[0], 1), t, jnp.int32)
    out = _model(graphdef, treedef, leaves)(token[:, None], positions=positions, cache=cache)
    token = sample_logits(out.logits[:, -1], keys[i], temperature=temperature, top_k=top_k, top_p=top_p)
    return token, out.cache
