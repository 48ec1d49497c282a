import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.model import segment_positions


@pytest.fixture(scope="module")
def gqa():
    cfg = llmarch.presets.get("tiny-gqa")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(
        lambda state, tokens, segment_ids=None: nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)
    )
    return cfg, model, state, forward


def _tokens(cfg, B, T, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def test_logits_shape_dtype_and_jit_equals_eager(gqa):
    cfg, model, state, forward = gqa
    tokens = _tokens(cfg, 2, 12)
    eager = model(tokens)
    assert eager.shape == (2, 12, cfg.vocab_size) and eager.dtype == jnp.float32
    np.testing.assert_allclose(forward(state, tokens), eager, atol=1e-5)


def test_causal_logits_ignore_the_future(gqa):
    cfg, _, state, forward = gqa
    tokens = _tokens(cfg, 2, 16)
    t = 7
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % cfg.vocab_size)
    a, b = forward(state, tokens), forward(state, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3  # and the future does change


def test_packed_segments_do_not_see_each_other(gqa):
    cfg, _, state, forward = gqa
    doc_a, doc_b = _tokens(cfg, 1, 5, seed=1), _tokens(cfg, 1, 3, seed=2)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
    out = forward(state, packed, segments)
    np.testing.assert_allclose(out[:, :5], forward(state, doc_a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], forward(state, doc_b), atol=1e-5)
    # Without segment ids the second document does see the first.
    assert np.abs(forward(state, packed)[:, 5:] - out[:, 5:]).max() > 1e-3


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 2, 2, 2, 3], [4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(segment_positions(seg, seg.shape), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(gqa, policy):
    cfg, _, state, _ = gqa
    tokens = _tokens(cfg, 2, 8)

    def loss_and_grad(cfg):
        graphdef = nnx.graphdef(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
        loss = lambda s: nnx.merge(graphdef, s)(tokens).std()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(state)

    (l0, g0), (l1, g1) = loss_and_grad(cfg), loss_and_grad(cfg.replace(remat=policy))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_layers_are_stacked_and_initialized_independently(gqa):
    _, model, _, _ = gqa
    w = model.runs[0].layers.attention.w_q_dnh.w[...]
    assert w.shape[0] == 2 and not np.allclose(w[0], w[1])
    assert model.runs[0].layers.attention.w_q_dnh.w.get_metadata()["out_sharding"][0] == "layers"


def test_same_seed_same_model():
    cfg = llmarch.presets.get("tiny-dense")
    a = nnx.state(llmarch.Transformer(cfg, rngs=nnx.Rngs(3)))
    b = nnx.state(llmarch.Transformer(cfg, rngs=nnx.Rngs(3)))
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        (np.array([[1, 2, 320]]), ValueError, r"token ids span \[1, 320\].*vocab_size=320"),
        (np.array([[-1, 2]]), ValueError, r"token ids span \[-1, 2\]"),
        (np.array([1, 2, 3]), ValueError, "rank 2"),
        (np.zeros((1, 2, 3), np.int32), ValueError, "rank 2"),
        (np.zeros((1, 3), np.float32), TypeError, "integer dtype"),
        (np.zeros((1, 257), np.int32), ValueError, "sequence length 257.*max_seq_len=256"),
    ],
)
def test_bad_inputs_raise(gqa, tokens, error, match):
    _, model, _, _ = gqa
    with pytest.raises(error, match=match):
        model(jnp.asarray(tokens))


def test_bad_segment_shape(gqa):
    _, model, _, _ = gqa
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.zeros((1, 3), jnp.int32))


def test_too_long_sequence_is_caught_under_jit(gqa):
    cfg, _, state, forward = gqa
    with pytest.raises(ValueError, match="max_seq_len"):
        forward(state, jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))


