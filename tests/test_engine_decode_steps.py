"""Several decode steps per dispatch and per-layer weights: the engine's outputs do not change.

``EngineConfig.decode_steps`` runs up to that many decode-only steps in one program, feeding each
step's sampled tokens to the next on the device; ``unstack_layers`` runs the layers over separate
per-layer arrays instead of a scan. Both must give the tokens (greedy and seeded sampling), log-
probabilities and finish reasons of one step per dispatch over the scanned model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.inference import Engine, EngineConfig, SamplingParams
from llmarch.model import with_unstacked_layers

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_chunk=16, max_len=96, page_size=8)
_MODELS: dict[str, llmarch.Transformer] = {}


def _model(name: str) -> llmarch.Transformer:
    if name not in _MODELS:
        _MODELS[name] = llmarch.Transformer(llmarch.presets.get(name), rngs=nnx.Rngs(0))
    return _MODELS[name]


def _run(model, prompts, params, **kw):
    engine = Engine(model, **ENGINE, **kw)
    return engine.generate(prompts, params), engine.stats


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mla"])
def test_decode_steps_and_unstacked_layers_keep_the_outputs(name):
    model = _model(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (3, 20, 9, 1, 13)]
    probe, _ = _run(model, prompts[:1], SamplingParams(max_tokens=6, temperature=0))
    stop = probe[0].token_ids[3]  # a token greedy decoding emits: request 0 stops early
    params = [
        SamplingParams(max_tokens=17, temperature=0, stop_token_ids=(stop,)),
        SamplingParams(max_tokens=5, temperature=0, logprobs=2),
        SamplingParams(max_tokens=23, temperature=0.8, top_k=20, seed=7),
        SamplingParams(max_tokens=11, temperature=1.0, top_p=0.9, seed=3, n=2),
        SamplingParams(max_tokens=9, temperature=0, logprobs=0),
    ]
    want, one = _run(model, prompts, params, decode_steps=1, unstack_layers=False)
    for kw in (dict(decode_steps=1, unstack_layers=True), dict(decode_steps=8, unstack_layers=True)):
        got, stats = _run(model, prompts, params, **kw)
        for g, w in zip(got, want, strict=True):
            for cg, cw in zip(g.completions, w.completions, strict=True):
                assert cg.token_ids == cw.token_ids, kw
                assert cg.finish_reason == cw.finish_reason
                if cw.logprobs is not None:
                    np.testing.assert_allclose(cg.logprobs, cw.logprobs, rtol=1e-4, atol=1e-5)
                    for a, b in zip(cg.top_logprobs, cw.top_logprobs, strict=True):
                        assert a.keys() == b.keys()
        assert stats["decode_tokens"] == one["decode_tokens"] and stats["steps"] == one["steps"]
        assert stats["free_pages"] == stats["num_pages"] - 1  # pages given ahead all came back
        if kw["decode_steps"] > 1:
            assert stats["dispatches"] < stats["steps"]  # the tail decoded several steps per dispatch
        else:
            assert stats["dispatches"] == stats["steps"]


def test_batch_one_decodes_in_few_dispatches():
    model = _model("tiny-gqa")
    engine = Engine(
        model, max_num_seqs=1, max_len=96, max_num_batched_tokens=32, max_prefill_chunk=16, decode_steps=8
    )
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=33, temperature=0))[0]
    assert len(out.token_ids) == 33
    # one prefill step (its token), then 32 decode tokens in four dispatches of eight
    assert engine.stats["dispatches"] == 1 + 4 and engine.stats["steps"] == 33


def test_unstacked_model_has_the_same_logits():
    model = _model("tiny-moe")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 12)))
    unstacked = with_unstacked_layers(model)
    assert isinstance(unstacked.runs[0].layers, nnx.List) and not isinstance(model.runs[0].layers, nnx.List)
    want, got = model(tokens, return_aux=True), unstacked(tokens, return_aux=True)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(got.aux) == jax.tree.structure(want.aux)
    for g, w in zip(jax.tree.leaves(got.aux), jax.tree.leaves(want.aux), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("decode_steps", 0, r"EngineConfig.decode_steps=0 is invalid"),
        ("unstack_layers", "yes", r"EngineConfig.unstack_layers='yes' is invalid"),
    ],
)
def test_bad_fields_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})
