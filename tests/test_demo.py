import pytest

from llmarch import cli, demo
from llmarch.data import ByteTokenizer, default_corpus


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


def test_demo_trains_below_the_unigram_entropy():
    logs = []
    result = demo.run(
        demo.DemoConfig(steps=60, batch_size=8, seq_len=64, sample_tokens=8, eval_batches=2), log=logs.append
    )
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
