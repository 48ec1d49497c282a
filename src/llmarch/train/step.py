"""The loss and a pure, jitted train step over the split NNX state."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmarch import mtp, ops
from llmarch.checks import fail
from llmarch.layers.mtp import targets_and_mask
from llmarch.lora.layer import dropout_key
from llmarch.model import AuxByModule, Transformer, aux_loss, aux_metrics
from llmarch.quant import fp8_delayed
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
    nll, lse, aux, _ = _token_losses(model, batch, loss_chunk, trunk=False)
    return nll, lse, aux


def _token_losses(
    model: Transformer, batch: Batch, loss_chunk: int | None, *, trunk: bool
) -> tuple[jax.Array, jax.Array, AuxByModule, jax.Array | None]:
    """``token_losses`` and, with ``trunk``, the states before the final norm (MTP's ``h^0``)."""
    call = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), return_aux=True)
    targets = batch["targets"]
    if loss_chunk is None and not trunk:
        out = model(batch["inputs"], **call)
        logits = out.logits.astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nll, jax.nn.logsumexp(logits, axis=-1), out.aux, None
    out = model(batch["inputs"], **call, return_hidden=True)
    nll, lse = _head_losses(model, out.hidden, targets, loss_chunk)
    return nll, lse, out.aux, out.trunk


def _head_losses(
    model: Transformer, hidden: jax.Array, targets: jax.Array, loss_chunk: int | None
) -> tuple[jax.Array, jax.Array]:
    """``(nll, lse)`` ``[B,T]`` of final-normed ``hidden [B,T,D]`` through the output head: fused
    over vocabulary chunks (``llmarch.ops.cross_entropy``), or, with no ``loss_chunk``, plainly."""
    if loss_chunk is None:
        logits = model.head(hidden).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nll, jax.nn.logsumexp(logits, axis=-1)
    w, transposed = model.output_projection()
    B, T, D = hidden.shape
    nll, lse = ops.cross_entropy(
        hidden.reshape(B * T, D),  # [B·T,D]
        w,
        targets.reshape(B * T),
        transpose_w=transposed,
        chunk=loss_chunk,
        impl=model.cfg.impl,
    )
    return nll.reshape(B, T), lse.reshape(B, T)


