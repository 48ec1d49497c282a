import contextlib
import importlib.util
import io
import math
import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import accounting, cli, demo, presets
from llmarch.data import ByteTokenizer, default_corpus
from llmarch.demo_config import COMPARED
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
    assert cli.main(["demo", "--models", "[tiny-dense, tiny-nope]"]) == 2
    assert "DemoConfig.models=['tiny-dense', 'tiny-nope'] is invalid" in capsys.readouterr().err
    assert cli.main(["demo", "--models", "[tiny-mla, tiny-mla]"]) == 2
    assert "must be one or more distinct presets" in capsys.readouterr().err
    assert cli.main(["demo", "--decode-tokens", "1"]) == 2
    assert "DemoConfig.decode_tokens=1 is invalid: must be >= 2" in capsys.readouterr().err
    assert cli.main(["demo", "--decode-tokens", "300"]) == 2
    assert "exceed tiny-dense's max_seq_len=256" in capsys.readouterr().err


def test_presets_cli_lists_real_shapes(capsys):
    assert cli.main(["presets"]) == 0
    assert "8,030,261,248" in capsys.readouterr().out


def test_demo_cli_runs_the_comparison_and_quick_runs_one_model(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "run", lambda cfg: calls.append(("run", cfg)))
    monkeypatch.setattr(demo, "compare", lambda cfg: calls.append(("compare", cfg)) or _comparison("no plot"))
    assert cli.main(["demo", "--quick", "--steps", "5"]) == 0
    assert cli.main(["demo", "--steps", "5", "--models", "[tiny-mla, tiny-dense]"]) == 0
    (kind_q, quick), (kind_c, compared) = calls
    assert (kind_q, quick.quick, quick.steps) == ("run", True, 5)
    assert (kind_c, compared.quick, compared.models) == ("compare", False, ("tiny-mla", "tiny-dense"))
    assert "| model " in capsys.readouterr().out  # the comparison's table on stdout


def _comparison(note=None):
    return demo.Comparison([], "caption", "| model |", pathlib.Path("o/demo.md"), None, note, 0.0)


# The four models' whole path at 2 steps of 2x16 tokens, in one command. The Engine's decode is
# stubbed here (it compiles ~7 s a model) and run for real in the test after this one.
DEMO_ARGS = [
    "--steps",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--eval-batches",
    "1",
    "--decode-tokens",
    "4",
]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(demo, "decode_tokens_per_s", lambda model, prompt, n: (123.0, [65] * n))
        assert cli.main(["demo", *DEMO_ARGS, "--out", str(out)]) == 0
    return out, stdout.getvalue()


def test_demo_compares_four_models_in_one_table(compared):
    out, stdout = compared
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| tiny-")
    ]
    assert [r[0] for r in rows] == list(COMPARED) == ["tiny-dense", "tiny-moe", "tiny-ultramem", "tiny-mla"]
    for name, _, params, active, kv, val_loss, rate in rows:
        cfg = presets.get(name)
        assert params == f"{accounting.param_count(cfg):,}"
        assert active == f"{accounting.active_param_count(cfg):,}"
        assert kv == f"{accounting.kv_cache_bytes_per_token(cfg):,}"
        assert math.isfinite(float(val_loss)) and rate == "123"
    moe, mla = rows[1], rows[3]
    assert moe[2] != moe[3] and mla[4] == "320"  # an MoE activates a part; MLA caches the latent + k_R
    assert "each trained 2 steps of 2x16 byte tokens" in stdout
    assert f"wrote {out / 'demo.md'}" in stdout
    table = "\n".join(line for line in stdout.splitlines() if line.startswith("|"))
    assert table in (out / "demo.md").read_text()
    for name in COMPARED:
        assert (out / name / "metrics.jsonl").is_file()
    if importlib.util.find_spec("matplotlib"):
        assert f"wrote {out / 'demo.png'}" in stdout and (out / "demo.png").stat().st_size > 0
    else:
        assert demo.NO_MATPLOTLIB in stdout
    # The same --out again: one line, before anything is trained.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["demo", *DEMO_ARGS, "--out", str(out)]) == 2
    assert f"already holds a run of tiny-dense ({out / 'tiny-dense'})" in err.getvalue()


def test_demo_decode_rate_is_greedy_through_the_engine():
    model = llmarch.Transformer(presets.get("tiny-mla"), rngs=nnx.Rngs(0))
    prompt = ByteTokenizer().encode("The ").tolist()
    rate, tokens = demo.decode_tokens_per_s(model, prompt, 6, runs=2)
    assert rate > 0 and len(tokens) == 6
    assert tokens == generate(model, np.asarray([prompt]), 6)[0, len(prompt) :].tolist()


def test_demo_without_matplotlib_prints_the_table_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert demo._plot([tmp_path], tmp_path / "demo.png", 10) == demo.NO_MATPLOTLIB
    assert not (tmp_path / "demo.png").exists()
    text = _comparison(demo.NO_MATPLOTLIB).text().splitlines()
    assert text[-2:] == [
        "wrote o/demo.md",
        "plot not written: matplotlib is not installed (pip install 'llmarch[plot]')",
    ]
