"""The benchmark harness's pure parts: its table, the README section it rewrites, its options, and
the F32 GGUF written for the llama.cpp peer (read back with gguf's own reader). No timing."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import _bench_common as common  # noqa: E402
import _gguf  # noqa: E402
import bench  # noqa: E402


def test_table_rows_ratios_and_escaped_pipes():
    rows = [
        common.Row("train | step", "6,000 tok/s", "torch: 8,000 tok/s", 0.75, "≥ 1.25×", False, "n"),
        common.Row("decode", "110 tok/s", "not installed", None, "≥ 1.0×", None),
        common.Row("serve", "1,136 tok/s", "67 tok/s", 16.954, "≥ 10×", True),
    ]
    lines = common.table(rows).splitlines()
    assert lines[0] == "| workload | llmarch | peer | ratio | goal | met | notes |"
    assert lines[2] == "| train \\| step | 6,000 tok/s | torch: 8,000 tok/s | 0.75× | ≥ 1.25× | **no** | n |"
    assert lines[3] == "| decode | 110 tok/s | not installed | — | ≥ 1.0× | — |  |"
    assert "| 16.95× | ≥ 10× | yes |" in lines[4]
    assert len(lines) == 5
    assert "Goals met: 1 of 2 judged." in bench.report(rows, "header")


def test_replace_section_keeps_markers_and_surroundings():
    text = f"# t\nbefore\n{common.README_START}\nold\nlines\n{common.README_END}\nafter\n"
    new = common.replace_section(text, "\n| a |\n")
    assert new == f"# t\nbefore\n{common.README_START}\n| a |\n{common.README_END}\nafter\n"
    assert common.replace_section(new, "| b |").count("| b |") == 1  # idempotent in shape


@pytest.mark.parametrize(
    "text, message",
    [
        ("no markers", "occurs 0 times"),
        (f"{common.README_START}\n{common.README_START}\n{common.README_END}", "occurs 2 times"),
        (f"{common.README_END}\nx\n{common.README_START}", "comes before"),
    ],
)
def test_replace_section_refuses_bad_markers(text, message):
    with pytest.raises(ValueError, match=message):
        common.replace_section(text, "body")


def test_options_refuse_unknown_workloads_and_bad_repeats(capsys):
    assert bench.parse_args(["--only", "train,exp07"]).names == ["train", "exp07"]
    assert bench.parse_args([]).names == list(bench.WORKLOADS)
    for argv in (["--only", "train,nope"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_interleaved_medians_runs_each_in_turn():
    calls = []
    med = common.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3 and set(med) == {"a", "b"}
    with pytest.raises(ValueError, match="repeats=0"):
        common.interleaved_medians({}, 0)


def test_rope_rows_go_from_halves_to_pairs():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows
    got = _gguf.hf_to_gguf_rows(w, heads=2)
    np.testing.assert_array_equal(got[:, 0], [0, 6, 3, 9, 12, 18, 15, 21])  # rows 0,2,1,3 per head


def _tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # attention scores of order 1, so that RoPE's layout changes the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def test_gguf_round_trip_same_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = _tiny_llama()
    path = tmp_path / "m.gguf"
    _gguf.write_llama_gguf(model, path)
    reader = gguf.GGUFReader(str(path))
    read = {t.name: np.asarray(t.data) for t in reader.tensors}
    expected = _gguf.gguf_tensors(model)
    assert set(read) == set(expected) and len(read) == 3 + 9 * 2
    for name, array in expected.items():
        np.testing.assert_array_equal(read[name].reshape(array.shape), array, err_msg=name)
    v_proj = model.state_dict()["model.layers.1.self_attn.v_proj.weight"].numpy()
    np.testing.assert_array_equal(read["blk.1.attn_v.weight"], v_proj)  # unpermuted, as stored
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert int(fields["llama.block_count"].parts[-1][0]) == 2


def test_llama_cpp_computes_the_same_logits(tmp_path):
    """The q/k row permutation is right only if llama.cpp's logits equal transformers'."""
    pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    torch = pytest.importorskip("torch")
    model = _tiny_llama()
    ids = [5, 17, 3, 60, 9, 33, 1, 42]
    _gguf.write_llama_gguf(model, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), expected, atol=1e-3)


def test_torch_peer_gets_the_resolved_adamw_hyperparameters():
    """The train row's peer: None in OptimizerConfig means "the optimizer's default" and must be
    resolved before torch sees it (a bare config once made the whole row fail)."""
    torch = pytest.importorskip("torch")
    from llmarch.train.optim import OptimizerConfig

    opt = bench.torch_adamw([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig())
    group = opt.param_groups[0]
    want = OptimizerConfig().resolved()
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        want.learning_rate,
        (want.b1, want.b2),
        want.eps,
        want.weight_decay,
    )
