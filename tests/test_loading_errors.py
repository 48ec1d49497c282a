"""Loading a checkpoint to serve fails with one line naming the file, the value and what is
allowed (issue 12): corrupt safetensors, config.json that is no object or has bad fields, a path
that is no checkpoint directory, tensors that do not match; and ``dtype`` applies to runs too.

The checkpoints are tiny and written by llmarch itself (no transformers), so the file runs fast.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import llmarch
from llmarch import cli, hf, presets
from llmarch.inference.loading import load_for_inference

W = hf.WEIGHTS_FILE


def _tiny_cfg():
    attention = llmarch.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8)
    return llmarch.ModelConfig(
        vocab_size=64,
        d_model=32,
        num_layers=2,
        ffn_dim=48,
        attention=attention,
        max_seq_len=64,
        name="tiny-errors",
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    cfg = _tiny_cfg()
    # Random numpy weights in the model's shapes: no initializer runs, nothing compiles.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: llmarch.Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: rng.normal(0.0, 0.1, x.shape).astype(x.dtype), state)
    hf.save_pretrained(nnx.merge(graphdef, state), cfg, path)
    return path


@pytest.fixture
def ckpt(tmp_path, checkpoint):
    """A fresh copy of the checkpoint, to break."""
    return shutil.copytree(checkpoint, tmp_path / "ckpt")


def _edit_config(path, **changes):
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config.update(changes)
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))


@pytest.fixture
def no_build(monkeypatch):
    """Config errors must come before any model is built (or anything compiled)."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(hf.pretrained, "from_hf_tensors", fail)  # where load_pretrained looks


# 1. Corrupt safetensors ----------------------------------------------------------------------


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garbage(file):
    file.write_bytes(np.random.default_rng(0).bytes(5000))


@pytest.mark.parametrize(
    "corrupt", [_truncate, _garbage, lambda f: f.write_bytes(b"")], ids=["truncated", "garbage", "empty"]
)
def test_corrupt_weights_file_is_named(ckpt, corrupt):
    corrupt(ckpt / W)
    with pytest.raises(ValueError, match=re.escape(str(ckpt / W)) + " is not a readable safetensors file"):
        load_for_inference(ckpt)


def test_corrupt_shard_is_named(tmp_path, checkpoint):
    model, cfg = hf.load_pretrained(checkpoint)
    path = tmp_path / "sharded"
    hf.save_pretrained(model, cfg, path, max_shard_bytes=20_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    _truncate(shards[1])
    with pytest.raises(ValueError, match=re.escape(str(shards[1])) + " is not a readable safetensors"):
        hf.load_pretrained(path)
    shards[1].unlink()
    hf.save_pretrained(model, cfg, path, max_shard_bytes=20_000)
    index = json.loads((path / hf.INDEX_FILE).read_text())
    index["weight_map"]["model.embed_tokens.weight"] = shards[-1].name  # a shard without it
    (path / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=re.escape(f"in {shards[-1]} that it does not hold: model.embed_tokens.weight")
    ):
        hf.load_pretrained(path)


@pytest.mark.parametrize(
    "text, match", [("[1", "is not valid JSON"), ('["weight_map"]', "must hold a JSON object, not an array")]
)
def test_bad_shard_index_is_named(ckpt, text, match):
    (ckpt / hf.INDEX_FILE).write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(ckpt / hf.INDEX_FILE)) + " " + match):
        load_for_inference(ckpt)


# 2. config.json that is not a JSON object ------------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        (b"[1, 2]", "must hold a JSON object, not an array"),
        (b'"llama"', "must hold a JSON object, not a string"),
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe\x00\x01garbage", "is not valid JSON"),
    ],
    ids=["list", "string", "invalid", "binary"],
)
def test_config_json_must_be_an_object(ckpt, no_build, content, match):
    (ckpt / hf.CONFIG_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(ckpt / hf.CONFIG_FILE)) + " " + match):
        load_for_inference(ckpt)


def test_config_from_hf_rejects_a_non_object():
    with pytest.raises(ValueError, match="config.json must hold a JSON object, not an array"):
        hf.config_from_hf([1, 2])


# 3. Bad fields in config.json -----------------------------------------------------------------

