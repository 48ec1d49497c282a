"""Training safety: which steps are accepted, when a run is diverging or dead, when it must stop.

The train step itself only accepts an update whose loss, gradients, new parameters and new
optimizer state are all finite (``all_finite``); a rejected step leaves the state untouched.
``RunHealth`` watches the accepted and rejected steps from the host and decides the rest:

- a loss spike far above its running level, or a dead model (gradient norm exactly zero for
  ``DEAD_STEPS`` steps in a row, as after a learning rate that saturates every unit) is warned
  about loudly, once per episode;
- a run stops with ``TrainingError`` as soon as more than ``max_skipped_fraction`` of its steps
  were skipped, since it can no longer end below that share.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEAD_STEPS = 20  # zero gradient norm this many steps in a row: the model no longer learns
SPIKE_WARMUP = 10  # steps before the running loss is trusted
SPIKE_RATIO, SPIKE_MARGIN = 1.5, 1.0  # a spike: loss > 1.5 × running loss and > running + 1 nat
EMA_DECAY = 0.9


class TrainingError(RuntimeError):
    """A run that cannot end well: non-finite state, too many skipped steps, ``nan_policy=stop``."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is finite (a scalar bool, on device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


class RunHealth:
    """Host-side bookkeeping of a run's steps; see the module docstring."""

    def __init__(self, total_steps: int, max_skipped_fraction: float, *, warn):
        self.total_steps, self.max_skipped_fraction, self.warn = total_steps, max_skipped_fraction, warn
        self.ema: float | None = None
        self.accepted = 0
        self.zero_grad_streak = 0
        self.in_spike = False

    def observe(self, step: int, loss: float, grad_norm: float, finite: bool, skipped_total: int) -> None:
        """Records one step; warns on divergence; raises when too many steps were skipped."""
        if not finite:
            allowed = self.max_skipped_fraction * self.total_steps
            if skipped_total > allowed:
                raise TrainingError(
                    f"{skipped_total} of {step} steps were skipped for non-finite loss, gradients or "
                    f"update, more than max_skipped_fraction={self.max_skipped_fraction} of "
                    f"{self.total_steps} steps allows: the run has diverged (lower the learning rate, "
                    "add clipping or z_loss)"
                )
            return
        self.zero_grad_streak = self.zero_grad_streak + 1 if grad_norm == 0.0 else 0
        if self.zero_grad_streak == DEAD_STEPS:
            self.warn(
                f"step {step}: the gradient norm has been exactly 0 for {DEAD_STEPS} steps "
                f"(loss {loss:.4f}): the model has stopped learning, typically after a learning rate "
                "far too large saturated it"
            )
        if self.ema is not None and self.accepted >= SPIKE_WARMUP and math.isfinite(loss):
            spike = loss > SPIKE_RATIO * self.ema and loss > self.ema + SPIKE_MARGIN
            if spike and not self.in_spike:
                self.warn(
                    f"step {step}: loss {loss:.4f} is far above its running level "
                    f"{self.ema:.4f}: the run may be diverging"
                )
            self.in_spike = spike
            if spike:
                return  # a spike does not move the reference level
        self.accepted += 1
        self.ema = loss if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * loss
