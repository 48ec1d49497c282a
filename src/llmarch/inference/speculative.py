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

_DRAFT, _ACCEPT, _FINAL = 0, 1, 2  # key streams of a round


@dataclasses.dataclass
class SpeculativeOutput:
    token_ids: list[int]
    finish_reason: str
    proposed: int  # draft tokens proposed for this request
    accepted: int  # of which the target accepted


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(state, tokens, cache, *, graphdef):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return nnx.merge(graphdef, state)(tokens, positions=positions, cache=cache).cache


@functools.partial(
    jax.jit, static_argnames=("target_def", "draft_def", "gamma"), donate_argnames=("t_cache", "d_cache")
)
def _round(t_state, d_state, t_cache, d_cache, last2, n, rows, *, target_def, draft_def, gamma):
    """One round for every row: ``gamma`` proposals, one verification, acceptance.

    ``last2 [B,2]``: the sequence's last two tokens (the first repeated for 1-token sequences);
    ``n [B]``: sequence lengths. Returns ``(t_cache, d_cache, tokens [B,gamma+1], accepted [B])``:
    the row's new tokens are ``tokens[:accepted + 1]``.
    """
    target, draft = nnx.merge(target_def, t_state), nnx.merge(draft_def, d_state)
    B = n.shape[0]
    temp, top_k, top_p = rows["temperature"], rows["top_k"], rows["top_p"]
    base = sampling.row_keys(rows["seed_lo"], rows["seed_hi"], rows["sample"], rows["counter"])

    def keys(stream, j):  # [B] keys of (stream, j) in this round
        return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, stream), j))(base)

    def draw(probs, key):  # [B,V] probabilities -> [B] tokens
        return jax.vmap(jax.random.categorical)(key, jnp.log(probs)).astype(jnp.int32)

    pos = jnp.stack([jnp.maximum(n - 2, 0), n - 1], axis=1)  # [B,2]
    out = draft(last2, positions=pos, cache=d_cache)
    logits, d_cache = out.logits, out.cache
    qs, drafts = [], []
    for j in range(gamma):
        q = sampling.probabilities(logits[:, -1], temp, top_k, top_p)  # [B,V]
        token = draw(q, keys(_DRAFT, j))
        qs.append(q)
        drafts.append(token)
        if j + 1 < gamma:
            out = draft(token[:, None], positions=(n + j)[:, None], cache=d_cache)
            logits, d_cache = out.logits, out.cache
    q = jnp.stack(qs, axis=1)  # [B,gamma,V]
    d = jnp.stack(drafts, axis=1)  # [B,gamma]
    verify = jnp.concatenate([last2[:, 1:], d], axis=1)  # [B,gamma+1]: x_{n-1}, d_1..d_gamma
    positions = (n - 1)[:, None] + jnp.arange(gamma + 1, dtype=jnp.int32)[None]
    out = target(verify, positions=positions, cache=t_cache)
    logits, t_cache = out.logits, out.cache  # [B,gamma+1,V]
    V = logits.shape[-1]
    p = sampling.probabilities(
        logits.reshape(B * (gamma + 1), V),
        jnp.repeat(temp, gamma + 1),
        jnp.repeat(top_k, gamma + 1),
        jnp.repeat(top_p, gamma + 1),
    )
    p = p.reshape(B, gamma + 1, V)
    p_d = jnp.take_along_axis(p[:, :gamma], d[..., None], axis=-1)[..., 0]  # [B,gamma]
    q_d = jnp.take_along_axis(q, d[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(keys(_ACCEPT, 0))  # [B,gamma]
    ok = u * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [B] leading accepts
    p_k = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B,V]
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_{gamma+1} = 0: bonus from p
    q_k = jnp.take_along_axis(q_pad, accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_k - q_k, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_k)
    final = draw(residual, keys(_FINAL, 0))
    tokens = jnp.concatenate([d, jnp.zeros_like(d[:, :1])], axis=1)
    tokens = tokens.at[jnp.arange(B), accepted].set(final)
    return t_cache, d_cache, tokens, accepted


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
        t_def, t_state = nnx.split(self.target)
        d_def, d_state = nnx.split(self.draft)
        t_cache, d_cache = self.target.init_cache(B, S), self.draft.init_cache(B, S)
        width = min(next_pow2(max(lengths)), S)  # prefill x[:n-1] of every row (junk past it is rewritten)
        if max(lengths) > 1:
            tokens = np.zeros((B, width), np.int32)
            for i, s in enumerate(seqs):
                tokens[i, : len(s)] = s
            t_cache = _prefill(t_state, jnp.asarray(tokens), t_cache, graphdef=t_def)
            d_cache = _prefill(d_state, jnp.asarray(tokens), d_cache, graphdef=d_def)
        prompt_lens = list(lengths)
        done = [None] * B
        proposed, accepted_total = [0] * B, [0] * B
        while not all(done):
            n = np.array([len(s) for s in seqs], np.int32)
            last2 = np.array([[s[-2] if len(s) > 1 else s[-1], s[-1]] for s in seqs], np.int32)
            rows = sampling.host_rows(
                params, seeds, [0] * B, [len(s) - p for s, p in zip(seqs, prompt_lens, strict=True)]
            )
            t_cache, d_cache, tokens, accepted = _round(
                t_state,
                d_state,
                t_cache,
                d_cache,
                jnp.asarray(last2),
                jnp.asarray(n),
                rows,
                target_def=t_def,
                draft_def=d_def,
                gamma=gamma,
            )
            tokens, accepted = np.asarray(tokens), np.asarray(accepted)
            self.stats["rounds"] += 1
            for i in range(B):
                if done[i]:
                    continue
                proposed[i] += gamma
                accepted_total[i] += int(accepted[i])
                for token in tokens[i, : accepted[i] + 1].tolist():
                    seqs[i].append(token)
                    if token in params[i].stop_token_ids:
                        done[i] = "stop"
                    elif len(seqs[i]) - prompt_lens[i] >= params[i].max_tokens:
                        done[i] = "length"
                    if done[i]:
                        break
        self.stats["proposed"] += sum(proposed)
        self.stats["accepted"] += sum(accepted_total)
        return [
            SpeculativeOutput(s[p:], r, pr, a)
            for s, p, r, pr, a in zip(seqs, prompt_lens, done, proposed, accepted_total, strict=True)
        ]
