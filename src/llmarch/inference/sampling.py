"""Sampling parameters and batched, jittable sampling with per-row settings.

Every row of a batch carries its own temperature, top-k, top-p and seed, so one compiled step
samples for many requests at once. A row's random key is
``fold_in(fold_in(key(seed), sample_index), token_index)``: the ``token_index``-th token of a
request's ``sample_index``-th completion depends only on the request's seed and the logits,
never on which other requests share the step, on padding, or on preemption and recomputation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llmarch import ops

_SEED_BITS = 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt.

    Attributes:
      max_tokens: new tokens to generate at most (> 0).
      temperature: 0 is greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (nucleus sampling; 1: all). Applied after top_k.
      seed: makes sampling reproducible (None: the engine draws one).
      stop_token_ids: generation ends after any of these (it is kept in the output).
      logprobs: None, or n >= 0: return each chosen token's log-probability under the model's
        unprocessed distribution (before temperature/top-k/top-p) and the n most likely
        alternatives.
      n: completions of the prompt; they share the prompt's cache pages.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self):
        def fail(field, allowed):
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r} is invalid: {allowed}")

        def is_int(x):
            return isinstance(x, int | np.integer) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            fail("max_tokens", "must be a positive integer")
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature < float("inf"):
            fail("temperature", "must be a finite number >= 0 (0: greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0: no top-k)")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            fail("seed", "must be None or an integer in [0, 2**63)")
        if not isinstance(self.stop_token_ids, tuple | list) or not all(
            is_int(t) for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "must be a tuple of token ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "must be None or an integer >= 0")
        if not is_int(self.n) or self.n <= 0:
            fail("n", "must be a positive integer")

    def check(self, vocab_size: int, max_logprobs: int) -> None:
        """The checks that need the model: token ids and top_k within the vocabulary."""
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"SamplingParams.stop_token_ids has unknown tokens {bad}: allowed "
                f"range is [0, vocab_size={vocab_size})"
            )
        if self.top_k > vocab_size:
            raise ValueError(
                f"SamplingParams.top_k={self.top_k} is invalid: must be <= vocab_size={vocab_size}"
            )
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise ValueError(
                f"SamplingParams.logprobs={self.logprobs} is invalid: this engine "
                f"returns at most max_logprobs={max_logprobs} alternatives"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def split_seed(seed: int) -> tuple[int, int]:
    """A 63-bit seed as two uint32 halves (jit arguments are 32-bit)."""
    return seed & (2**_SEED_BITS - 1), seed >> _SEED_BITS


def row_keys(seed_lo: jax.Array, seed_hi: jax.Array, sample: jax.Array, counter: jax.Array) -> jax.Array:
    """``[B]`` keys: ``fold_in(fold_in(fold_in(key(lo), hi), sample), counter)`` per row."""

    def one(lo, hi, s, c):
        key = jax.random.fold_in(jax.random.key(lo.astype(jnp.uint32)), hi.astype(jnp.uint32))
        return jax.random.fold_in(jax.random.fold_in(key, s.astype(jnp.uint32)), c.astype(jnp.uint32))

    return jax.vmap(one)(seed_lo, seed_hi, sample, counter)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (flip negatives, set the sign bit of the rest)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _largest_key(keys: jax.Array, ok) -> jax.Array:
    """``[B,1]``: per row, the largest uint32 ``t`` with ``ok(keys >= t)`` true, for a predicate
    that holds at 0 and is monotone (once false for t, false above). Built bit by bit from the
    top: 32 passes over ``[B,V]`` where a sort would cost ``V log V`` per row (and XLA:CPU's
    sort is slow)."""

    def bit(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(ok(keys >= candidate), candidate, t)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros((keys.shape[0], 1), jnp.uint32))


def processed_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """``[B,V]`` float32 logits scaled by temperature with top-k then top-p applied (-inf out).

    Rows with ``temperature == 0`` are scaled by 1 (their caller takes the argmax). Ties at a
    cut-off keep every tied token. Top-p keeps the most likely tokens whose mass, before each
    of them, is below ``top_p``.
    """
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    x = logits.astype(jnp.float32) / t[:, None]

    def cut(x):
        keys = _order_keys(x)
        k = jnp.where(top_k > 0, top_k, x.shape[-1])[:, None]  # [B,1]
        kth = _largest_key(keys, lambda kept: jnp.sum(kept, -1, keepdims=True) >= k)
        x = jnp.where(keys >= kth, x, -jnp.inf)
        probs = jax.nn.softmax(x, axis=-1)
        pth = _largest_key(
            keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0), -1, keepdims=True) >= top_p[:, None]
        )
        return jnp.where(keys >= pth, x, -jnp.inf)

    return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), cut, lambda x: x, x)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """``[...]`` int32: ``jnp.argmax(logits, axis=-1)``, the same index (the first of equal
    maxima; the first NaN where a row holds one), as two plain reductions: XLA:CPU runs
    ``argmax``'s (value, index) reduction as a scalar loop, ~3x slower at a row of 32,000 and
    ~5x at 8 rows, a visible share of a batch-1 decode step."""
    V = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)  # NaN where a row holds one
    at = (logits == best) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(at, index, V), axis=-1)


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> jax.Array:
    """Token ids ``[B]`` drawn from ``logits [B,V]`` with the same settings for every row and one
    ``key`` for the batch (``generate``'s sampler); ``temperature == 0`` is greedy. The
    temperature, top-k and top-p are ``processed_logits``', as in ``sample``."""
    if temperature == 0:
        return greedy_tokens(logits)
    B = logits.shape[0]
    x = processed_logits(
        logits,
        jnp.full((B,), temperature, jnp.float32),
        jnp.full((B,), top_k or 0, jnp.int32),
        jnp.full((B,), top_p, jnp.float32),
    )
    return jax.random.categorical(key, x, axis=-1)


def probabilities(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """``[B,V]``: the distribution a row samples from; one-hot of the argmax for greedy rows."""
    probs = jax.nn.softmax(processed_logits(logits, temperature, top_k, top_p), axis=-1)
    onehot = jax.nn.one_hot(greedy_tokens(logits), logits.shape[-1], dtype=probs.dtype)
    return jnp.where((temperature > 0)[:, None], probs, onehot)


def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    num_logprobs: int = 0,
    want_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Samples one token per row of ``logits [B,V]``.

    Returns a dict: ``tokens [B]``, ``logprobs [B]`` (of the chosen token, unprocessed
    distribution) and, with ``num_logprobs > 0``, ``top_ids, top_logprobs [B, num_logprobs]``.
    With ``want_logprobs [B]`` given, log-probabilities are computed only in steps where some
    row wants them (zeros otherwise).
    """
    logits = logits.astype(jnp.float32)
    greedy = greedy_tokens(logits)

    def draw(logits):
        x = processed_logits(logits, temperature, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # All-greedy steps (common in serving benchmarks) skip the sampling work entirely.
    tokens = jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, logits)

    def logprobs(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        out = {"logprobs": jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]}
        if num_logprobs:
            out["top_logprobs"], out["top_ids"] = ops.top_k(logp, num_logprobs)
        return out

    if want_logprobs is None:
        return {"tokens": tokens, **logprobs(logits)}
    skipped = jax.eval_shape(logprobs, logits)
    return {
        "tokens": tokens,
        **jax.lax.cond(
            jnp.any(want_logprobs),
            logprobs,
            lambda _: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), skipped),
            logits,
        ),
    }


def sample_rows(logits: jax.Array, rows: dict[str, jax.Array], *, num_logprobs: int = 0) -> dict:
    """``sample`` with per-row settings in ``rows``: temperature, top_k, top_p, seed_lo,
    seed_hi, sample (completion index), counter (token index), logprobs (wanted or not)."""
    keys = row_keys(rows["seed_lo"], rows["seed_hi"], rows["sample"], rows["counter"])
    return sample(
        logits,
        keys,
        rows["temperature"],
        rows["top_k"],
        rows["top_p"],
        num_logprobs=num_logprobs,
        want_logprobs=rows.get("logprobs"),
    )


def host_rows(
    params: list[SamplingParams | None], seeds: list[int], samples: list[int], counters: list[int]
) -> dict[str, np.ndarray]:
    """The per-row arrays of ``sample_rows`` for a padded batch (``None``: a padding row)."""
    B = len(params)
    rows = {
        "temperature": np.zeros(B, np.float32),
        "top_k": np.zeros(B, np.int32),
        "top_p": np.ones(B, np.float32),
        "seed_lo": np.zeros(B, np.uint32),
        "seed_hi": np.zeros(B, np.uint32),
        "sample": np.zeros(B, np.int32),
        "counter": np.zeros(B, np.int32),
        "logprobs": np.zeros(B, bool),
    }
    for i, p in enumerate(params):
        if p is None:
            continue
        rows["temperature"][i], rows["top_k"][i], rows["top_p"][i] = p.temperature, p.top_k, p.top_p
        rows["seed_lo"][i], rows["seed_hi"][i] = split_seed(seeds[i])
        rows["sample"][i], rows["counter"][i] = samples[i], counters[i]
        rows["logprobs"][i] = p.logprobs is not None
    return rows
