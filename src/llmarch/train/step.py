"""The loss and a pure, jitted train step over the split NNX state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]  # inputs [B,T], targets [B,T], optional mask / segment_ids [B,T]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross entropy of ``logits [B,T,V]`` (float32) over unmasked positions."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch) -> jax.Array:
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
    return cross_entropy(logits, batch["targets"], batch.get("mask"))


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> Callable[[nnx.State, nnx.State, Any, Batch], tuple[nnx.State, Any, dict[str, jax.Array]]]:
    """``step(params, rest, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    ``params`` are the model's ``nnx.Param`` variables (``nnx.split(model, nnx.Param, ...)``);
    ``rest`` is any other state, passed through unchanged.
    """

    @jax.jit
    def step(params, rest, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(graphdef, params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step
