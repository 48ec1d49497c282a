import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import cli, demo
from llmarch.data import ByteTokenizer, default_corpus
from llmarch.inference import generate


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS and tok.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size=259"):
        tok.decode([1, 300])


def test_default_corpus_is_embedded_and_sizeable():
    text = default_corpus()
    assert len(text) > 100_000 and "class" in text


def test_greedy_generate_follows_the_argmax_of_full_forward():
    cfg = llmarch.presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    out = generate(model, prompt, 5)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[:, :3], prompt)
    # Each new token is the argmax of the logits before it (causality lets one forward show all).
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(model(jnp.asarray(out))[:, 2:-1], -1))
    again = generate(model, prompt, 5, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(again, generate(model, prompt, 5, temperature=1.0, top_k=5, seed=3))


@pytest.mark.parametrize(
    "prompt, n, kwargs, match",
    [
        (np.zeros((1, 0)), 3, {}, "expected \\[batch, length >= 1\\]"),
        (np.zeros((1, 3)), 0, {}, "max_new_tokens=0"),
        (np.zeros((1, 250)), 10, {}, "exceeds max_seq_len=256"),
        (np.zeros((1, 3)), 3, {"top_k": 0}, "top_k=0"),
        (np.full((1, 3), 999), 3, {}, "token ids span"),
    ],
)
def test_generate_rejects_bad_requests(prompt, n, kwargs, match):
    model = llmarch.Transformer(llmarch.presets.get("tiny-dense"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, n, **kwargs)


def test_demo_trains_below_the_unigram_entropy():
    logs = []
    result = demo.run(demo.DemoConfig(steps=60, batch_size=8, seq_len=64, sample_tokens=8,
                                      eval_batches=2), log=logs.append)
    assert result["val_loss"] < result["unigram_entropy"]
    assert any(line.startswith("sample: ") for line in logs)


def test_demo_cli_reports_bad_options(capsys):
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "DemoConfig.steps=0" in capsys.readouterr().err
    assert cli.main(["demo", "--seq-len", "4096"]) == 2
    assert "max_seq_len=256" in capsys.readouterr().err


def test_presets_cli_lists_real_shapes(capsys):
    assert cli.main(["presets"]) == 0
    assert "8,030,261,248" in capsys.readouterr().out
