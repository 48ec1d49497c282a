"""Speculative decoding: a target drafting for itself accepts everything; greedy output is the
target's; sampled output follows the target's distribution, not the draft's (a seeded
chi-square test on a 16-token vocabulary)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.inference import SamplingParams
from llmarch.inference.speculative import SpeculativeDecoder

V = 16


def _tiny(seed: int, layers: int = 1) -> llmarch.Transformer:
    """A small-vocabulary model with spread-out logits (init_std 0.5), so that target and draft
    distributions differ clearly."""
    cfg = llmarch.ModelConfig(
        vocab_size=V,
        d_model=32,
        num_layers=layers,
        ffn_dim=64,
        max_seq_len=64,
        attention=llmarch.AttentionConfig(2, 2, 16),
        init_std=0.5,
        name=f"spec{seed}",
    )
    return llmarch.Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def target():
    return _tiny(0, layers=2)


@pytest.fixture(scope="module")
def draft(target):
    """The target with noise on every weight: a draft that is right about half the time."""
    graphdef, state = nnx.split(_tiny(0, layers=1))
    keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(state))))
    target_state = nnx.state(target)
    layer = jax.tree.map(lambda x: x[:1], target_state["runs"])  # the target's first layer
    state = jax.tree.map(lambda x: x, target_state)
    state["runs"] = layer
    noisy = jax.tree.map(lambda x: x + 0.15 * jax.random.normal(next(keys), x.shape), state)
    return nnx.merge(graphdef, noisy)


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells expecting >= 5, the rest pooled into one cell."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])), int(keep.sum() - 1)


def _greedy_reference(model, prompts, n):
    """Greedy by full recomputation in one fixed [B, 32] buffer (one compile)."""
    buf = np.zeros((len(prompts), 32), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    forward = jax.jit(lambda b: jnp.argmax(model(b), axis=-1))
    for t in range(n):
        nxt = np.asarray(forward(jnp.asarray(buf)))
        for i, p in enumerate(prompts):
            buf[i, len(p) + t] = nxt[i, len(p) + t - 1]
    return [buf[i, len(p) : len(p) + n].tolist() for i, p in enumerate(prompts)]


def test_target_drafting_for_itself_accepts_every_token(target):
    spec = SpeculativeDecoder(target, target, gamma=4)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8]]
    outs = spec.generate(prompts, SamplingParams(max_tokens=9, temperature=1.0, seed=0))
    assert all(len(o.token_ids) == 9 for o in outs)
    assert spec.acceptance_rate == 1.0 and spec.stats["proposed"] > 0


def test_greedy_speculative_decoding_is_the_targets_greedy_decoding(target, draft):
    spec = SpeculativeDecoder(target, draft, gamma=3)
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6]]
    outs = spec.generate(prompts, SamplingParams(max_tokens=9, temperature=0.0))
    assert [o.token_ids for o in outs] == _greedy_reference(target, prompts, 9)
    assert 0 < spec.acceptance_rate < 1  # a different draft is sometimes wrong
    stop = outs[0].token_ids[4]
    params = [SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=(stop,))] + [
        SamplingParams(max_tokens=9, temperature=0.0)
    ] * 2
    cut = spec.generate(prompts, params)
    assert cut[0].token_ids == outs[0].token_ids[: outs[0].token_ids.index(stop) + 1]
    assert cut[0].finish_reason == "stop" and cut[1].token_ids == outs[1].token_ids
    with pytest.raises(ValueError, match="n=1"):
        spec.generate([[1]], SamplingParams(n=2))
    with pytest.raises(ValueError, match="non-empty"):
        spec.generate([[]], SamplingParams())


def test_sampled_tokens_follow_the_target_distribution(target, draft):
    """3000 seeded samples of two tokens with a draft whose distribution is far from the
    target's: the first token and the pair match the target (chi-square, p > 0.001) and are
    far from the draft."""
    prompt, n = [7, 3, 11], 3000
    spec = SpeculativeDecoder(target, draft, gamma=3)
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=i) for i in range(n)]
    outs = spec.generate([prompt] * n, params)
    pairs = np.array([o.token_ids for o in outs])  # [n,2]
    first = jax.nn.softmax(target(jnp.asarray([prompt]))[0, -1])
    q_first = jax.nn.softmax(draft(jnp.asarray([prompt]))[0, -1])
    assert 0.5 * float(jnp.abs(first - q_first).sum()) > 0.25  # the draft is a poor guess
    counts = np.bincount(pairs[:, 0], minlength=V)
    stat, dof = _chi2(counts, np.asarray(first))
    assert stat < _chi2_critical(dof), (stat, dof)
    assert _chi2(counts, np.asarray(q_first))[0] > 10 * _chi2_critical(dof)
    # The pair: p(t1) p(t2 | t1), every continuation scored in one batch.
    seqs = jnp.asarray([prompt + [t] for t in range(V)])
    second = jax.nn.softmax(target(seqs)[:, -1], axis=-1)  # [V,V]
    joint = (np.asarray(first)[:, None] * np.asarray(second)).ravel()
    stat, dof = _chi2(np.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V), joint)
    assert stat < _chi2_critical(dof), (stat, dof)
    assert 0.1 < spec.acceptance_rate < 0.9


def test_greedy_rows_beside_a_sampled_row_and_gamma_one_stay_the_targets_greedy(target, draft):
    """A sampled row sends the whole round through the rejection rule (no all-greedy shortcut):
    the greedy rows beside it must still be the target's greedy decoding; gamma=1 has no draft
    steps after the first."""
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6]]
    reference = _greedy_reference(target, prompts, 9)
    for gamma in (1, 3):
        spec = SpeculativeDecoder(target, draft, gamma=gamma)
        params = [SamplingParams(max_tokens=9, temperature=0.0)] * 2 + [
            SamplingParams(max_tokens=9, temperature=1.0, seed=3)
        ]
        outs = spec.generate(prompts, params)
        assert [o.token_ids for o in outs[:2]] == reference[:2]
        assert len(outs[2].token_ids) == 9 and outs[2].finish_reason == "length"
        assert spec.stats["proposed"] == sum(o.proposed for o in outs) > 0
