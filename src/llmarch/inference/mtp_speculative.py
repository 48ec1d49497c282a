"""Self-speculative decoding with DeepSeek-V3's multi-token-prediction module as the drafter (V3
report §5.4.3: 85-90% of second tokens accepted, 1.8x tokens/s).

The model drafts for itself: its first MTP module reads the target's own hidden state ``h^0_p``
(``ModelOutput.trunk``) and the token after it, ``t_{p+1}``, and predicts ``t_{p+2}``: one
proposal per round (``gamma = 1``), verified by the next round's target pass, accepted by the
rule of ``llmarch.inference.speculative`` (greedy rows: argmax agreement, so greedy output is the
target's greedy output exactly; sampled rows: rejection sampling, the target's distribution).

A round, for a row holding ``n`` tokens whose target cache holds positions ``<= n-2``, whose MTP
cache holds the same, and whose carried draft ``d`` guesses ``t_n``:

1. the target runs ``[t_{n-1}, d]`` at positions ``n-1, n``: logits and ``h^0`` at both;
2. acceptance: ``d`` is kept or not, and one more token comes from the target (a correction or a
   bonus): 1 or 2 new tokens;
3. the MTP module runs the same two positions with ``h^0`` and the tokens now known after them,
   writing its cache; its output at the row's new last-but-one position ``n'-2`` (whose next token
   ``t_{n'-1}`` is the one just produced) drafts ``t_{n'}`` for the next round.

Each round's two positions start where the last round's accepted ones end, so the windows cover
every position: a slot written from a rejected draft is rewritten before a query reaches it, as
in the draft-model decoder. Prefill runs the target and the MTP module over the prompt and takes
the first token from the target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import mtp
from llmarch.inference import sampling
from llmarch.inference.speculative import _DRAFT, SpeculativeDecoder, _acceptance, _draw
from llmarch.layers.mtp import shift_left

_FIRST = 3  # key stream of the prefill's token


def _pick(logits, rows, keys, sampled):
    """``(token [B], q [B,V])`` from ``logits [B,V]``: the row's sampling rule (greedy: argmax,
    q unused zeros when every row is greedy)."""

    def sample(logits):
        q = sampling.probabilities(logits, rows["temperature"], rows["top_k"], rows["top_p"])
        return _draw(q, keys), q

    def greedy(logits):
        return sampling.greedy_tokens(logits), jnp.zeros_like(logits)

    return jax.lax.cond(sampled, sample, greedy, logits.astype(jnp.float32))


def _keys(rows, count, stream):
    base = sampling.row_keys(rows["seed_lo"], rows["seed_hi"], rows["sample"], count)
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, stream), 0))(base)


@functools.partial(jax.jit, static_argnames=("graphdef", "width"), donate_argnames=("seq",))
def _decode(state, seq, n, limit, stops, rows, *, graphdef, width):
    """As ``speculative._decode``, the model drafting with its first MTP module; returns ``(seq, n,
    stopped, proposed, accepted, rounds)``."""
    model = nnx.merge(graphdef, state)
    B, S = seq.shape
    rowsB = jnp.arange(B)
    start = n
    sampled = jnp.any(rows["temperature"] > 0)
    t_cache, m_cache = model.init_cache(B, S), mtp.init_cache(model, B, S)[0]

    # Prefill: the target over the prompts (junk past a row's end is rewritten before it is read),
    # the first token from the target at each row's last position, then the MTP module over the
    # same positions with the tokens after them, its output at n-1 drafting t_{n+1}.
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (B, width))
    out = model(seq[:, :width], positions=positions, cache=t_cache, return_hidden=True)
    t_cache, last = out.cache, n - 1
    logits = model.head(out.hidden[rowsB, last][:, None])[:, 0]
    first, _ = _pick(logits, rows, _keys(rows, jnp.zeros_like(n), _FIRST), sampled)
    seq = seq.at[rowsB, n].set(first)
    ahead = shift_left(seq, 1)[:, :width]  # t_{q+1}
    h, m_cache, _ = mtp.step(model, 1, out.trunk, ahead, positions, cache=m_cache)
    d, q = _pick(
        mtp.logits(model, 1, h[rowsB, last][:, None])[:, 0],
        rows,
        _keys(rows, jnp.ones_like(n), _DRAFT),
        sampled,
    )
    is_stop = jnp.any(first[:, None] == stops, axis=-1)
    stopped = is_stop | (limit <= n)  # max_tokens >= 1: the first token is always kept
    n = n + 1
    window = jnp.arange(2, dtype=jnp.int32)[None]  # [1,2]

    def body(carry):
        t_cache, m_cache, seq, n, d, q, stopped, proposed, accepted_total, rounds = carry
        active = (n < limit) & ~stopped
        count = n - start  # tokens generated so far: the sampling keys' counter
        pos = (n - 1)[:, None] + window  # [B,2]
        verify = jnp.stack([seq[rowsB, n - 1], d], axis=1)  # [B,2]
        out = model(verify, positions=pos, cache=t_cache, return_hidden=True)
        logits = model.head(out.hidden).astype(jnp.float32)  # [B,2,V]

        def rejection(logits):
            V = logits.shape[-1]
            r = lambda x: jnp.repeat(x, 2)  # noqa: E731
            p = sampling.probabilities(
                logits.reshape(-1, V), r(rows["temperature"]), r(rows["top_k"]), r(rows["top_p"])
            )
            keys = lambda stream, j: _keys(rows, count, stream)  # noqa: E731
            return _acceptance(p.reshape(B, 2, V), q[:, None], d[:, None], keys, gamma=1)

        def greedy(logits):
            best = sampling.greedy_tokens(logits)  # [B,2]
            accepted = (d == best[:, 0]).astype(jnp.int32)
            return accepted, best[rowsB, accepted]

        accepted, final = jax.lax.cond(sampled, rejection, greedy, logits)
        tokens = jnp.stack([jnp.where(accepted > 0, d, final), final], axis=1)  # [B,2]: the new tokens
        is_stop = jnp.any(tokens[:, :, None] == stops[:, None, :], axis=-1)  # [B,2]
        first_stop = jnp.min(jnp.where(is_stop, window, 2), axis=1)
        keep = jnp.minimum(jnp.minimum(accepted + 1, limit - n), first_stop + 1)
        at = jnp.where(active[:, None] & (window < keep[:, None]), n[:, None] + window, S)  # S: dropped
        seq = seq.at[rowsB[:, None], at].set(tokens, mode="drop")
        # The MTP module over the same two positions, each with the token after it (t_n = tokens[0],
        # t_{n+1} = tokens[1], junk when only one was produced: that slot is rewritten next round).
        h, m_cache, _ = mtp.step(model, 1, out.trunk, tokens, pos, cache=m_cache)
        new_n = jnp.where(active, n + keep, n)
        mtp_logits = mtp.logits(model, 1, h[rowsB, jnp.clip(accepted, 0, 1)][:, None])[:, 0]
        d_next, q_next = _pick(mtp_logits, rows, _keys(rows, new_n - start, _DRAFT), sampled)
        return (
            out.cache,
            m_cache,
            seq,
            new_n,
            jnp.where(active, d_next, d),
            jnp.where(active[:, None], q_next, q),
            stopped | (active & (first_stop < keep)),
            proposed + active,
            accepted_total + jnp.where(active, accepted, 0),
            rounds + 1,
        )

    def running(carry):
        n, stopped = carry[3], carry[6]
        return jnp.any((n < limit) & ~stopped)

    zeros = jnp.zeros_like(n)
    carry = (t_cache, m_cache, seq, n, d, q, stopped, zeros, zeros, jnp.int32(0))
    out = jax.lax.while_loop(running, body, carry)
    return out[2], out[3], out[6], out[7], out[8], out[9]


class MTPSpeculativeDecoder(SpeculativeDecoder):
    """Generates with ``model``, drafting one token per round with its own first MTP module
    (``ModelConfig.mtp_depth >= 1``); ``acceptance_rate`` and ``stats`` as ``SpeculativeDecoder``.

    Raises:
      ValueError: for a model without MTP modules.
    """

    def __init__(self, model, *, seed: int = 0):
        if getattr(model, "mtp", None) is None:
            raise ValueError(
                f"model {model.cfg.name!r} has mtp_depth={model.cfg.mtp_depth}: MTP drafting needs "
                "ModelConfig.mtp_depth >= 1"
            )
        super().__init__(model, model, gamma=1, seed=seed)

    def _decode_batch(self, seq, n, limit, stops, rows, *, width):
        graphdef, state = nnx.split(self.target)
        return _decode(state, seq, n, limit, stops, rows, graphdef=graphdef, width=width)
