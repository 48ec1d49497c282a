"""`llmarch export --format hf`: an llmarch run as a Hugging Face directory that transformers loads
(model and tokenizer) and generates from as llmarch does, round trips of such directories, Hub ids
from a local Hugging Face cache, and the errors.

The runs hold random weights spread out as in the other parity tests (norm scales near one, the
rest N(0, 0.1)), so that greedy argmaxes are not near ties.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import llmarch
from llmarch import hf, hub, presets, sources
from llmarch.cli import main
from llmarch.cli_export import parse_size
from llmarch.data.tokenizer import BPETokenizer, ByteTokenizer
from llmarch.export.hf import export_hf
from llmarch.hf.tokenizer import BYTE_SPECIAL_TOKENS, byte_level_tokenizer, byte_symbols

TEXTS = [
    "Hello, world!",
    "  two  spaces,\ta tab\nand a newline ",
    "café, naïve, Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 😀👍🏽 and a flag 🇫🇷",
    "<s> literal </s> and <pad> are text",
    "\x00\x7f control",
]
EOS = ByteTokenizer.EOS
NEW_TOKENS = 12


def _spread(model: nnx.Module, seed: int) -> nnx.Module:
    """``model`` with N(0, 0.1) weights and norm scales 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = []
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        noise = 0.1 * rng.standard_normal(value.shape)
        new = 1 + noise if "scale" in map(str, path) else noise
        flat.append((path, var.replace(jnp.asarray(new, value.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _greedy(model: nnx.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` (llmarch.inference.generate: no engine)."""
    from llmarch.inference.generate import generate

    return generate(model, np.asarray([prompt]), n)[0, len(prompt) :].tolist()


def _with_eos_at(model: nnx.Module, prompt: list[int]) -> tuple[nnx.Module, int]:
    """``model`` with the LM head's columns of EOS and of a token t swapped, t being the first
    greedy token after ``prompt`` (from step 2 on) not seen before it: greedy decoding then emits
    EOS exactly where it emitted t. Returns the model and that step."""
    greedy = _greedy(model, prompt, NEW_TOKENS)
    step = next(k for k in range(2, NEW_TOKENS) if greedy[k] not in greedy[:k] and greedy[k] != EOS)
    w = np.array(model.lm_head.w.get_value())  # [D, V]
    w[:, [greedy[step], EOS]] = w[:, [EOS, greedy[step]]]
    model.lm_head.w.set_value(jnp.asarray(w))
    return model, step


def _write_run(out: Path, preset: str, tokenizer: str, *, seed: int = 0, eos_prompt=None, vocab_size=None):
    cfg = presets.get(preset)
    cfg = cfg if vocab_size is None else cfg.replace(vocab_size=vocab_size)
    model = _spread(llmarch.Transformer(cfg, rngs=nnx.Rngs(seed)), seed)
    step = None
    if eos_prompt is not None:
        model, step = _with_eos_at(model, eos_prompt)
    src = sources.Source(out.parent, cfg, tokenizer, None)
    sources.write_run(model, out, src=src, how={"test": "random weights"})
    return out, step


EOS_PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A Llama-style run with the byte tokenizer, whose greedy output for EOS_PROMPT ends in EOS;
    its vocabulary is the tokenizer's, so that every generated id decodes to text."""
    prompt = ByteTokenizer().encode(EOS_PROMPT).tolist()
    out = tmp_path_factory.mktemp("byte") / "run"
    return _write_run(out, "tiny-dense", "byte", eos_prompt=prompt, vocab_size=ByteTokenizer.vocab_size)


@pytest.fixture(scope="module")
def exported(byte_run):
    run, _ = byte_run
    out = run.parent / "hf"
    summary = export_hf(run, out)
    assert summary["architecture"] == "LlamaForCausalLM" and summary["tokenizer"] is True
    return out


# --- the byte tokenizer as a `tokenizers` pipeline (no transformers needed) ---


def test_byte_level_tokenizer_gives_byte_tokenizer_ids():
    """The pipeline, read back as llmarch reads a tokenizer.json (special tokens never parsed out
    of text), encodes and decodes every text as ByteTokenizer does."""
    tok, ours = byte_level_tokenizer(), ByteTokenizer()
    back = BPETokenizer(tok, **BYTE_SPECIAL_TOKENS)
    every_byte_in_text = "".join(chr(c) for c in range(128)) + "".join(
        chr(c) for c in (0x80, 0xBF, 0x7FF, 0x800, 0xFFFD, 0xFFFF, 0x10000, 0x10FFFF)
    )
    for text in [*TEXTS, every_byte_in_text, ""]:
        assert back.encode(text).tolist() == ours.encode(text).tolist(), text
        assert back.decode(ours.encode(text)) == text == ours.decode(ours.encode(text))
    assert (back.vocab_size, back.pad_id, back.bos_id, back.eos_id) == (259, 256, 257, 258)
    assert back.decode(ours.encode("hé", bos=True, eos=True)) == "hé"  # specials are skipped
    assert byte_level_tokenizer().encode("<s>").ids == [257]  # a raw pipeline parses them
    assert len(set(byte_symbols())) == 256


# --- transformers loads the export ---


@pytest.mark.hf
def test_byte_symbols_are_gpt2s():
    gpt2 = pytest.importorskip("transformers.convert_slow_tokenizer")
    assert byte_symbols() == [gpt2.bytes_to_unicode()[b] for b in range(256)]


@pytest.mark.hf
def test_auto_tokenizer_encodes_and_decodes_as_llmarch(exported):
    transformers = pytest.importorskip("transformers")
    tok, ours = transformers.AutoTokenizer.from_pretrained(exported), ByteTokenizer()
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text).tolist(), text
        assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (257, 258, 256)
    assert tok.decode([257, 104, 105, 258], skip_special_tokens=True) == "hi"
    assert tok.model_max_length == presets.get("tiny-dense").max_seq_len


def _engine_greedy(model, cfg, tokenizer, prompts):
    from llmarch.inference import Engine, SamplingParams

    engine = Engine(
        model,
        cfg,
        tokenizer=tokenizer,
        max_num_seqs=2,
        max_num_batched_tokens=32,
        max_prefill_chunk=16,
        max_len=64,
        page_size=8,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
    return [o.completions[0] for o in engine.generate(prompts, params)]


def _transformers_greedy(out, prompts):
    """Greedy continuations by transformers, with the generation config the export wrote."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    got = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            new = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            got.append(new[0, ids["input_ids"].shape[1] :].tolist())
    return got, tok


@pytest.mark.hf
@pytest.mark.slow
def test_transformers_generate_equals_llmarch_greedy_and_stops_at_eos(byte_run, exported):
    from llmarch.inference.loading import load_for_inference

    run, eos_step = byte_run
    prompts = [EOS_PROMPT, "café 日本 😀", "x"]
    want, tok = _transformers_greedy(exported, prompts)
    model, cfg, ours = load_for_inference(run)
    got = _engine_greedy(model, cfg, ours, prompts)
    assert [c.token_ids for c in got] == want
    # the EOS prompt stops at EOS, at the step the weights were built for; the others run on
    assert want[0][-1] == EOS and len(want[0]) == eos_step + 1 and got[0].finish_reason == "stop"
    assert all(len(w) == NEW_TOKENS and EOS not in w for w in want[1:])
    assert [ours.decode(c.token_ids) for c in got] == [tok.decode(w, skip_special_tokens=True) for w in want]


@pytest.mark.hf
@pytest.mark.slow
def test_moe_run_exports_as_mixtral_and_generates_the_same(tmp_path):
    from llmarch.inference.loading import load_for_inference

    run, _ = _write_run(tmp_path / "run", "tiny-moe", "byte", seed=1)
    summary = export_hf(run, tmp_path / "hf")
    assert summary["architecture"] == "MixtralForCausalLM"
    prompts = ["Mixture of experts", "ünïcödé"]
    want, _ = _transformers_greedy(tmp_path / "hf", prompts)
    model, cfg, ours = load_for_inference(run)
    assert [c.token_ids for c in _engine_greedy(model, cfg, ours, prompts)] == want


@pytest.mark.hf
def test_bpe_run_exports_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    bpe = BPETokenizer.train(list(topics.values())[:40], vocab_size=300)
    file = bpe.save(tmp_path / "tokenizer.json")
    run, _ = _write_run(tmp_path / "run", "tiny-dense", str(file))
    export_hf(run, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert written["model"] == json.loads(file.read_text())["model"]
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config == {"bos_token_id": bpe.bos_id, "eos_token_id": bpe.eos_id, "pad_token_id": bpe.pad_id}
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert tok(text)["input_ids"] == bpe.encode(text).tolist(), text
        assert tok.decode(tok(text)["input_ids"]) == text


# --- round trips: a Hugging Face directory in, the same directory out ---


def _tensors(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(root.glob("*.safetensors")):
        out |= load_file(file)
    return out


def test_round_trip_keeps_tokenizer_weights_and_config(exported, tmp_path):
    again = export_hf(exported, tmp_path / "again", max_shard_bytes=200_000)
    assert (tmp_path / "again" / hf.INDEX_FILE).is_file() and len(again["files"]) > 6  # sharded
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (exported / name).read_bytes(), name
    before, after = _tensors(exported), _tensors(tmp_path / "again")
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_round_trip_in_bfloat16_stays_bfloat16(exported, tmp_path):
    import ml_dtypes

    export_hf(exported, tmp_path / "bf16", dtype="bfloat16")
    summary = export_hf(tmp_path / "bf16", tmp_path / "again")  # stored dtype kept by default
    assert summary["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"
    before, after = _tensors(exported), _tensors(tmp_path / "again")
    for k in before:
        assert after[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(after[k], before[k].astype(ml_dtypes.bfloat16))


def test_source_token_files_are_carried_over(exported, tmp_path):
    """A Hugging Face source's own tokenizer and generation settings pass through unchanged."""
    source = tmp_path / "source"
    shutil.copytree(exported, source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 10], "top_p": 0.9}))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "eos_token_id": [258, 10]}))
    export_hf(source, tmp_path / "out")
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [258, 10]


def test_export_replaces_an_earlier_export_and_a_failed_one_leaves_it(exported, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_hf(exported, out, max_shard_bytes=200_000)
    export_hf(exported, out)  # the earlier export, shards and all, is replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in exported.iterdir())

    def fail(model, cfg, path, **kw):
        (Path(path) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(exported, out)
    assert (out / "config.json").read_bytes() == (exported / "config.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left


# --- errors ---


def test_out_must_be_new_empty_or_an_earlier_export(exported, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files an export does not write \(todo.txt\)"):
        export_hf(exported, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_hf(exported, exported)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        export_hf(exported, tmp_path / "file")
    with pytest.raises(ValueError, match=r"dtype='float8' is not supported"):
        export_hf(exported, tmp_path / "x", dtype="float8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantized_and_factorized_sources_are_refused(byte_run, tmp_path):
    from llmarch.lowrank.config import LowRankConfig
    from llmarch.lowrank.convert import lowrank_checkpoint
    from llmarch.quant.config import QuantConfig
    from llmarch.quant.convert import quantize_checkpoint

    run, _ = byte_run
    quantize_checkpoint(run, QuantConfig(method="rtn", bits=8), tmp_path / "q", progress=False)
    with pytest.raises(ValueError, match="is quantized: start from its float source"):
        export_hf(tmp_path / "q", tmp_path / "out")
    lowrank_checkpoint(run, LowRankConfig(param_ratio=0.5), tmp_path / "lr", progress=False)
    with pytest.raises(ValueError, match=r"ModelConfig.low_rank holds \d+ factorized weights"):
        export_hf(tmp_path / "lr", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_pretrained_refuses_a_quantized_model_and_a_foreign_tokenizer(tmp_path):
    from llmarch.quant import quantize
    from llmarch.quant.config import QuantConfig

    cfg = presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    quantized = quantize(model, cfg, QuantConfig(method="rtn", bits=8), None, progress=False)
    with pytest.raises(ValueError, match=r"the model is quantized \(rtn\)"):
        hf.save_pretrained(quantized, cfg, tmp_path / "q")
    with pytest.raises(TypeError, match="cannot be written as Hugging Face files"):
        hf.save_pretrained(model, cfg, tmp_path / "t", tokenizer="byte")
    small = cfg.replace(vocab_size=200)
    with pytest.raises(ValueError, match="more than ModelConfig.vocab_size=200"):
        hf.save_pretrained(
            llmarch.Transformer(small, rngs=nnx.Rngs(0)), small, tmp_path / "v", tokenizer=ByteTokenizer()
        )
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "five", "0", "5 GBs", "-1MB"])
def test_parse_size_errors(text):
    with pytest.raises(ValueError, match="--max-shard-size .* is invalid"):
        parse_size(text)


def test_cli_export_and_its_errors(exported, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["export", "--checkpoint", str(exported), "--out", str(out), "--max-shard-size", "200KB"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and hf.INDEX_FILE in summary["files"]
    for args, message in [
        (["--out", str(tmp_path / "x.gguf"), "--format", "gguf", "--max-shard-size", "1GB"], "applies to"),
        (["--out", str(tmp_path / "y"), "--max-shard-size", "lots"], "--max-shard-size 'lots' is invalid"),
        (["--out", str(exported)], "is the checkpoint being exported"),
    ]:
        assert main(["export", "--checkpoint", str(exported), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_cli_reaches_the_gguf_and_stablehlo_writers(byte_run, tmp_path, capsys):
    """The other formats' options reach their writers (their own tests check the files)."""
    pytest.importorskip("gguf")
    run, _ = byte_run
    file = tmp_path / "model.gguf"
    assert (
        main(["export", "--checkpoint", str(run), "--format", "gguf", "--dtype", "q8_0", "--out", str(file)])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype"] == "q8_0" and summary["architecture"] == "llama" and file.is_file()
    args = ["--format", "stablehlo", "--max-len", "32", "--prefill-len", "16", "--out", str(tmp_path / "x")]
    assert main(["export", "--checkpoint", str(run), *args]) == 0
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "x") and manifest
    for args, message in [
        (["--format", "gguf", "--dtype", "float16", "--out", str(file)], "--dtype float16 is invalid for"),
        (["--format", "gguf", "--out", str(tmp_path / "m.bin")], "give a FILE.gguf"),
        (["--format", "stablehlo", "--tokenizer-pre", "gpt-2", "--out", str(tmp_path / "y")], "applies to"),
        (["--max-len", "8", "--out", str(tmp_path / "z")], "--max-len applies to --format stablehlo, not hf"),
    ]:
        assert main(["export", "--checkpoint", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# --- subprocesses: one-line errors and Hub ids through a local Hugging Face cache ---


def _llmarch(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "llmarch.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def _fake_cache(cache: Path, repo_id: str, files: Path) -> None:
    """The layout huggingface_hub keeps: blobs, a snapshot of links to them, and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, f in enumerate(sorted(files.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))


@pytest.mark.parametrize(
    ("text", "is_id"),
    [("org/name", True), ("Qwen/Qwen3-0.6B", True), ("gpt2", False), ("./org/name", False),
     ("/abs/dir", False), ("a/b/c", False), ("org/na--me", False), ("~/x", False)],
)  # fmt: skip
def test_what_reads_as_a_repo_id(text, is_id):
    assert hub.is_repo_id(text) is is_id


def test_local_paths_win_over_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.resolve("org/name") == "org/name"  # an existing directory is never looked up
    assert hub.resolve(Path("org/other")) == Path("org/other")  # nor is a Path
    assert hub.resolve("no-slash") == "no-slash"


@pytest.mark.slow
def test_hub_ids_resolve_through_the_cache_and_fail_in_one_line(exported, tmp_path):
    cache = tmp_path / "cache"
    _fake_cache(cache, "llmarch-test/tiny", exported)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = _llmarch("export", "--checkpoint", "llmarch-test/tiny", "--out", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"].startswith(str(cache))
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (exported / name).read_bytes()

    missing = _llmarch("generate", "--checkpoint", "llmarch-test/absent", "--prompt", "x", env=env)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1, missing.stderr
    for part in ("llmarch generate: error:", "'llmarch-test/absent'", "HF_HUB_OFFLINE", str(cache)):
        assert part in missing.stderr, missing.stderr


def test_cli_unknown_format_is_one_line(exported, tmp_path):
    done = _llmarch("export", "--checkpoint", str(exported), "--format", "onnx", "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert (
        done.stderr
        == "llmarch export: error: --format 'onnx' is unknown; allowed: hf, gguf, stablehlo, run, peft\n"
    )