POSITIVE = "is invalid: must be a positive integer"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_attention_heads": 0}, f"num_attention_heads=0 {POSITIVE}"),
        ({"hidden_size": 0}, f"hidden_size=0 {POSITIVE}"),
        ({"hidden_size": -32}, f"hidden_size=-32 {POSITIVE}"),
        ({"num_hidden_layers": 0}, f"num_hidden_layers=0 {POSITIVE}"),
        ({"vocab_size": 0}, f"vocab_size=0 {POSITIVE}"),
        ({"intermediate_size": -1}, f"intermediate_size=-1 {POSITIVE}"),
        ({"num_key_value_heads": 0}, f"num_key_value_heads=0 {POSITIVE}"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 is invalid: must divide num_attention_heads=4"),
        ({"head_dim": 0}, f"head_dim=0 {POSITIVE}"),
        ({"max_position_embeddings": -1}, f"max_position_embeddings=-1 {POSITIVE}"),
        ({"num_attention_heads": "4"}, f"num_attention_heads='4' {POSITIVE}"),
        ({"hidden_size": "abc"}, f"hidden_size='abc' {POSITIVE}"),
        ({"num_attention_heads": 4.5}, f"num_attention_heads=4.5 {POSITIVE}"),
        ({"intermediate_size": True}, f"intermediate_size=True {POSITIVE}"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' is invalid: must be a finite number"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' is invalid: must be true or false"),
        ({"rope_parameters": None, "rope_scaling": [1]}, r"rope_scaling=\[1\] is invalid: must be an object"),
        ({"head_dim": None, "hidden_size": 2}, "hidden_size=2 is invalid without head_dim"),
        ({"hidden_size": None}, "has no 'hidden_size'"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_config_field_is_named(ckpt, no_build, changes, match):
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=re.escape(str(ckpt / hf.CONFIG_FILE)) + " " + match):
        load_for_inference(ckpt)


def test_config_error_from_the_dataclasses_names_the_file(ckpt, no_build):
    _edit_config(ckpt, head_dim=5)  # valid as an integer; RoPE needs it even
    with pytest.raises(
        ValueError,
        match=re.escape(f"{ckpt / hf.CONFIG_FILE}: AttentionConfig.head_dim=5 is invalid: must be even"),
    ):
        load_for_inference(ckpt)


@pytest.mark.parametrize(
    "preset, changes, match",
    [
        ("tiny-moe", {"num_local_experts": 0}, f"num_local_experts=0 {POSITIVE}"),
        ("tiny-moe", {"num_experts_per_tok": "2"}, f"num_experts_per_tok='2' {POSITIVE}"),
        ("tiny-deepseek", {"kv_lora_rank": 0}, f"kv_lora_rank=0 {POSITIVE}"),
        ("tiny-deepseek", {"q_lora_rank": -8}, f"q_lora_rank=-8 {POSITIVE}"),
        (
            "tiny-deepseek",
            {"first_k_dense_replace": -1},
            "first_k_dense_replace=-1 is invalid: must be an integer >= 0",
        ),
        ("tiny-deepseek", {"n_routed_experts": 8.5}, f"n_routed_experts=8.5 {POSITIVE}"),
        (
            "tiny-deepseek",
            {"norm_topk_prob": "false"},
            "norm_topk_prob='false' is invalid: must be true or false",
        ),
        (
            "tiny-deepseek",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": "4"}},
            r"rope_parameters.factor='4' is invalid: must be a finite number",
        ),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else v if "tiny" in v else "",
)
def test_bad_moe_and_mla_fields_are_named(preset, changes, match):
    config = {**hf.config_to_hf(presets.get(preset)), **changes}
    with pytest.raises(ValueError, match="config.json " + match):
        hf.config_from_hf(config)


# 4. Not a checkpoint directory --------------------------------------------------------------


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"'{file}' is not a directory; expected an llmarch run directory")
    ):
        load_for_inference(file)
    with pytest.raises(
        FileNotFoundError,
        match=r"is not a directory; expected a Hugging Face checkpoint "
        r"directory \(config.json \+ \*.safetensors\)",
    ):
        hf.load_pretrained(file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_inference(tmp_path / "nowhere")


def test_a_directory_that_is_neither_kind(tmp_path):
    (tmp_path / W).write_bytes(b"")  # weights without a config are not a checkpoint
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"{tmp_path} is not a checkpoint: it has neither train_config.json nor config.json; expected an "
            "llmarch run directory (train_config.json"
        ),
    ):
        load_for_inference(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{", "train_config.json is not valid JSON"),
        ("[]", "train_config.json must hold a JSON object, not an array"),
        ('{"out_dir": "x", "seq_len": 0}', "train_config.json: TrainConfig.seq_len=0 is invalid"),
    ],
)
def test_a_bad_run_config_is_named(tmp_path, content, match):
    (tmp_path / "train_config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/{match}")):
        load_for_inference(tmp_path)


