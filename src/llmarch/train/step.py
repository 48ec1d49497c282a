"""The loss and a pure, jitted train step over the split NNX state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmarch.model import aux_loss, aux_metrics
from llmarch.train.guard import all_finite

Batch = dict[str, jax.Array]  # inputs, targets [B,T]; optional mask, segment_ids, positions [B,T]
StepFn = Callable[[nnx.State, nnx.State, Any, Batch], tuple[nnx.State, Any, dict[str, jax.Array]]]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross entropy of ``logits [B,T,V]`` (in float32) over unmasked positions."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return _masked_mean(losses, mask)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return values.mean()
    mask = mask.astype(jnp.float32)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loss_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: Batch,
    z_loss: float = 0.0,
    *,
    with_aux: bool = False,
) -> tuple[jax.Array, Any]:
    """Cross entropy, plus ``z_loss · mean(logsumexp(logits)²)`` (PaLM's z-loss, which keeps the
    softmax normalizer near 1 so bf16 logits do not drift), plus the layers' aux losses;
    returns ``(total, parts)``, or ``(total, (parts, aux))`` with ``with_aux`` (the layers' aux
    by module path, see ``Transformer.__call__``)."""
    model = nnx.merge(graphdef, params, rest)
    out = model(
        batch["inputs"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        return_aux=True,
    )
    logits, aux = out.logits.astype(jnp.float32), out.aux
    ce = cross_entropy(logits, batch["targets"], batch.get("mask"))
    z = _masked_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)), batch.get("mask"))
    extra = aux_loss(aux)  # the layers' own weighted losses (e.g. MoE load balancing)
    parts = {"loss": ce, "z_loss": z, "aux_loss": extra}
    return ce + z_loss * z + extra, ((parts, aux) if with_aux else parts)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    z_loss: float = 0.0,
    donate: bool = False,
    out_shardings: Any = None,
    update_rest: bool = False,
) -> StepFn:
    """``step(params, rest, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    ``params`` are the model's ``nnx.Param`` variables (``nnx.split(model, nnx.Param, ...)``);
    ``rest`` is any other state, passed through unchanged; with ``update_rest`` the step returns
    ``(params, rest, opt_state, metrics)`` with ``rest`` updated by ``Transformer.update_state``
    from the forward pass's aux (e.g. the MoE aux-loss-free expert bias; ``out_shardings`` then
    names params, rest and opt_state). A step is accepted only when its loss, gradients, new
    parameters and new optimizer state (and new ``rest``) are all finite; otherwise it leaves
    all state untouched and reports ``finite=False``, and the caller decides whether to go on.
    ``metrics`` also holds the layers' ``aux_metrics`` (e.g. ``expert_load``, ``load_ratio``).
    """

    def step(params, rest, opt_state, batch):
        (_, (parts, aux)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            graphdef, params, rest, batch, z_loss, with_aux=True
        )
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_rest = rest
        if update_rest:
            model = nnx.merge(graphdef, new_params, rest)
            model.update_state(aux)
            new_rest = nnx.state(model, nnx.Not(nnx.Param))
        # A finite loss and gradient can still give a non-finite update (a huge learning rate,
        # a NaN hyperparameter): check what would be kept, not only what it was built from.
        finite = (
            jnp.isfinite(parts["loss"])
            & jnp.isfinite(grad_norm)
            & all_finite((new_params, new_opt_state, new_rest))
        )
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = {**parts, **aux_metrics(aux), "grad_norm": grad_norm, "finite": finite}
        if update_rest:
            return keep(new_params, params), keep(new_rest, rest), keep(new_opt_state, opt_state), metrics
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    return jax.jit(
        step,
        donate_argnums=(0, 2) if donate else (),
        out_shardings=None if out_shardings is None else (*out_shardings, None),
    )
