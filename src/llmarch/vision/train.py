"""Training a LLaVA model on captions: the loss on caption tokens only, and LLaVA's two stages.

LLaVA (Liu et al. 2023) trains in stages over one model: stage 1 ("feature alignment") trains only
the projector, tower and decoder frozen; stage 2 ("instruction tuning") trains projector and decoder,
the tower still frozen. A model trained from scratch (the synthetic shapes experiment) trains all.
``TRAINABLE`` names these; ``split_trainable`` cuts the model's state along them:

    graphdef, params, frozen = split_trainable(model, "projector")
    step = make_vlm_train_step(graphdef, tx)
    opt_state = tx.init(params)
    params, opt_state, metrics = step(params, frozen, opt_state, batch)

The step differentiates ``params`` only; ``frozen`` (the frozen weights and any non-parameter state)
is read by the forward pass and never returned, so it cannot change. The loss is the decoder's
fused cross entropy (``llmarch.ops.cross_entropy`` over ``output_projection()``, a vocabulary chunk
at a time, as ``llmarch.train.step`` computes it) averaged over ``batch["mask"]``: the caption tokens
of ``llmarch.data.image_text`` rows, never the image placeholders or the prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llmarch import ops
from llmarch.checks import check_choice, check_int
from llmarch.train.guard import all_finite
from llmarch.train.step import DEFAULT_LOSS_CHUNK, check_loss_chunk, masked_mean
from llmarch.vision.llava import Llava, check_inputs

Batch = dict[str, jax.Array]  # inputs, targets, mask [B,T]; pixel_values [N,C,H,W]

# Which of Llava's three parts each stage trains.
TRAINABLE: dict[str, tuple[str, ...]] = {
    "projector": ("projector",),  # LLaVA stage 1
    "projector+decoder": ("projector", "language_model"),  # LLaVA stage 2
    "all": ("vision", "projector", "language_model"),  # from scratch
}


def trainable_filter(stage: str) -> Callable[[Any, Any], bool]:
    """The nnx filter of ``stage``'s parameters: ``nnx.Param``s under its parts of ``Llava``."""
    check_choice("", "stage", stage, tuple(TRAINABLE))
    parts = TRAINABLE[stage]
    return lambda path, x: isinstance(x, nnx.Param) and bool(path) and path[0] in parts


def split_trainable(model: Llava, stage: str = "all") -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, frozen)``: ``stage``'s parameters, and everything else."""
    if not isinstance(model, Llava):
        raise ValueError(f"model={type(model).__name__} is invalid: must be a llmarch.vision.Llava")
    return nnx.split(model, trainable_filter(stage), ...)


def caption_losses(model: Llava, batch: Batch, loss_chunk: int | None = DEFAULT_LOSS_CHUNK) -> jax.Array:
    """Each position's next-token cross entropy ``[B,T]`` (float32) of ``batch["targets"]``, the
    image features of ``batch["pixel_values"]`` written over the placeholders (None: a text-only
    batch). ``loss_chunk``: vocabulary entries per step of the fused loss, or None for the plain
    loss over ``[B,T,V]`` logits."""
    tokens, targets = batch["inputs"], batch["targets"]
    x = model.embed(tokens, batch.get("pixel_values"))  # [B,T,D]
    lm = model.language_model
    if loss_chunk is None:
        logits = lm(tokens, embeddings=x).astype(jnp.float32)  # [B,T,V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hidden = lm(tokens, embeddings=x, return_hidden=True).hidden  # [B,T,D]
    w, transposed = lm.output_projection()
    B, T, D = hidden.shape
    nll, _ = ops.cross_entropy(
        hidden.reshape(B * T, D),  # [B·T,D]
        w,
        targets.reshape(B * T),
        transpose_w=transposed,
        chunk=loss_chunk,
        impl=lm.cfg.impl,
    )
    return nll.reshape(B, T)


def caption_loss(model: Llava, batch: Batch, loss_chunk: int | None = DEFAULT_LOSS_CHUNK) -> jax.Array:
    """The mean cross entropy over ``batch["mask"]`` (the caption tokens)."""
    return masked_mean(caption_losses(model, batch, loss_chunk), batch.get("mask"))


