"""`llmarch eval` on any checkpoint (an llmarch run, a Hugging Face directory, a Hub id) and any
corpus: loss in nats/token, perplexity and bits per byte counted exactly; and the
lm-evaluation-harness adapter (``llmarch.eval_harness``) scoring as llmarch's own loss does."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import evaluation, presets, sources
from llmarch.cli import main
from llmarch.data import ByteTokenizer, PackedRows
from llmarch.export.hf import export_hf
from llmarch.inference import SamplingParams
from llmarch.train.step import token_losses
from llmarch.train.trainer import load_rows

# Non-ASCII text, so that tokens (bytes) and characters differ; a JSONL file of documents.
DOCS = [
    "Le café déborde — naïve façades, ½ of them. " * 3,
    "Plain ASCII text about transformers and their attention heads. " * 3,
    "Emoji 🙂 and CJK 漢字 end here.",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An llmarch run (random tiny-dense weights, byte tokenizer), its Hugging Face export, and a
    corpus file."""
    root = tmp_path_factory.mktemp("eval")
    cfg = presets.get("tiny-dense").replace(vocab_size=ByteTokenizer.vocab_size)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    src = sources.Source(root, cfg, "byte", None)
    sources.write_run(model, root / "run", src=src, how={"test": "random weights"})
    export_hf(root / "run", root / "hf")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return root / "run", root / "hf", corpus


def _eval(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _expected_counts(seq_len: int, rows: int) -> tuple[int, int]:
    """(scored tokens, their bytes) by hand: byte tokens, each document ending with EOS; the
    targets are stream positions 1..rows·T whose document is their predecessor's."""
    stream = [(b, d) for d, text in enumerate(DOCS) for b in [*text.encode(), ByteTokenizer.EOS]]
    end = min(rows * seq_len, len(stream) - 1)
    scored = [stream[p][0] for p in range(1, end + 1) if stream[p][1] == stream[p - 1][1]]
    return len(scored), sum(t < 256 for t in scored)  # EOS decodes to no text


def test_eval_counts_bytes_exactly_and_agrees_across_checkpoint_kinds(run, capsys, monkeypatch):
    run_dir, hf_dir, corpus = run
    flags = ["--data", str(corpus), "--seq-len", "64", "--batch-size", "2", "--batches", "2"]
    ours = _eval(capsys, "--checkpoint", str(run_dir), *flags)
    tokens, size = _expected_counts(64, 4)
    assert (ours["tokens"], ours["bytes"]) == (tokens, size) and ours["step"] == 0
    assert ours["perplexity"] == pytest.approx(math.exp(ours["loss"]))
    assert ours["bits_per_byte"] == pytest.approx(ours["loss"] * tokens / (math.log(2) * size))
    # The same weights as a Hugging Face directory (a tokenizer.json: the byte-level BPE path),
    # and through a Hub id resolved by huggingface_hub (faked: no network here).
    theirs = _eval(capsys, "--checkpoint", str(hf_dir), *flags)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(hf_dir))
    hub = _eval(capsys, "--checkpoint", "llmarch-test/tiny", *flags)
    assert hub["checkpoint"] == "llmarch-test/tiny" and "step" not in hub
    for other in (theirs, hub):
        assert (other["tokens"], other["bytes"]) == (tokens, size)
        assert other["loss"] == pytest.approx(ours["loss"], rel=1e-5)


def test_eval_of_a_run_matches_a_plain_forward_on_its_validation_rows(run, capsys):
    run_dir, _, _ = run
    report = _eval(capsys, "--checkpoint", str(run_dir), "--batches", "1")
    assert report["data"] == "validation split of default" and report["tokens"] == 16 * 128
    # The reference: the model's log-softmax at every target of the first 16 validation rows (the
    # default corpus is one document, so every position is scored), with none of eval's code.
    loaded = evaluation.load(run_dir)
    rows = load_rows(loaded.train)[1]
    batch = {k: np.stack([rows[i][k] for i in range(16)]) for k in ("inputs", "targets", "mask")}
    assert batch["mask"].all()
    logits = jax.jit(lambda ids: loaded.model(ids))(batch["inputs"])
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    assert report["loss"] == pytest.approx(float(nll), rel=1e-5)


def test_bytes_of_other_tokenizers_are_decoded_per_document():
    class Plain:  # no per-token byte table: the decode path
        def __init__(self):
            self.tok = ByteTokenizer()

        def decode(self, ids):
            return self.tok.decode(ids)

    tokens = np.concatenate([[*d.encode(), 258] for d in DOCS]).astype(np.int32)
    doc_ids = np.repeat(np.arange(len(DOCS)), [len(d.encode()) + 1 for d in DOCS]).astype(np.int32)
    rows = PackedRows(tokens, doc_ids, seq_len=16, pad_id=256)
    assert evaluation.byte_lengths(Plain()) is None
    for n in (1, 5, len(rows)):
        exact = evaluation.scored_bytes(rows, ByteTokenizer(), n)
        assert evaluation.scored_bytes(rows, Plain(), n) == exact == _expected_counts(16, n)[1]


