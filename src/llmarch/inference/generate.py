"""Generation by full recomputation: the simple reference that cached decoding must equal.

Every step runs the whole sequence again, in a fixed-size buffer so one compiled program
serves every step (causality makes the padding after position t irrelevant to t's logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch.model import Transformer, check_inputs


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
    """Token ids ``[B]`` drawn from ``logits [B,V]``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model: Transformer, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Continues each row of ``prompt [B,T0]`` by ``max_new_tokens`` tokens; returns ``[B,T0+n]``."""
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt has shape {prompt.shape}: expected [batch, length >= 1]")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be > 0")
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {T0} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if top_k is not None and not 0 < top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k={top_k} is invalid: must be in [1, vocab_size={model.cfg.vocab_size}]")
    check_inputs(model.cfg, prompt)
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, buffer, t, key):
        logits = nnx.merge(graphdef, state)(buffer)  # [B,total,V]
        last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)  # [B,V]
        return sample_logits(last, key, temperature=temperature, top_k=top_k)

    buffer = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt)
    key = jax.random.key(seed)
    for t in range(T0, total):
        key, sub = jax.random.split(key)
        buffer = buffer.at[:, t].set(next_token(state, buffer, t, sub))
    return np.asarray(buffer)