# 5. dtype ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as ``llmarch train`` leaves it (its config and a checkpoint), saved without
    training: a train step would only add compile time, and any weights do."""
    import grain

    from llmarch.run_format import CHECKPOINTS_DIR, CONFIG_FILE
    from llmarch.train.checkpoint import Checkpointer
    from llmarch.train.config import TrainConfig
    from llmarch.train.trainer import init_state

    path = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(out_dir=str(path), preset="tiny-dense", seq_len=16, tensorboard=False, progress=False)
    (path / CONFIG_FILE).write_text(cfg.to_json())
    _, _, state = init_state(cfg, mesh=None)
    ckpt = Checkpointer(path / CHECKPOINTS_DIR, save_every=1, keep=1)
    ckpt.save(1, state, iter(grain.MapDataset.range(1).to_iter_dataset()), force=True)
    ckpt.close()
    return path


def _dtypes(model):
    return {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model))}


def test_dtype_applies_to_an_llmarch_run(run):
    model, cfg, tokenizer = load_for_inference(run)
    assert cfg.dtype == cfg.param_dtype == "float32" and _dtypes(model) == {np.dtype("float32")}
    half, half_cfg, _ = load_for_inference(run, dtype="bfloat16")
    assert half_cfg.dtype == half_cfg.param_dtype == "bfloat16" and half.cfg == half_cfg
    assert _dtypes(half) == {np.dtype(jax.numpy.bfloat16)}
    assert half_cfg.replace(dtype="float32", param_dtype="float32") == cfg
    tokens = np.asarray([tokenizer.encode("To be, or not to be")], np.int32)
    full, low = np.asarray(model(tokens)), np.asarray(half(tokens), np.float32)
    np.testing.assert_allclose(low, full, atol=0.03 * np.abs(full).max())
    assert not np.array_equal(low, full)  # the bfloat16 model did compute in bfloat16


def test_bad_dtype_is_refused(checkpoint, run):
    with pytest.raises(ValueError, match="dtype='float33' is not supported; allowed: "):
        load_for_inference(checkpoint, dtype="float33")  # was a TypeError from numpy
    with pytest.raises(ValueError, match="dtype='int8' is not supported; allowed: "):
        load_for_inference(run, dtype="int8")  # was ignored for runs


# 6. Tensors that do not match the config ------------------------------------------------------


def _drop(t):
    del t["model.layers.1.self_attn.q_proj.weight"]


def _extra(t):
    t["model.layers.7.mlp.extra.weight"] = np.zeros(3, np.float32)


def _reshape(t):
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((32, 8), np.float32)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_drop, r"tensors in {dir} do not match the config: missing \[model\.layers\.1\.self_attn\.q_proj"),
        (_extra, r"tensors in {dir} do not match the config: missing \[\]; unexpected \[model\.layers\.7\."),
        (
            _reshape,
            r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \(32, 8\) in {file}: the "
            r"config needs \(32, 48\)",
        ),
    ],
)
def test_tensor_mismatch_names_tensor_and_file(ckpt, edit, match):
    tensors = load_file(ckpt / W)
    edit(tensors)
    save_file(tensors, ckpt / W)
    with pytest.raises(
        ValueError, match=match.format(dir=re.escape(str(ckpt)), file=re.escape(str(ckpt / W)))
    ):
        load_for_inference(ckpt)


# The CLI: exit code 2 and one line on stderr -------------------------------------------------


@pytest.mark.parametrize(
    "breakage, extra, match",
    [
        ("file", [], "is not a directory"),
        ("truncate", [], "is not a readable safetensors file"),
        ("config-list", [], "must hold a JSON object"),
        ("heads-0", [], f"num_attention_heads=0 {POSITIVE}"),
        ("none", ["--dtype", "float33"], "dtype='float33' is not supported"),
    ],
)
def test_cli_reports_one_line(ckpt, capsys, breakage, extra, match):
    path = ckpt
    if breakage == "file":
        path = ckpt / W
    elif breakage == "truncate":
        _truncate(ckpt / W)
    elif breakage == "config-list":
        (ckpt / hf.CONFIG_FILE).write_text("[]")
    elif breakage == "heads-0":
        _edit_config(ckpt, num_attention_heads=0)
    code = cli.main(["generate", "--checkpoint", str(path), "--prompt-ids", "1,2", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("llmarch generate: error: "), err
    assert re.search(match, err), err
