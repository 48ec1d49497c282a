import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import accounting


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-gqa", "llama3-8b"])
def test_param_count_matches_built_model(name):
    cfg = llmarch.presets.get(name)
    model = nnx.eval_shape(lambda: llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    built = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert built == accounting.param_count(cfg)


def test_tied_embeddings_drop_the_head():
    cfg = llmarch.presets.get("tiny-dense")
    tied = cfg.replace(tie_embeddings=True)
    diff = accounting.param_count(cfg) - accounting.param_count(tied)
    assert diff == cfg.vocab_size * cfg.d_model


def test_train_flops_formula():
    cfg = llmarch.presets.get("llama3-8b")
    c = accounting.param_counts(cfg)
    T = 8192
    expected = 6 * (c.attention + c.ffn + cfg.d_model * cfg.vocab_size) + 12 * 32 * 32 * 128 * T
    assert accounting.train_flops_per_token(cfg, T) == expected
    # The 6N rule of thumb: within a few percent of 6 x 8.03B plus attention at 8K context.
    assert 6 * 8.03e9 < accounting.train_flops_per_token(cfg, T) < 6 * 8.03e9 + 12 * 32 * 4096 * T
    assert accounting.attention_flops_per_token(cfg, T, causal=True) == 12 * 32 * 32 * 128 * (T + 1) / 2


def test_sliding_window_caps_attention_flops():
    cfg = llmarch.presets.get("tiny-gqa")
    windowed = cfg.replace(attention=cfg.attention.__class__(4, 2, 16, sliding_window=8))
    assert accounting.attention_flops_per_token(windowed, 256) == 12 * 2 * 4 * 16 * 8


def test_mfu():
    assert accounting.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="peak_flops"):
        accounting.mfu(1.0, 1.0, 0.0)
