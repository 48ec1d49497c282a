"""The loss and a pure, jitted train step over the split NNX state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmarch import ops
from llmarch.checks import fail
from llmarch.lora.layer import dropout_key
from llmarch.model import AuxByModule, Transformer, aux_loss, aux_metrics
from llmarch.train.guard import all_finite
from llmarch.train.precision import check_trainable

Batch = dict[str, jax.Array]  # inputs, targets [B,T]; optional mask, segment_ids, positions [B,T]
StepFn = Callable[..., tuple[Any, ...]]  # (params, rest, opt_state, batch[, teacher]) -> new state, metrics
# A training objective other than ``loss_fn``'s: ``(model, batch, teacher) -> (total, parts, aux)``,
# ``parts`` holding at least "loss", "z_loss" and "aux_loss" (see ``llmarch.train.distill_step``).
Objective = Callable[[Transformer, Batch, Any], tuple[jax.Array, dict[str, jax.Array], AuxByModule]]

# Vocabulary entries per step of the fused loss's XLA path (llmarch.ops.cross_entropy): the
# largest loss temporary is [B·T, 8192] float32 instead of the [B,T,V] logits.
DEFAULT_LOSS_CHUNK = ops.DEFAULT_CHUNK


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross entropy of ``logits [B,T,V]`` (in float32) over unmasked positions."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return masked_mean(losses, mask)


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The mean of ``values`` over the positions where ``mask`` is nonzero (all without one)."""
    if mask is None:
        return values.mean()
    mask = mask.astype(jnp.float32)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def check_loss_chunk(owner: str, loss_chunk: Any) -> None:
    """``loss_chunk`` is a positive int or None; raises ValueError naming it (``owner``: the config
    class, "" for a function's argument)."""
    if loss_chunk is not None and (
        isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk <= 0
    ):
        fail(
            owner,
            "loss_chunk",
            loss_chunk,
            "must be a positive int (vocabulary entries per step of the fused cross entropy) "
            "or None (the plain loss over [B,T,V] logits)",
        )


def token_losses(
    model: Transformer, batch: Batch, loss_chunk: int | None = DEFAULT_LOSS_CHUNK
) -> tuple[jax.Array, jax.Array, AuxByModule]:
    """``(nll, lse, aux)``: each token's cross entropy and log normalizer ``logsumexp(logits)``,
    ``[B,T]`` float32, and the layers' aux (see ``Transformer.__call__``).

    With ``loss_chunk`` the ``[B,T,V]`` logits never exist: the model stops at its final hidden
    states and ``llmarch.ops.cross_entropy`` applies the output projection and the softmax a
    vocabulary chunk at a time, backward too (XLA on CPU, the Pallas kernels on TPU/GPU, as
    ``cfg.impl`` says). Its matmuls run in the compute dtype with float32 accumulation, so the
    logits are never rounded to a bfloat16 ``cfg.logits_dtype``. ``None``: the plain loss.
    """
    call = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), return_aux=True)
    targets = batch["targets"]
    if loss_chunk is None:
        out = model(batch["inputs"], **call)
        logits = out.logits.astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nll, jax.nn.logsumexp(logits, axis=-1), out.aux
    out = model(batch["inputs"], **call, return_hidden=True)
    w, transposed = model.output_projection()
    B, T, D = out.hidden.shape
    nll, lse = ops.cross_entropy(
        out.hidden.reshape(B * T, D),  # [B·T,D]
        w,
        targets.reshape(B * T),
        transpose_w=transposed,
        chunk=loss_chunk,
        impl=model.cfg.impl,
    )
    return nll.reshape(B, T), lse.reshape(B, T), out.aux


