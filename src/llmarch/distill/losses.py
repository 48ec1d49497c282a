"""Divergences between a teacher's and a student's next-token distributions, per position.

Logits are ``[..., V]``; every function returns ``[...]`` float32 (one value per position), to be
averaged over the unmasked positions by the caller. ``P`` is the teacher's distribution and ``Q``
the student's, both softened by the temperature ``τ`` (``softmax(z / τ)``). Following Hinton et
al. (2015) the result is multiplied by ``τ²``: the gradients of a softened divergence scale as
``1/τ²``, so this keeps its weight against the hard-label loss the same for every ``τ``.

- forward KL ``KL(P‖Q) = Σ P (log P − log Q)``: the classic soft-target loss; mode covering;
- reverse KL ``KL(Q‖P)``: mode seeking (MiniLLM, Gu et al. 2024);
- generalized JSD(β) (GKD, Agarwal et al., ICLR 2024), with ``M = β P + (1−β) Q``:
  ``β KL(P‖M) + (1−β) KL(Q‖M)``; it tends to forward KL as β → 0 (divided by β) and to reverse
  KL as β → 1 (divided by 1−β), and at β = ½ is the Jensen–Shannon divergence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(P‖Q)`` from log-probabilities; ``0·log 0 = 0`` where P vanishes."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def forward_kl(teacher: jax.Array, student: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``τ² KL(P‖Q)`` per position (Hinton et al.'s soft-target loss)."""
    log_p, log_q = _log_probs(teacher, temperature), _log_probs(student, temperature)
    return temperature**2 * _kl(log_p, log_q)


def reverse_kl(teacher: jax.Array, student: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``τ² KL(Q‖P)`` per position."""
    log_p, log_q = _log_probs(teacher, temperature), _log_probs(student, temperature)
    return temperature**2 * _kl(log_q, log_p)


def jsd(teacher: jax.Array, student: jax.Array, temperature: float = 1.0, beta: float = 0.5) -> jax.Array:
    """``τ² [β KL(P‖M) + (1−β) KL(Q‖M)]``, ``M = β P + (1−β) Q``, per position; β in (0, 1)."""
    log_p, log_q = _log_probs(teacher, temperature), _log_probs(student, temperature)
    # log M = logsumexp(log β + log P, log(1−β) + log Q): stable where either is tiny.
    log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
    return temperature**2 * (beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m))


def divergence(
    name: str, teacher: jax.Array, student: jax.Array, *, temperature: float = 1.0, beta: float = 0.5
) -> jax.Array:
    """The divergence ``name`` ("forward_kl", "reverse_kl" or "jsd") per position."""
    if name == "forward_kl":
        return forward_kl(teacher, student, temperature)
    if name == "reverse_kl":
        return reverse_kl(teacher, student, temperature)
    if name == "jsd":
        return jsd(teacher, student, temperature, beta)
    raise ValueError(f"divergence {name!r} is unknown; allowed: forward_kl, reverse_kl, jsd")
