import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.config import AttentionConfig
from llmarch.inference import generate


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_then_decode_with_cache_equals_full_forward(window):
    cfg = llmarch.presets.get("tiny-gqa")
    cfg = cfg.replace(attention=AttentionConfig(4, 2, 16, sliding_window=window))
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    full = model(tokens)
    cache = model.init_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out = model(tokens[:, :6], positions=pos[:, :6], cache=cache)  # prefill 6
    logits, cache = out.logits, out.cache
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for t in range(6, 9):  # then one token at a time
        out = model(tokens[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache)
        logits, cache = out.logits, out.cache
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_cache_errors():
    cfg = llmarch.presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="positions are required"):
        model(jnp.zeros((1, 2), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match=r"positions span \[3, 4\].*4 slots"):
        model(jnp.zeros((1, 2), jnp.int32), positions=jnp.array([[3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="more than the cache's 4 slots"):
        model(jnp.zeros((1, 5), jnp.int32), positions=jnp.arange(5)[None], cache=cache)
    with pytest.raises(ValueError, match="max_len=300 exceeds max_seq_len=256"):
        model.init_cache(1, 300)
    with pytest.raises(ValueError, match="batch_size=0"):
        model.init_cache(0, 4)


def test_greedy_generate_follows_the_argmax_of_full_forward():
    cfg = llmarch.presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    out = generate(model, prompt, 5)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[:, :3], prompt)
    # Each new token is the argmax of the logits before it (causality lets one forward show all).
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(model(jnp.asarray(out))[:, 2:-1], -1))
    np.testing.assert_array_equal(generate(model, prompt, 5, use_cache=False), out)
    again = generate(model, prompt, 5, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(again, generate(model, prompt, 5, temperature=1.0, top_k=5, seed=3))
    # Nucleus sampling (sampling.sample_logits): a tiny top_p keeps only the most likely token.
    np.testing.assert_array_equal(generate(model, prompt, 5, temperature=1.0, top_p=1e-6, seed=3), out)


@pytest.mark.parametrize(
    "prompt, n, kwargs, match",
    [
        (np.zeros((1, 0)), 3, {}, "expected \\[batch, length >= 1\\]"),
        (np.zeros((1, 3)), 0, {}, "max_new_tokens=0"),
        (np.zeros((1, 250)), 10, {}, "exceeds max_seq_len=256"),
        (np.zeros((1, 3)), 3, {"top_k": 0}, "top_k=0"),
        (np.zeros((1, 3)), 3, {"top_p": 0.0}, "top_p=0.0"),
        (np.full((1, 3), 999), 3, {}, "token ids span"),
    ],
)
def test_generate_rejects_bad_requests(prompt, n, kwargs, match):
    model = llmarch.Transformer(llmarch.presets.get("tiny-dense"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, n, **kwargs)


def test_repeated_generate_calls_reuse_the_compiled_steps():
    gen_module = importlib.import_module("llmarch.inference.generate")  # the package exports the function

    model = llmarch.Transformer(llmarch.presets.get("tiny-dense"), rngs=nnx.Rngs(0))
    prompt = np.ones((2, 5), np.int32)
    first = generate(model, prompt, 4)
    sizes = gen_module._prefill._cache_size(), gen_module._decode._cache_size()
    np.testing.assert_array_equal(generate(model, prompt, 4), first)
    assert (gen_module._prefill._cache_size(), gen_module._decode._cache_size()) == sizes


def test_for_decoding_unstacks_once_per_set_of_weights_and_keeps_the_function():
    """``for_decoding`` (what generate and SpeculativeDecoder run on CPU): the unstacked copy, whose
    cache is a list of per-layer caches updated in place, gives the stacked model's logits; it is
    reused while the model's arrays are the same and made anew after an update."""
    from llmarch.inference.unstacked import for_decoding

    cfg = llmarch.presets.get("tiny-gqa")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    copy = for_decoding(model)
    assert copy is not model and for_decoding(model) is copy and for_decoding(copy) is copy
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    caches = {"stacked": model.init_cache(2, 8), "unstacked": copy.init_cache(2, 8)}
    run = caches["unstacked"][0]
    assert isinstance(run, list) and len(run) == cfg.num_layers  # one cache per layer
    logits = {}
    for name, m in (("stacked", model), ("unstacked", copy)):
        out = m(tokens[:, :6], positions=pos[:, :6], cache=caches[name])
        out = m(tokens[:, 6:], positions=pos[:, 6:], cache=out.cache)
        logits[name] = out.logits
    np.testing.assert_allclose(logits["unstacked"], logits["stacked"], atol=1e-5)
    np.testing.assert_allclose(logits["stacked"][:, 0], model(tokens)[:, 6], atol=1e-5)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.update(model, jax.tree.map(lambda p: p * 2, params))  # a training step replaces the arrays
    assert for_decoding(model) is not copy
