"""Sampling: parameter checks, temperature/top-k/top-p against a sorted numpy reference, the
distribution actually drawn, and per-row seeds that do not depend on the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmarch.inference import sampling
from llmarch.inference.sampling import SamplingParams


def _reference(logits, temperature, top_k, top_p):
    """Sort, cut at the k-th value, then keep tokens whose more-likely mass is below top_p."""
    out = np.empty_like(logits)
    for r, row in enumerate(logits):
        x = row / (temperature[r] if temperature[r] > 0 else 1.0)
        desc = -np.sort(-x)
        k = top_k[r] if top_k[r] > 0 else len(x)
        x = np.where(x < desc[k - 1], -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        kept = x[order][before < top_p[r]]
        out[r] = np.where(x < kept.min(), -np.inf, x)
    return out


def test_processed_logits_match_the_sorted_reference():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(7, 40)) * 3).astype(np.float32)
    logits[0, :6] = logits[0].max()  # ties at the cut keep every tied token
    temperature = np.array([1, 0.5, 2, 1, 0.7, 1, 0], np.float32)
    top_k = np.array([3, 0, 10, 1, 40, 0, 0], np.int32)
    top_p = np.array([1, 0.9, 0.5, 1, 0.3, 0.05, 1], np.float32)
    got = np.asarray(sampling.processed_logits(*map(jnp.asarray, (logits, temperature, top_k, top_p))))
    want = _reference(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    assert np.isfinite(got[0]).sum() == 7  # top_k=3 over seven tied maxima (six set + the original)


def test_drawn_distribution_follows_temperature_top_k_top_p():
    V, draws = 6, 20_000
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    keys = jax.random.split(jax.random.key(0), draws)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.7)):
        args = (jnp.full(draws, temperature), jnp.full(draws, top_k), jnp.full(draws, top_p))
        tokens = jax.jit(sampling.sample)(jnp.repeat(logits, draws, 0), keys, *args)["tokens"]
        freq = np.bincount(np.asarray(tokens), minlength=V) / draws
        want = np.asarray(jax.nn.softmax(sampling.processed_logits(logits, *(a[:1] for a in args))))[0]
        assert np.abs(freq - want).max() < 0.015, (temperature, top_k, top_p, freq, want)


def test_greedy_rows_take_the_argmax_and_logprobs_are_the_models():
    logits = jax.random.normal(jax.random.key(1), (3, 11))
    keys = jax.random.split(jax.random.key(2), 3)
    out = sampling.sample(logits, keys, jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3), num_logprobs=2)
    np.testing.assert_array_equal(out["tokens"], jnp.argmax(logits, -1))
    logp = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(out["logprobs"], jnp.max(logp, -1), rtol=1e-6)
    np.testing.assert_allclose(out["top_logprobs"][:, 0], jnp.max(logp, -1), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_tokens_are_argmax(dtype):
    """The two-reduction argmax picks jnp.argmax's index everywhere: ties (the first), NaN (the
    first NaN wins), signed zeros, all -inf, and random rows of a vocabulary's width."""
    special = jnp.array(
        [
            [1.0, 3.0, jnp.nan, 3.0, jnp.nan],
            [-0.0, 0.0, -1.0, 0.0, -0.0],
            [-jnp.inf] * 5,
            [1.0, jnp.inf, 2.0, jnp.inf, 0.0],
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [-5.0, -4.0, -jnp.nan, -4.0, -3.0],
        ],
        dtype,
    )
    rows = jnp.round(jax.random.normal(jax.random.key(0), (3, 4, 32000)) * 8).astype(dtype)  # ties
    for x in (special, rows):
        got = jax.jit(sampling.greedy_tokens)(x)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))


def test_row_seeds_are_reproducible_and_independent_of_other_rows():
    params = [SamplingParams(temperature=1.0, seed=s) for s in (3, 2**40 + 3, 3)]
    logits = jax.random.normal(jax.random.key(3), (3, 1000))

    def draw(params, seeds, samples, counters, logits):
        rows = sampling.host_rows(params, seeds, samples, counters)
        return np.asarray(jax.jit(sampling.sample_rows)(logits, rows)["tokens"])

    a = draw(params, [3, 2**40 + 3, 3], [0, 0, 1], [5, 5, 5], logits)
    assert a[0] != a[1] != a[2]  # 63-bit seeds use both halves; completions draw differently
    b = draw(params[:1], [3], [0], [5], logits[:1])  # the same row alone
    assert b[0] == a[0]
    c = draw(params[:1], [3], [0], [6], logits[:1])  # the next token of that request
    assert c[0] != a[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(max_tokens=-3), "max_tokens=-3"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(seed=-1), "seed=-1"),
        (dict(stop_token_ids=("a",)), "stop_token_ids"),
        (dict(logprobs=-1), "logprobs=-1"),
        (dict(n=0), "n=0"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_checks_against_the_model():
    params = SamplingParams(stop_token_ids=[5, 400], top_k=10)
    assert params.stop_token_ids == (5, 400)
    with pytest.raises(ValueError, match=r"unknown tokens \[400\].*vocab_size=320"):
        params.check(vocab_size=320, max_logprobs=5)
    with pytest.raises(ValueError, match="top_k=500"):
        SamplingParams(top_k=500).check(320, 5)
    with pytest.raises(ValueError, match="logprobs=6"):
        SamplingParams(logprobs=6).check(320, 5)