def test_skip_layer_module_reads_block_i_and_adds_after_block_j():
    from llmarch.model import run_layout

    cfg = llmarch.presets.get("tiny-dense").replace(num_layers=4, skip_layers=((1, 2),), skip_kind="swiglu")
    assert [(start, count) for _, start, count in run_layout(cfg)] == [(0, 1), (1, 2), (3, 1)]
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg, 2, 8)
    # By hand: run blocks 0..3 one at a time, the skip module on the stream entering block 1,
    # its output added to the stream leaving block 2.
    x = model.embed.encode(tokens, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    layers = [(run, j) for run in model.runs for j in range(run.count)]
    for layer, (run, j) in enumerate(layers):
        if layer == 1:
            skip_out = model.skips[0](x)
        block = nnx.merge(nnx.graphdef(run.layers), jax.tree.map(lambda v, j=j: v[j], nnx.state(run.layers)))
        x, _ = block(x, pos, None)
        if layer == 2:
            x = x + skip_out
    expected = (
        model.embed.attend(model.final_norm(x))
        if model.lm_head is None
        else model.lm_head("BTD,DV->BTV", model.final_norm(x))
    )
    np.testing.assert_allclose(model(tokens), expected, atol=1e-5)
    assert jax.tree.leaves(nnx.state(model.skips))  # the skip module has parameters


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"skip_layers": ((0, 5),), "skip_kind": "swiglu"}, r"needs 0 <= i <= j < num_layers=2"),
        ({"skip_layers": ((1, 0),), "skip_kind": "swiglu"}, r"needs 0 <= i <= j"),
        ({"num_layers": 4, "skip_layers": ((0, 2), (1, 3)), "skip_kind": "swiglu"}, "overlap"),
        ({"skip_layers": ((0, 1),)}, "skip_kind=None"),
        ({"skip_kind": "swiglu"}, "must be None without skip_layers"),
    ],
)
def test_bad_skip_layers(changes, match):
    with pytest.raises(ValueError, match=match):
        llmarch.presets.get("tiny-dense").replace(**changes)


def test_dense_model_has_no_aux_loss(gqa):
    from llmarch.model import aux_loss

    cfg, model, _, _ = gqa
    out = model(_tokens(cfg, 1, 4), return_aux=True)
    assert out.logits.shape == (1, 4, cfg.vocab_size) and float(aux_loss(out.aux)) == 0.0


def test_output_parts_follow_the_request(gqa):
    """Plain logits unless a cache or aux is asked for; then a ModelOutput with exactly those."""
    from llmarch.model import ModelOutput

    cfg, model, _, _ = gqa
    tokens = _tokens(cfg, 2, 4)
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    assert isinstance(model(tokens), jax.Array)
    out = model(tokens, positions=pos, cache=model.init_cache(2, 8))
    assert isinstance(out, ModelOutput) and out.aux is None and len(out.cache) == len(model.runs)
    both = model(tokens, positions=pos, cache=model.init_cache(2, 8), return_aux=True)
    assert both.cache is not None and both.aux is not None
    np.testing.assert_allclose(both.logits, out.logits, atol=1e-6)


def test_aux_is_keyed_by_module_path_in_layer_order_through_jit():
    """Each aux key is the path of the module that produced the entry (as in ``nnx.state``), in
    layer order (a skip before the run it reads), and jit keeps that order; ``update_state``
    looks modules up by key."""
    from llmarch.model import ModelOutput

    cfg = llmarch.presets.get("tiny-dense").replace(num_layers=4, skip_layers=((1, 2),), skip_kind="swiglu")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg, 2, 8)
    out = model(tokens, return_aux=True)
    want = ["runs/0/layers/ffn", "skips/0", "runs/1/layers/ffn", "runs/2/layers/ffn"]
    assert list(out.aux) == list(model.aux_sources()) == want
    for key, module in model.aux_sources().items():
        node = model
        for part in key.split("/"):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        assert node is module
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, return_aux=True))(state, tokens)
    assert isinstance(jitted, ModelOutput) and list(jitted.aux) == want  # a dict's would come back sorted
    np.testing.assert_allclose(jitted.logits, out.logits, atol=1e-5)
    with pytest.raises(KeyError, match="runs/9/layers/ffn"):
        model.update_state({"runs/9/layers/ffn": {"load": jnp.ones(1)}})


def test_cache_protocols():
    """Contiguous caches are not pooled (BlockRun scans them per layer); MLA's can be read whole."""
    from llmarch.layers.attention import KVCache
    from llmarch.layers.cache import Pooled, ReadableLatentCache
    from llmarch.layers.mla import MLACache

    kv = jnp.zeros((1, 4, 1, 2))
    assert not isinstance(KVCache(kv, kv), Pooled)
    latent = MLACache(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 2)))
    assert isinstance(latent, ReadableLatentCache) and not isinstance(latent, Pooled)
