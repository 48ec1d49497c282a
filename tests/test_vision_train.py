"""llmarch.vision.train: the caption loss (masked to caption tokens, fused = plain), the jitted step
that lowers it, LLaVA's frozen stages (frozen parts bit-identical after a step), greedy captions and
the errors, on a tiny SigLIP + decoder and 16-pixel shapes images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmarch.config import AttentionConfig, ModelConfig
from llmarch.data import ByteTokenizer
from llmarch.data.image_text import CaptionFormat, caption_dataset
from llmarch.data.shapes import ShapesConfig, ShapesDataset
from llmarch.vision import Llava, LlavaConfig, VisionConfig
from llmarch.vision.train import (
    TRAINABLE,
    caption_loss,
    caption_losses,
    check_batch,
    greedy_captions,
    make_eval_loss,
    make_vlm_train_step,
    split_trainable,
)

TOK = ByteTokenizer()
IMAGE_ID = TOK.vocab_size


def _cfg():
    vision = VisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        use_head=False,
    )
    text = ModelConfig(
        vocab_size=264,
        d_model=32,
        num_layers=1,
        ffn_dim=64,
        max_seq_len=128,
        attention=AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=16),
    )
    return LlavaConfig(vision=vision, text=text, image_token_id=IMAGE_ID, vision_feature_layer=-1)


@functools.cache
def _batch(n=8):
    cfg = _cfg()
    fmt = CaptionFormat(image_token_id=IMAGE_ID, image_tokens=cfg.image_tokens, seq_len=112)
    src = ShapesDataset(ShapesConfig(image_size=16, num_examples=n))
    return caption_dataset(src, TOK, fmt, batch_size=n, train=False, model_vocab_size=264)[0]


def _model(seed=0):
    return Llava(_cfg(), rngs=nnx.Rngs(seed))


def _parts(model):
    """``{part: flat list of its parameter arrays}`` for Llava's three parts."""
    state = nnx.state(model, nnx.Param)
    return {
        k: [np.asarray(x) for x in jax.tree.leaves(state[k])]
        for k in ("vision", "projector", "language_model")
    }


def test_caption_loss_counts_caption_tokens_only():
    model, batch = _model(), _batch()
    fused = caption_loss(model, batch, loss_chunk=64)
    plain = caption_loss(model, batch, loss_chunk=None)
    np.testing.assert_allclose(fused, plain, rtol=1e-5)
    nll = np.asarray(caption_losses(model, batch, loss_chunk=None))
    mask = batch["mask"].astype(bool)
    np.testing.assert_allclose(plain, nll[mask].mean(), rtol=1e-5)
    # targets outside the mask (placeholders, prompt, padding) do not enter the loss
    changed = dict(batch, targets=np.where(mask, batch["targets"], 7).astype(np.int32))
    np.testing.assert_allclose(caption_loss(model, changed, loss_chunk=None), plain, rtol=1e-6)


def test_train_step_lowers_caption_loss():
    model, batch = _model(), _batch()
    graphdef, params, frozen = split_trainable(model, "all")
    assert set(params.keys()) == set(TRAINABLE["all"])  # every parameter trains
    assert not jax.tree.leaves(nnx.filter_state(frozen, nnx.Param))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    step = make_vlm_train_step(graphdef, tx)
    losses = []
    for _ in range(12):
        params, opt_state, metrics = step(params, frozen, opt_state, batch)
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"])
    assert int(metrics["tokens"]) == int(batch["mask"].sum())
    assert losses[-1] < 0.6 * losses[0], losses
    eval_loss = make_eval_loss(graphdef)
    total, count = eval_loss(params, frozen, batch)
    assert float(count) == batch["mask"].sum()
    np.testing.assert_allclose(
        float(total / count), caption_loss(nnx.merge(graphdef, params, frozen), batch), rtol=1e-5
    )


@pytest.mark.parametrize("stage", ["projector", "projector+decoder"])
def test_frozen_parts_unchanged(stage):
    model, batch = _model(), _batch()
    before = _parts(model)
    graphdef, params, frozen = split_trainable(model, stage)
    tx = optax.sgd(0.5)
    step = make_vlm_train_step(graphdef, tx)
    params, _, metrics = step(params, frozen, tx.init(params), batch)
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
    after = _parts(nnx.merge(graphdef, params, frozen))
    for part in before:
        same = all(np.array_equal(a, b) for a, b in zip(before[part], after[part], strict=True))
        assert same == (part not in TRAINABLE[stage]), (stage, part)


def test_greedy_captions_follow_argmax():
    model, batch = _model(), _batch(n=8)
    cfg = model.cfg
    fmt = CaptionFormat(image_token_id=IMAGE_ID, image_tokens=cfg.image_tokens, seq_len=112)
    prefix = fmt.prefix(TOK)
    graphdef, state = nnx.split(model)
    images = batch["pixel_values"][:2]
    out = greedy_captions(
        graphdef, (state,), prefix, images, max_new_tokens=3, eos_id=TOK.eos_id, pad_id=TOK.pad_id
    )
    assert out.shape == (2, 3) and out.dtype == np.int32
    tokens = jnp.asarray(np.concatenate([np.tile(prefix, (2, 1)), out[:, :2]], axis=1))
    logits = model(tokens, images=jnp.asarray(images))  # [2, P0 + 2, V]
    np.testing.assert_array_equal(np.argmax(logits[:, len(prefix) - 1 :], -1), out)


def test_errors():
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="stage='decoder'"):
        split_trainable(model, "decoder")
    with pytest.raises(ValueError, match="images=None"):
        check_batch(model, {k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="for 4 images"):
        check_batch(model, dict(batch, pixel_values=batch["pixel_values"][:4]))
    with pytest.raises(ValueError, match="lacks \\['mask'\\]"):
        check_batch(model, {k: v for k, v in batch.items() if k != "mask"})
    graphdef, params, frozen = split_trainable(model, "projector")
    step = make_vlm_train_step(graphdef, optax.sgd(0.1))
    with pytest.raises(ValueError, match="channels"):  # before anything compiles
        step(
            params,
            frozen,
            optax.sgd(0.1).init(params),
            dict(batch, pixel_values=batch["pixel_values"][:, :1]),
        )
    with pytest.raises(ValueError, match="loss_chunk=0"):
        make_vlm_train_step(graphdef, optax.sgd(0.1), loss_chunk=0)
    with pytest.raises(ValueError, match="model="):
        split_trainable(object(), "all")
