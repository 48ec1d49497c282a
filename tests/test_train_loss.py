"""The training loss through the fused cross entropy equals the plain loss over the whole logits.

``loss_fn`` with ``loss_chunk`` (the default) against ``loss_chunk=None``: the cross entropy, the
z-loss term and the gradients of every parameter, with a mask, packed segments and z-loss on,
for tied embeddings and an LM head, through the XLA path (several chunks, the last one ragged; one
chunk) and the Pallas kernels (interpreted). And the compiled train step holds no ``[B,T,V]``
float32 buffer, which the plain one does. Tolerances: 1e-5 of the largest magnitude (float32).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmarch import presets
from llmarch.model import Transformer
from llmarch.train.config import TrainConfig
from llmarch.train.step import loss_fn, make_train_step


def _setup(tie, impl="auto", vocab=None, batch=3, seq=16):
    cfg = presets.get("tiny-dense").replace(tie_embeddings=tie, impl=impl)
    if vocab is not None:
        cfg = cfg.replace(vocab_size=vocab)
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    k = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(k[0], (batch, seq + 1), 0, cfg.vocab_size)
    data = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": (jax.random.uniform(k[1], (batch, seq)) > 0.3).astype(jnp.int32),
        "segment_ids": jnp.repeat(jnp.arange(2), seq // 2)[None].repeat(batch, 0),
    }
    return graphdef, params, rest, data


def assert_close(actual, expected, what=""):
    expected = np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=0, atol=1e-5 * scale, err_msg=what
    )


def _loss_and_grads(graphdef, params, rest, data, loss_chunk):
    grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    return jax.jit(lambda p: grad(graphdef, p, rest, data, 0.01, loss_chunk=loss_chunk))(params)


@functools.cache
def _plain(tie):
    """The plain loss's value and gradients with the XLA ops: the target of every case (the
    Pallas case runs flash attention too, interpreted, within the same tolerance)."""
    return _loss_and_grads(*_setup(tie), None)


@pytest.mark.parametrize("impl,loss_chunk", [("xla", 48), ("xla", 8192), ("pallas", 8192)])
@pytest.mark.parametrize("tie", [False, True])
def test_fused_loss_equals_plain_loss(tie, impl, loss_chunk):
    graphdef, params, rest, data = _setup(tie, impl)
    (total, parts), grads = _loss_and_grads(graphdef, params, rest, data, loss_chunk)
    (want_total, want_parts), want_grads = _plain(tie)
    assert_close(total, want_total, "total")
    for name in ("loss", "z_loss"):
        assert_close(parts[name], want_parts[name], name)
    for (path, g), want in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True
    ):
        assert_close(g, want, jax.tree_util.keystr(path))


def test_plain_loss_is_the_masked_mean_of_token_cross_entropies():
    """``loss_chunk=None`` computes what the step always did (optax over float32 logits), so the
    comparison above has a fixed point."""
    graphdef, params, rest, data = _setup(False)
    logits = nnx.merge(graphdef, params, rest)(data["inputs"], segment_ids=data["segment_ids"])
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, data["targets"])
    mask = data["mask"].astype(jnp.float32)
    _, parts = loss_fn(graphdef, params, rest, data, loss_chunk=None)
    assert_close(parts["loss"], (per_token * mask).sum() / mask.sum())


def _shapes(hlo_text):
    """The float32 array shapes in compiled HLO text, e.g. ``{"f32[2,64,8192]", ...}``."""
    return set(re.findall(r"f32\[[\d,]+\]", hlo_text))


def test_train_step_never_holds_the_logits():
    """The compiled step of a model whose logits dwarf everything else: no float32 ``[B,T,V]``
    (or ``[B·T,V]``) buffer with the fused loss, and a much smaller peak than the plain loss."""
    B, T, V = 2, 64, 8192
    graphdef, params, rest, data = _setup(True, "xla", vocab=V, batch=B, seq=T)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    logits_shapes = {f"f32[{B},{T},{V}]", f"f32[{B * T},{V}]"}
    temps = {}
    for chunk in (1024, None):
        step = make_train_step(graphdef, tx, loss_chunk=chunk)
        compiled = step.lower(params, rest, opt_state, data).compile()
        held = logits_shapes & _shapes(compiled.as_text())
        assert bool(held) == (chunk is None), (chunk, held)
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[1024] < temps[None] / 2, temps


def test_loss_chunk_is_validated():
    graphdef, _, _, _ = _setup(False)
    for bad in (0, -8, 2.5, True, "8192"):
        with pytest.raises(ValueError, match=rf"^loss_chunk={bad!r} is invalid: must be a positive int"):
            make_train_step(graphdef, optax.sgd(0.1), loss_chunk=bad)
        with pytest.raises(ValueError, match=rf"TrainConfig.loss_chunk={bad!r} is invalid"):
            TrainConfig(out_dir="x", loss_chunk=bad)
    assert TrainConfig(out_dir="x", loss_chunk=None).loss_chunk is None
    assert TrainConfig(out_dir="x").loss_chunk == 8192