def check_batch(model_or_cfg: Any, batch: Batch) -> None:
    """On the host, before the jitted step: the keys, and one-line ValueErrors for images that do
    not pair with the placeholders (``llmarch.vision.llava.check_inputs``), which inside jit would
    silently reuse features."""
    missing = [k for k in ("inputs", "targets", "mask") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: a caption batch has inputs, targets, mask, pixel_values")
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    check_inputs(cfg, np.asarray(batch["inputs"]), batch.get("pixel_values"))


def make_vlm_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
    donate: bool = False,
) -> Callable[..., tuple[nnx.State, Any, dict[str, jax.Array]]]:
    """``step(params, frozen, opt_state, batch) -> (params, opt_state, metrics)``.

    ``params, frozen`` come from ``split_trainable`` (``opt_state = tx.init(params)``). The batch is
    checked on the host (``check_batch``), then a jitted step differentiates the caption loss with
    respect to ``params`` alone. As in ``llmarch.train.step``, an update is kept only if the loss,
    gradients, new parameters and optimizer state are all finite; ``metrics``: ``loss``,
    ``grad_norm``, ``tokens`` (caption tokens in the batch), ``finite``.
    """
    check_loss_chunk("", loss_chunk)

    def loss(params, frozen, batch):
        return caption_loss(nnx.merge(graphdef, params, frozen), batch, loss_chunk)

    def step(params, frozen, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, frozen, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm) & all_finite((new_params, new_opt_state))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "tokens": batch["mask"].sum(),
            "finite": finite,
        }
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    jitted = jax.jit(step, donate_argnums=(0, 2) if donate else ())
    cfgs: list = []  # the model's LlavaConfig, read once from the first call's state

    def checked(params, frozen, opt_state, batch):
        if not cfgs:
            cfgs.append(nnx.merge(graphdef, params, frozen).cfg)
        check_batch(cfgs[0], batch)
        return jitted(params, frozen, opt_state, batch)

    checked.jitted = jitted  # the bare jitted step, for callers that checked their batches already
    return checked


def make_eval_loss(
    graphdef: nnx.GraphDef, *, loss_chunk: int | None = DEFAULT_LOSS_CHUNK
) -> Callable[[nnx.State, nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    """``eval_loss(params, frozen, batch) -> (sum of caption-token losses, caption tokens)``, jitted
    (one compilation per graphdef, shape and ``loss_chunk``, shared by every call of this function);
    sum both over batches and divide for a held-out mean."""
    check_loss_chunk("", loss_chunk)
    return functools.partial(_eval_loss, graphdef, loss_chunk)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_loss(graphdef, loss_chunk, params, frozen, batch):
    nll = caption_losses(nnx.merge(graphdef, params, frozen), batch, loss_chunk)
    mask = batch["mask"].astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens, images):
    return nnx.merge(graphdef, *state).embed(tokens, images)  # [N,T,D]


@functools.partial(jax.jit, static_argnums=0)
def _next_token(graphdef, state, tokens, image_x, t):
    """The argmax ``[N]`` of the logits at position ``t - 1`` of ``tokens [N,T]``, whose placeholders
    take their embeddings from ``image_x [N,T,D]`` (the tower runs once per caption, not per token)."""
    model = nnx.merge(graphdef, *state)
    is_image = (tokens == model.cfg.image_token_id)[..., None]  # [N,T,1]
    x = jnp.where(is_image, image_x, model.language_model.embed.encode(tokens, image_x.dtype))  # [N,T,D]
    at = jnp.full((tokens.shape[0], 1), t - 1, jnp.int32)  # [N,1]
    logits = model.language_model(tokens, embeddings=x, logits_at=at)  # [N,1,V]
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


def greedy_captions(
    graphdef: nnx.GraphDef,
    state: tuple[nnx.State, ...],
    prefix: np.ndarray,
    pixel_values: np.ndarray,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> np.ndarray:
    """Greedy continuations ``int32 [N, max_new_tokens]`` (``pad_id`` after each EOS) of ``prefix
    [P0]`` (BOS, placeholders, prompt: ``CaptionFormat.prefix``) for each image of ``pixel_values
    [N,C,H,W]``.

    No KV cache: each step reruns the decoder over the ``[N, P0 + max_new_tokens]`` buffer (causal,
    so the padding ahead of the written tokens changes nothing) and reads the logits at the last
    written position; the tower and projector run once.
    That is quadratic in the caption, and exactly the model's own forward pass; serving images with a
    cache is the ``Engine``'s job.
    """
    check_int("", "max_new_tokens", max_new_tokens)
    prefix = np.asarray(prefix, np.int32)
    N, P0 = pixel_values.shape[0], len(prefix)
    T = P0 + max_new_tokens
    tokens = np.full((N, T), pad_id, np.int32)
    tokens[:, :P0] = prefix
    check_inputs(nnx.merge(graphdef, *state).cfg, tokens, pixel_values)
    state = tuple(state)
    image_x = _embed(graphdef, state, jnp.asarray(tokens), jnp.asarray(pixel_values))  # [N,T,D]
    done = np.zeros(N, bool)
    for t in range(P0, T):
        nxt = np.asarray(_next_token(graphdef, state, jnp.asarray(tokens), image_x, jnp.int32(t)))
        tokens[:, t] = np.where(done, pad_id, nxt)
        done |= nxt == eos_id
        if done.all():
            break
    return tokens[:, P0:]