def mtp_losses(
    model: Transformer, batch: Batch, trunk: jax.Array, loss_chunk: int | None = DEFAULT_LOSS_CHUNK
) -> tuple[jax.Array, AuxByModule]:
    """``(L_MTP^k for k = 1..D [D], aux)``: each multi-token-prediction depth's mean cross entropy
    (DeepSeek-V3 §2.2) over the positions whose target ``t_{i+k+1}`` the row holds, the main loss
    counts, and lies in position i's own document (``layers.mtp.targets_and_mask``), through the
    shared output head a vocabulary chunk at a time as the main loss; ``aux``: the MTP blocks'."""
    hidden, aux = mtp.hidden(
        model, trunk, batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    losses = []
    for k, h in enumerate(hidden, start=1):
        targets, mask = targets_and_mask(batch["targets"], k, batch.get("mask"), batch.get("segment_ids"))
        nll, _ = _head_losses(model, model.mtp[k - 1].norm(h), targets, loss_chunk)
        losses.append(masked_mean(nll, mask))
    return jnp.stack(losses), aux


def loss_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    batch: Batch,
    z_loss: float = 0.0,
    *,
    with_aux: bool = False,
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
    mtp_weight: jax.Array | float | None = None,
) -> tuple[jax.Array, Any]:
    """Cross entropy, plus ``z_loss · mean(logsumexp(logits)²)`` (PaLM's z-loss, which keeps the
    softmax normalizer near 1 so bf16 logits do not drift), plus the layers' aux losses;
    returns ``(total, parts)``, or ``(total, (parts, aux))`` with ``with_aux`` (the layers' aux
    by module path, see ``Transformer.__call__``). ``loss_chunk``: see ``token_losses``.

    ``mtp_weight``: λ of DeepSeek-V3's multi-token prediction: for a model with MTP modules the
    objective adds ``λ · mean_k L_MTP^k`` (``mtp_losses``; ``parts["mtp_loss"]`` is that mean,
    unweighted) and the MTP blocks' own aux losses; None (or a model without MTP): no MTP at all."""
    model = nnx.merge(graphdef, params, rest)
    with_mtp = mtp_weight is not None and getattr(model, "mtp", None) is not None
    nll, lse, aux, trunk = _token_losses(model, batch, loss_chunk, trunk=with_mtp)
    ce = masked_mean(nll, batch.get("mask"))
    z = masked_mean(jnp.square(lse), batch.get("mask"))
    total = ce + z_loss * z
    if with_mtp:
        per_depth, mtp_aux = mtp_losses(model, batch, trunk, loss_chunk)
        aux = collections.OrderedDict({**aux, **mtp_aux})  # after the decoder's, in layer order
        total = total + mtp_weight * per_depth.mean()
    extra = aux_loss(aux)  # the layers' own weighted losses (e.g. MoE load balancing)
    parts = {"loss": ce, "z_loss": z, "aux_loss": extra}
    if with_mtp:
        parts["mtp_loss"] = per_depth.mean()
    return total + extra, ((parts, aux) if with_aux else parts)


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
    mtp_loss_weight: float | None = None,
) -> StepFn:
    """``step(params, rest, opt_state, batch, teacher=None, frozen=None, rng=None, mtp_weight=None)
    -> (params, opt_state, metrics)``, jitted.

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
    data of this step's LoRA dropout (None: no dropout). ``mtp_loss_weight``: λ of multi-token
    prediction (``loss_fn``'s ``mtp_weight``) for a model with MTP modules; a step's ``mtp_weight``
    overrides it (a traced scalar: a schedule such as DeepSeek-V3's 0.3 then 0.1 does not
    recompile); both None: the MTP modules are not trained. Not used with an ``objective``.
    """
    check_loss_chunk("", loss_chunk)

    def loss(params, rest, batch, teacher, frozen, rng, mtp_weight):
        fixed = rest if frozen is None else nnx.merge_state(rest, frozen)
        with dropout_key(rng):  # LoRA adapters' dropout: on in the train step only
            if objective is None:
                return loss_fn(
                    graphdef,
                    params,
                    fixed,
                    batch,
                    z_loss,
                    with_aux=True,
                    loss_chunk=loss_chunk,
                    mtp_weight=mtp_weight,
                )
            total, parts, aux = objective(nnx.merge(graphdef, params, fixed), batch, teacher)
        return total, (parts, aux)

    def step(params, rest, opt_state, batch, teacher=None, frozen=None, rng=None, mtp_weight=None):
        # Checked while tracing, before XLA compiles: float16 would need loss scaling.
        fixed = rest if frozen is None else nnx.merge_state(rest, frozen)
        check_trainable(getattr(nnx.merge(graphdef, params, fixed), "cfg", None))
        weight = mtp_loss_weight if mtp_weight is None else mtp_weight
        # FP8 delayed scaling: the amax histories (FP8Meta, in rest) are differentiated too, and
        # their "gradient" is the history after this step, which replaces them below; the
        # optimizer never sees it (llmarch.quant.fp8_delayed).
        delayed = fp8_delayed.has_meta(rest)
        if delayed and not update_rest:
            raise ValueError(
                "a model under --precision fp8-delayed needs make_train_step(update_rest=True): its "
                "amax histories are state the step returns in rest"
            )
        if delayed:
            meta, others = fp8_delayed.split_meta(rest)
            with_meta = lambda p, m, *a: loss(p, nnx.merge_state(others, m), *a)  # noqa: E731
            (_, (parts, aux)), (grads, new_meta) = jax.value_and_grad(with_meta, (0, 1), has_aux=True)(
                params, meta, batch, teacher, frozen, rng, weight
            )
        else:
            (_, (parts, aux)), grads = jax.value_and_grad(loss, has_aux=True)(
                params, rest, batch, teacher, frozen, rng, weight
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
            if delayed:  # overwritten with their "gradient" (above)
                new_rest = nnx.merge_state(new_rest, new_meta)
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