def test_eval_errors_are_one_line(run, capsys):
    run_dir, hf_dir, corpus = run
    for argv, message in [
        (["--checkpoint", str(hf_dir)], "no training run behind it, so no validation split: give --data"),
        (["--checkpoint", str(run_dir), "--bos"], "--tokenizer and --bos apply to --data"),
        (["--checkpoint", str(run_dir), "--data", str(corpus), "--seq-len", "100000"], "exceeds the model's"),
        (["--checkpoint", str(run_dir), "--batches", "0"], "batches=0 is invalid"),
    ]:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# --- lm-evaluation-harness ---


@pytest.fixture(scope="module")
def harness(run):
    pytest.importorskip("lm_eval")
    from llmarch.eval_harness import HarnessLM

    return HarnessLM(str(run[0]), batch_size=2, max_length=32)


def _requests(kind, *args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@jax.jit
def _token_losses(model, inputs, targets):
    return token_losses(model, {"inputs": inputs, "targets": targets})[0]


def _own_logprob(lm, tokens: list[int], scored: int) -> float:
    """llmarch's training loss (``token_losses``) over the last ``scored`` tokens, negated; the row
    right-padded to the harness's length (one compilation; causal: padding changes nothing before)."""
    n = len(tokens) - 1
    row = np.zeros((2, 1, lm.max_length), np.int32)
    row[0, 0, :n], row[1, 0, :n] = tokens[:-1], tokens[1:]
    nll = np.asarray(_token_losses(lm.model, *row))
    return -float(nll[0, n - scored : n].sum())


def test_harness_scores_as_llmarchs_own_loss(harness):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = DOCS[0][:20]
    ids = list(ByteTokenizer().encode(text))
    (ll, _), (head, _), (tail, _) = harness.loglikelihood(
        _requests("loglikelihood", (text[:5], text[5:]), (text[:5], text[5:12]), (text[:12], text[12:]))
    )
    assert ll == pytest.approx(_own_logprob(harness, ids, len(ids) - 5), rel=1e-4)
    assert ll == pytest.approx(head + tail, rel=1e-5)  # log p(a b | c) = log p(a | c) + log p(b | c a)
    long = DOCS[1][:80]  # 80 tokens in windows of 32
    (rolling,) = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", (long,)))
    windows = get_rolling_token_windows(list(ByteTokenizer().encode(long)), 258, 32, 1)
    own = sum(_own_logprob(harness, c + p, len(p)) for c, p in map(make_disjoint_window, windows))
    assert rolling == pytest.approx(own, rel=1e-4)
    (empty,) = harness.loglikelihood(_requests("loglikelihood", ("", long[:20])))
    (short,) = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", (long[:20],)))
    assert empty[0] == pytest.approx(short, rel=1e-5)  # both start after EOS


def test_harness_generates_greedily_with_the_engine(harness):
    prompt = "The attention"
    (text, cut) = harness.generate_until(
        _requests(
            "generate_until",
            (prompt, {"until": [], "max_gen_toks": 6}),
            (prompt, {"until": ["\x00"], "max_gen_toks": 6, "do_sample": False}),
        )
    )
    # The engine's tokens, found again: each is the argmax after the prompt and those before it.
    greedy_6 = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(258,))
    (out,) = harness._engine_for_generation().generate([list(ByteTokenizer().encode(prompt))], greedy_6)
    ids = [int(t) for t in out.completions[0].token_ids]
    assert text == ByteTokenizer().decode(np.asarray([t for t in ids if t != 258], np.int32))
    assert cut == text.split("\x00")[0]
    ((_, greedy),) = harness._score_rows([(list(ByteTokenizer().encode(prompt)) + ids, len(ids))], "check")
    assert greedy


def test_harness_runs_a_local_task(harness, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate on two tasks built from local files (no download): multiple choice
    and a rolling perplexity whose bits per byte are the adapter's own numbers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "mc.jsonl").write_text(
        json.dumps({"q": "One, two,", "choices": [" three", " zebra"], "label": 0})
        + "\n"
        + json.dumps({"q": "Red, green,", "choices": [" blue", " seven"], "label": 0})
        + "\n"
    )
    texts = [DOCS[1][:40], DOCS[2]]
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def task(name, file, **fields):
        files = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / file)}}}
        return {"task": name, **files, "test_split": "test", **fields}

    mc = task(
        "llmarch_mc",
        "mc.jsonl",
        output_type="multiple_choice",
        doc_to_text="{{q}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    )
    ppl = task(
        "llmarch_ppl",
        "ppl.jsonl",
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
    )
    results = lm_eval.simple_evaluate(
        model=harness,
        tasks=[mc, ppl],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    assert 0.0 <= results["llmarch_mc"]["acc,none"] <= 1.0
    rolling = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", *[(t,) for t in texts]))
    size = sum(len(t.encode()) for t in texts)
    assert results["llmarch_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(rolling) / size / math.log(2))
