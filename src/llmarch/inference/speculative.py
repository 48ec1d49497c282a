"""Speculative decoding (Leviathan, Kalman & Matias, ICML 2023; Chen et al. 2023).

A small draft model proposes ``gamma`` tokens ``d_1..d_gamma`` one at a time from its
distributions ``q_j``; the target scores all of them in one forward pass, giving ``p_1..p_{gamma+1}``.
Token ``d_j`` is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``, left to right; at the
first rejection the token is drawn from the residual ``norm(max(0, p_j - q_j))``, and when all
are accepted a bonus token comes from ``p_{gamma+1}``. Each round thus yields 1 to ``gamma + 1``
tokens whose distribution is exactly the target's (sampling settings — temperature, top-k,
top-p — shape ``p`` and ``q`` alike; greedy rows use one-hot distributions, so greedy output
equals the target's greedy output).

Rows of a batch sit at different positions: contiguous caches (``Transformer.init_cache``) are
written at each row's own positions, and causality on positions hides the stale slots that
rejected proposals leave behind (the next round rewrites them before any query can see them).
Each round the draft first re-feeds the last two tokens (so a fully accepted round's last
proposal gets its cache entry), then proposes; the target verifies ``gamma + 1`` tokens.

A whole ``generate`` call is one jitted program: prefill, then a ``lax.while_loop`` of rounds
until every row is done, with the draft's steps in a ``lax.scan``, sampling, acceptance, stop
tokens and lengths on device. The host waits once per call, not once per round, so a round
costs its ``gamma`` draft steps and one verification and little else; rounds in which every
row is greedy skip the distributions and random draws (argmax agreement is the same rule on
one-hot distributions).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.intmath import next_pow2
from llmarch.checks import check_positive
from llmarch.inference import sampling
from llmarch.inference.sampling import SamplingParams
from llmarch.inference.unstacked import for_decoding

_DRAFT, _ACCEPT, _FINAL = 0, 1, 2  # key streams of a round


@dataclasses.dataclass
class SpeculativeOutput:
    token_ids: list[int]
    finish_reason: str
    proposed: int  # draft tokens proposed for this request
    accepted: int  # of which the target accepted


def _acceptance(p, q, d, keys, *, gamma):
    """The rejection-sampling rule on ``p [B,gamma+1,V]``, ``q [B,gamma,V]``, proposals ``d
    [B,gamma]``: ``(accepted [B], final [B])``, the leading accepted proposals and the token
    drawn after them (from the residual at a rejection, from ``p_{gamma+1}`` when all pass)."""
    B = d.shape[0]
    p_d = jnp.take_along_axis(p[:, :gamma], d[..., None], axis=-1)[..., 0]  # [B,gamma]
    q_d = jnp.take_along_axis(q, d[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(keys(_ACCEPT, 0))  # [B,gamma]
    ok = u * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [B] leading accepts
    p_k = p[jnp.arange(B), accepted]  # [B,V]
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_{gamma+1} = 0: bonus from p
    residual = jnp.maximum(p_k - q_pad[jnp.arange(B), accepted], 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_k)
    return accepted, _draw(residual, keys(_FINAL, 0))


def _draw(probs, key):  # [B,V] probabilities, [B] keys -> [B] tokens
    return jax.vmap(jax.random.categorical)(key, jnp.log(probs)).astype(jnp.int32)


def _round(target, draft, t_cache, d_cache, seq, n, count, rows, *, gamma):
    """One round for every row: ``gamma`` proposals, one verification, acceptance, on device.

    ``seq [B,S]``: each row's tokens so far; ``n [B]``: their number; ``count [B]``: tokens
    generated so far (the sampling keys' counter). Returns ``(t_cache, d_cache, tokens
    [B,gamma+1], accepted [B])``: the row's new tokens are ``tokens[:accepted + 1]``.
    """
    B = n.shape[0]
    temp, top_k, top_p = rows["temperature"], rows["top_k"], rows["top_p"]
    base = sampling.row_keys(rows["seed_lo"], rows["seed_hi"], rows["sample"], count)
    sampled = jnp.any(temp > 0)  # all-greedy rounds skip the distributions and the random draws

    def keys(stream, j):  # [B] keys of (stream, j) in this round
        return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, stream), j))(base)

    def propose(logits, j):  # [B,V] -> (token [B], q [B,V]); q is unused (zeros) when all are greedy
        def sample(logits):
            q = sampling.probabilities(logits, temp, top_k, top_p)
            return _draw(q, keys(_DRAFT, j)), q

        greedy = lambda logits: (sampling.greedy_tokens(logits), jnp.zeros_like(logits))  # noqa: E731
        return jax.lax.cond(sampled, sample, greedy, logits)

    # The draft re-feeds the last two tokens (a fully accepted round left its last proposal
    # without a cache entry), then proposes; its last proposal is not fed (the target scores it).
    last2 = jnp.take_along_axis(seq, jnp.stack([jnp.maximum(n - 2, 0), n - 1], axis=1), axis=1)  # [B,2]
    with jax.named_scope("draft"):
        out = draft(last2, positions=jnp.stack([jnp.maximum(n - 2, 0), n - 1], axis=1), cache=d_cache)
        token, q = propose(out.logits[:, -1], 0)

        def step(carry, j):
            token, d_cache = carry
            out = draft(token[:, None], positions=(n + j - 1)[:, None], cache=d_cache)
            nxt, q = propose(out.logits[:, -1], j)
            return (nxt, out.cache), (nxt, q)

        (_, d_cache), (ds, qs) = jax.lax.scan(step, (token, out.cache), jnp.arange(1, gamma))
        d = jnp.concatenate([token[:, None], ds.T], axis=1)  # [B,gamma]
        q = jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)  # [B,gamma,V]
    with jax.named_scope("verify"):
        verify = jnp.concatenate([last2[:, 1:], d], axis=1)  # [B,gamma+1]: x_{n-1}, d_1..d_gamma
        positions = (n - 1)[:, None] + jnp.arange(gamma + 1, dtype=jnp.int32)[None]
        out = target(verify, positions=positions, cache=t_cache)
        logits, t_cache = out.logits, out.cache  # [B,gamma+1,V]
    with jax.named_scope("accept"):

        def rejection(logits):
            V = logits.shape[-1]
            r = lambda x: jnp.repeat(x, gamma + 1)  # noqa: E731
            p = sampling.probabilities(logits.reshape(-1, V), r(temp), r(top_k), r(top_p))
            return _acceptance(p.reshape(B, gamma + 1, V), q, d, keys, gamma=gamma)

        def greedy(logits):  # the rule above on one-hot p and q, without them
            best = sampling.greedy_tokens(logits)  # [B,gamma+1]
            accepted = jnp.sum(jnp.cumprod(d == best[:, :gamma], axis=1), axis=1)
            return accepted, best[jnp.arange(B), accepted]

        accepted, final = jax.lax.cond(sampled, rejection, greedy, logits)
    tokens = jnp.concatenate([d, jnp.zeros_like(d[:, :1])], axis=1)
    return t_cache, d_cache, tokens.at[jnp.arange(B), accepted].set(final), accepted


@functools.partial(
    jax.jit,
    static_argnames=("target_def", "draft_def", "gamma", "width"),
    donate_argnames=("seq",),
)
def _decode(t_state, d_state, seq, n, limit, stops, rows, *, target_def, draft_def, gamma, width):
    """Prefill, then rounds until every row is done, all on device: one call per ``generate``,
    no host round trip per round.

    ``seq [B,S]``: prompts (row ``i`` ends at ``n[i]``), ``S`` the caches' length; ``width``: the
    prefilled prefix of every row (junk past a row's end is rewritten before any query sees it);
    ``limit [B]``: prompt length + max_tokens; ``stops [B,Z]``: stop ids, -1 padded. Returns
    ``(seq, n, stopped [B], proposed [B], accepted [B], rounds)``; row ``i``'s output is
    ``seq[i, prompt_len:n[i]]``.
    """
    target, draft = nnx.merge(target_def, t_state), nnx.merge(draft_def, d_state)
    B, S = seq.shape
    start = n
    t_cache, d_cache = target.init_cache(B, S), draft.init_cache(B, S)
    if width > 1:
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (B, width))
        t_cache = target(seq[:, :width], positions=positions, cache=t_cache).cache
        d_cache = draft(seq[:, :width], positions=positions, cache=d_cache).cache
    j = jnp.arange(gamma + 1, dtype=jnp.int32)[None]  # [1,gamma+1]

    def body(carry):
        t_cache, d_cache, seq, n, stopped, proposed, accepted_total, rounds = carry
        active = (n < limit) & ~stopped
        t_cache, d_cache, tokens, accepted = _round(
            target, draft, t_cache, d_cache, seq, n, n - start, rows, gamma=gamma
        )
        # A row keeps its accepted tokens and the one after them, up to its first stop token and
        # its limit; finished rows run along unchanged (their writes are dropped).
        is_stop = jnp.any(tokens[:, :, None] == stops[:, None, :], axis=-1)  # [B,gamma+1]
        first_stop = jnp.min(jnp.where(is_stop, j, gamma + 1), axis=1)  # [B]
        keep = jnp.minimum(jnp.minimum(accepted + 1, limit - n), first_stop + 1)
        at = jnp.where(active[:, None] & (j < keep[:, None]), n[:, None] + j, S)  # S: dropped
        seq = seq.at[jnp.arange(B)[:, None], at].set(tokens, mode="drop")
        return (
            t_cache,
            d_cache,
            seq,
            jnp.where(active, n + keep, n),
            stopped | (active & (first_stop < keep)),
            proposed + gamma * active,
            accepted_total + jnp.where(active, accepted, 0),
            rounds + 1,
        )

    def running(carry):
        n, stopped = carry[3], carry[4]
        return jnp.any((n < limit) & ~stopped)

    zeros = jnp.zeros_like(n)
    carry = (t_cache, d_cache, seq, n, jnp.zeros(B, bool), zeros, zeros, jnp.int32(0))
    return jax.lax.while_loop(running, body, carry)[2:]


class SpeculativeDecoder:
    """Generates with ``target``, ``gamma`` draft tokens per round from ``draft``.

    Args:
      target, draft: ``Transformer``s over the same vocabulary.
      gamma: draft tokens proposed per round.
      seed: draws the seeds of requests that give none.
    """

    def __init__(self, target, draft, *, gamma: int = 4, seed: int = 0):
        if target.cfg.vocab_size != draft.cfg.vocab_size:
            raise ValueError(
                f"draft vocab_size={draft.cfg.vocab_size} differs from the target's {target.cfg.vocab_size}"
            )
        check_positive("", gamma=gamma)
        self.target, self.draft, self.gamma = target, draft, gamma
        self.max_len = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
        self._rng = np.random.default_rng(seed)
        self.stats = dict(rounds=0, proposed=0, accepted=0)

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed draft tokens, over every call so far."""
        return self.stats["accepted"] / max(1, self.stats["proposed"])

    def _check(self, prompt, params: SamplingParams) -> list[int]:
        ids = np.asarray(prompt)
        V = self.target.cfg.vocab_size
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt has shape {ids.shape}: expected a non-empty 1-D sequence of token ids")
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"prompt token ids must be integers in [0, vocab_size={V})")
        params.check(V, max_logprobs=0)
        if params.n != 1 or params.logprobs is not None:
            raise ValueError("speculative decoding supports n=1 and logprobs=None only")
        room = self.max_len - self.gamma - 1  # the last round may write gamma + 1 past the end
        if len(ids) + params.max_tokens > room:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds "
                f"{room} (max_seq_len={self.max_len} minus gamma + 1)"
            )
        return ids.astype(int).tolist()

    def _decode_batch(self, seq, n, limit, stops, rows, *, width):
        """The jitted decode of a batch: ``(seq, n, stopped, proposed, accepted, rounds)`` (see
        ``_decode``); a drafting mode other than a draft model overrides it."""
        # On CPU, unstacked layers: a scan over stacked ones copies every layer's weights per step.
        t_def, t_state = nnx.split(for_decoding(self.target))
        d_def, d_state = nnx.split(for_decoding(self.draft))
        return _decode(
            t_state,
            d_state,
            seq,
            n,
            limit,
            stops,
            rows,
            target_def=t_def,
            draft_def=d_def,
            gamma=self.gamma,
            width=width,
        )

    def generate(
        self, prompts, params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[SpeculativeOutput]:
        """Generates for each prompt (token ids) in one batch; validated before anything runs."""
        prompts = list(prompts)
        params = [params or SamplingParams()] * len(prompts) if not isinstance(params, list) else params
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        seqs = [self._check(p, s) for p, s in zip(prompts, params, strict=True)]
        seeds = [int(self._rng.integers(2**63)) if s.seed is None else s.seed for s in params]
        B, gamma = len(seqs), self.gamma
        lengths = [len(s) for s in seqs]
        # Caches as long as this batch needs (bucketed: few programs), not max_seq_len: a contiguous
        # cache's attention costs its full length at every step.
        S = min(
            self.max_len,
            next_pow2(max(n + s.max_tokens for n, s in zip(lengths, params, strict=True)) + gamma + 1),
        )
        seq = np.zeros((B, S), np.int32)
        for i, s in enumerate(seqs):
            seq[i, : len(s)] = s
        stops = np.full((B, max(1, *(len(s.stop_token_ids) for s in params))), -1, np.int32)
        for i, s in enumerate(params):
            stops[i, : len(s.stop_token_ids)] = s.stop_token_ids
        rows = sampling.host_rows(params, seeds, [0] * B, [0] * B)
        del rows["counter"], rows["logprobs"]  # the counter is a row's generated count, on device
        n = np.asarray(lengths, np.int32)
        seq, n, stopped, proposed, accepted, rounds = jax.device_get(
            self._decode_batch(
                jnp.asarray(seq),
                jnp.asarray(n),
                jnp.asarray(n + np.array([s.max_tokens for s in params], np.int32)),
                jnp.asarray(stops),
                rows,
                width=min(next_pow2(max(lengths)), S) if max(lengths) > 1 else 1,
            )
        )
        self.stats["rounds"] += int(rounds)
        self.stats["proposed"] += int(proposed.sum())
        self.stats["accepted"] += int(accepted.sum())
        return [
            SpeculativeOutput(
                seq[i, lengths[i] : n[i]].tolist(),
                "stop" if stopped[i] else "length",
                int(proposed[i]),
                int(accepted[i]),
            )
            for i in range(B)
        ]