def loss_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: Batch,
    z_loss: float = 0.0,
    *,
    with_aux: bool = False,
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
) -> tuple[jax.Array, Any]:
    """Cross entropy, plus ``z_loss · mean(logsumexp(logits)²)`` (PaLM's z-loss, which keeps the
    softmax normalizer near 1 so bf16 logits do not drift), plus the layers' aux losses;
    returns ``(total, parts)``, or ``(total, (parts, aux))`` with ``with_aux`` (the layers' aux
    by module path, see ``Transformer.__call__``). ``loss_chunk``: see ``token_losses``."""
    nll, lse, aux = token_losses(nnx.merge(graphdef, params, rest), batch, loss_chunk)
    ce = masked_mean(nll, batch.get("mask"))
    z = masked_mean(jnp.square(lse), batch.get("mask"))
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
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
    keep_zeros: bool = False,
    objective: Objective | None = None,
) -> StepFn:
    """``step(params, rest, opt_state, batch, teacher=None, frozen=None, rng=None) -> (params,
    opt_state, metrics)``, jitted.

    ``params`` are the model's ``nnx.Param`` variables (``nnx.split(model, nnx.Param, ...)``);
    ``rest`` is any other state, passed through unchanged; with ``update_rest`` the step returns
    ``(params, rest, opt_state, metrics)`` with ``rest`` updated by ``Transformer.update_state``
    from the forward pass's aux (e.g. the MoE aux-loss-free expert bias; ``out_shardings`` then
    names params, rest and opt_state). A step is accepted only when its loss, gradients, new
    parameters and new optimizer state (and new ``rest``) are all finite; otherwise it leaves
    all state untouched and reports ``finite=False``, and the caller decides whether to go on.
    ``metrics`` also holds the layers' ``aux_metrics`` (e.g. ``expert_load``, ``load_ratio``).
    ``loss_chunk``: vocabulary entries per step of the fused loss (``token_losses``), or None.
    ``keep_zeros``: a weight matrix entry (any parameter of two or more axes) that is exactly zero
    before the step stays zero after it, so a pruned model keeps its masks through fine-tuning
    without storing them. ``objective``: trains on it instead of ``loss_fn`` (``z_loss`` and
    ``loss_chunk`` are then the objective's business); ``teacher`` is passed to it as is.
    A model whose config computes or keeps parameters in float16 is refused with a ValueError
    at the first call (``llmarch.train.precision.check_trainable``): there is no loss scaling.
    ``frozen``: weights the forward pass reads but the step neither differentiates nor returns (a
    LoRA run's base, ``llmarch.lora.split``; ``params`` are then the adapters). ``rng``: the key
    data of this step's LoRA dropout (None: no dropout).
    """
    check_loss_chunk("", loss_chunk)

    def loss(params, rest, batch, teacher, frozen, rng):
        fixed = rest if frozen is None else nnx.merge_state(rest, frozen)
        with dropout_key(rng):  # LoRA adapters' dropout: on in the train step only
            if objective is None:
                return loss_fn(graphdef, params, fixed, batch, z_loss, with_aux=True, loss_chunk=loss_chunk)
            total, parts, aux = objective(nnx.merge(graphdef, params, fixed), batch, teacher)
        return total, (parts, aux)

    def step(params, rest, opt_state, batch, teacher=None, frozen=None, rng=None):
        # Checked while tracing, before XLA compiles: float16 would need loss scaling.
        fixed = rest if frozen is None else nnx.merge_state(rest, frozen)
        check_trainable(getattr(nnx.merge(graphdef, params, fixed), "cfg", None))
        (_, (parts, aux)), grads = jax.value_and_grad(loss, has_aux=True)(
            params, rest, batch, teacher, frozen, rng
        )
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if keep_zeros:
            new_params = jax.tree.map(
                lambda new, old: jnp.where(old == 0, jnp.zeros_like(new), new) if old.ndim >= 2 else new,
                new_params,
                params,
            )
        new_rest = rest
        if update_rest:
            model = nnx.merge(graphdef, new_params, rest, *[frozen] * (frozen is not None))
            model.update_state(aux)
            if frozen is None:
                new_rest = nnx.state(model, nnx.Not(nnx.Param))
            else:  # the frozen base (params and quantized weights) is neither updated nor returned
                paths = set(nnx.to_flat_state(rest).paths)
                new_rest = nnx.state(model, lambda path, _: path in paths)
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
