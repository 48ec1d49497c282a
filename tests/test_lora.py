"""LoRA/QLoRA fine-tuning and the chat data path: a random transformers Llama saved to disk is
fine-tuned with `llmarch train --init-from`, fully and with LoRA on chat data (the loss on the
assistant's tokens only); the LoRA run trains the adapters alone, keeps its base, checkpoints the
adapters, and its merged export loads in transformers with llmarch's logits. Also: QLoRA over an
RTN base, the train step's frozen argument, dropout, and the errors."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import hf, lora
from llmarch.cli import main
from llmarch.data import ByteTokenizer, chat, load_tokenizer
from llmarch.data.chat import DEFAULT_TEMPLATE, chat_template, encode_conversation, load_chat_rows
from llmarch.hf.tokenizer import write_tokenizer
from llmarch.inference.loading import load_for_inference
from llmarch.lora import LoraConfig
from llmarch.quant.config import QuantConfig
from llmarch.quant.linear import QuantParam
from llmarch.train.config import TrainConfig
from llmarch.train.evaluate import restore_run
from llmarch.train.trainer import init_state, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# A template whose turns end with the EOS token's text: tokenized, "</s>" is EOS's id (2 ids per turn
# are special tokens), which the assistant's spans must include.
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
IDS = np.array([[1, 5, 7, 9, 100, 200, 3, 4, 60, 61, 62, 63]], np.int32)
RUN = dict(seq_len=32, batch_size=4, eval_batches=1, progress=False, tensorboard=False)


def _conversation(a: int, b: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": f"{a}+{b}"},
            {"role": "assistant", "content": str(a + b)},
        ]
    }


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random transformers Llama (float32) saved with save_pretrained, with the byte tokenizer's
    files and TEMPLATE, and a JSONL of conversations."""
    root = tmp_path_factory.mktemp("lora")
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(root / "hf")
    write_tokenizer(ByteTokenizer(), root / "hf", model_max_length=128, chat_template=TEMPLATE)
    rng = np.random.default_rng(0)
    lines = [json.dumps(_conversation(*map(int, rng.integers(0, 50, 2)))) for _ in range(24)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(root, name: str, **fields) -> str:
    cfg = {**RUN, "data": str(root / "chat.jsonl"), "data_format": "chat", **fields}
    cfg["optimizer"] = {"name": "adamw", "learning_rate": 1e-2}
    (root / f"{name}.json").write_text(json.dumps(cfg))
    return str(root / f"{name}.json")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, key):
    with lora.dropout_key(key):  # None: no dropout
        return nnx.merge(graphdef, state)(ids)


def _logits(model, ids=IDS, key=None) -> np.ndarray:
    """The model's logits, jitted (an eager forward dispatches op by op)."""
    return np.asarray(_forward(*nnx.split(model), ids, key))


def _transformers_logits(path) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(path).float().eval()
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def lora_run(hf_llama):
    out = hf_llama / "lora_run"
    lora_section = {"rank": 4, "alpha": 8, "dropout": 0.1}
    conf = _config(hf_llama, "lora", steps=3, eval_every=3, checkpoint_every=2, lora=lora_section)
    assert main(["train", "--init-from", str(hf_llama / "hf"), "--config", conf, "--out", str(out)]) == 0
    return out


def test_lora_run_trains_adapters_only_and_its_merged_export_matches_transformers(hf_llama, lora_run):
    with pytest.raises(ValueError, match="is a LoRA run whose base is .*: read it with"):
        restore_run(lora_run)  # the checkpoint holds the adapters: the base is loaded beside it
    cfg, graphdef, state, step = restore_run(lora_run, load_base=lambda path: load_for_inference(path)[0])
    assert step == 3 and cfg.lora == LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    # Only the adapters are trained, checkpointed and in the optimizer (AdamW: two moments each).
    names = {path[-1] for path, _ in nnx.to_flat_state(state.params)}
    assert names == {"lora_a", "lora_b"}
    adapters = sum(x.size for x in jax.tree.leaves(state.params))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * adapters
    # The base is the source's, unchanged: merged - base = (alpha/r)·A·B exactly where adapted.
    source, _ = hf.load_pretrained(hf_llama / "hf")
    _, base, _ = nnx.split(source, nnx.Param, ...)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adapted = nnx.merge(graphdef, state.params, state.rest_and_frozen())
    merged, _, _ = load_for_inference(lora_run)
    layer = adapted.runs[0].layers.attention.w_q_dnh
    np.testing.assert_allclose(
        np.asarray(merged.runs[0].layers.attention.w_q_dnh.w[...]),
        np.asarray(source.runs[0].layers.attention.w_q_dnh.w[...] + layer.delta_weight()),
        atol=1e-6,
    )
    np.testing.assert_allclose(_logits(merged), _logits(adapted), atol=1e-5)
    assert np.abs(_logits(merged) - _logits(source)).max() > 1e-3  # the adapters did train

    hf_out = hf_llama / "lora_hf"
    assert main(["export", "--checkpoint", str(lora_run), "--out", str(hf_out)]) == 0
    theirs = _transformers_logits(hf_out)
    assert np.abs(_logits(merged) - theirs).max() < 1e-4
    assert json.loads((hf_out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE

    plain = hf_llama / "lora_merged_run"  # the merged model as a plain run, which needs no base
    assert main(["export", "--checkpoint", str(lora_run), "--format", "run", "--out", str(plain)]) == 0
    again, cfg_again, _ = load_for_inference(plain)
    assert TrainConfig.from_dict(json.loads((plain / "train_config.json").read_text())).lora is None
    np.testing.assert_allclose(_logits(again), _logits(merged), atol=1e-6)


def test_a_resumed_lora_run_rereads_its_base_and_takes_the_same_steps(lora_run):
    again = lora_run.parent / "lora_resumed"
    shutil.copytree(lora_run, again)
    shutil.rmtree(again / "checkpoints" / "3")  # as if stopped after the checkpoint of step 2
    assert main(["train", "--out", str(again)]) == 0  # its own settings: init_from, lora, data
    assert (again / "checkpoints" / "3").is_dir()

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def last(run, key):  # the step-3 value the run logged last
        return [r[key] for r in records(run) if r["step"] == 3 and key in r][-1]

    for key in ("loss", "val_loss"):  # dropout masks, data order and base: all the same
        assert last(again, key) == last(lora_run, key)


def test_full_fine_tune_from_hugging_face_exports_to_transformers(hf_llama):
    out = hf_llama / "full_run"
    conf = _config(hf_llama, "full", steps=2, eval_every=2)
    assert main(["train", "--init-from", str(hf_llama / "hf"), "--config", conf, "--out", str(out)]) == 0
    ours, _, _ = load_for_inference(out)
    assert main(["export", "--checkpoint", str(out), "--out", str(hf_llama / "full_hf")]) == 0
    theirs = _transformers_logits(hf_llama / "full_hf")
    assert np.abs(_logits(ours) - theirs).max() < 1e-4
    assert np.abs(_transformers_logits(hf_llama / "hf") - theirs).max() > 1e-3  # it did train


def test_chat_mask_covers_exactly_the_assistant_tokens(hf_llama):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course"},
    ]
    byte = ByteTokenizer()
    ids, trained = encode_conversation(chat_template(byte), messages)  # the default: ChatML as text
    assert chat_template(byte).source == DEFAULT_TEMPLATE
    assert byte.decode(ids[trained]) == "4<|im_end|>\n6, of course<|im_end|>\n"
    assert byte.decode(ids[~trained]).endswith("<|im_start|>assistant\n")

    # The tokenizer's own template (tokenizer_config.json), tokenized as transformers does.
    spec = str(hf_llama / "hf" / "tokenizer.json")
    tok = load_tokenizer(spec)
    ids, trained = encode_conversation(chat_template(tok, tokenizer_spec=spec), messages)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_llama / "hf")
    expected = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert [int(i) for i in ids] == list(expected)
    eos = tok.eos_id
    assert [int(i) for i in ids[trained]] == [*b"4", eos, 10, *b"6, of course", eos, 10]

    # Through the split and packing: the targets the loss counts, row after row, are the training
    # conversations' answers, each with its end of turn, and nothing else.
    train_rows, _ = load_chat_rows(
        hf_llama / "chat.jsonl", tok, seq_len=64, val_fraction=0.1, tokenizer_spec=spec
    )
    counted = np.concatenate(
        [train_rows[i]["targets"][train_rows[i]["mask"] == 1] for i in range(len(train_rows))]
    )
    conversations = chat._split(chat.load_conversations(hf_llama / "chat.jsonl"), 0.1, seed=0)[0]
    answers = [
        [*m["content"].encode(), eos, 10] for c in conversations for m in c if m["role"] == "assistant"
    ]
    assert counted.tolist() == [t for answer in answers for t in answer]


def test_qlora_on_a_mesh_trains_adapters_over_a_frozen_rtn_base(tmp_path, devices):
    qlora = LoraConfig(rank=4, dropout=0.1, targets=("q", "v", "down"), base_quant=QuantConfig(bits=8))
    mesh = "data=2,fsdp=2,tensor=2"
    cfg = TrainConfig(
        out_dir=str(tmp_path / "q"), steps=2, eval_every=2, lora=qlora, mesh=mesh, rules="fsdp_tp", **RUN
    )
    result = train(cfg, log=lambda s: None)
    # The base (the seed's weights, linears stored int8) is exactly what the run started from.
    _, _, start = init_state(cfg, mesh=None)
    variables = lambda tree: jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))  # noqa: E731
    assert any(isinstance(v, QuantParam) for v in variables(result.frozen))
    for a, b in zip(jax.tree.leaves(start.frozen), jax.tree.leaves(result.frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {path[-1] for path, _ in nnx.to_flat_state(result.params)} == {"lora_a", "lora_b"}
    # Readers see the merged model (dequantized base + A·B, float32), which is the adapted model's
    # function: dropout is on only where the train step turns it on.
    merged, _, _ = load_for_inference(tmp_path / "q")
    assert not lora.is_adapted(merged) and getattr(merged, "quant_config", None) is None
    graphdef, state = nnx.split(result.model())
    adapted = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    np.testing.assert_allclose(_logits(merged), _logits(adapted), atol=1e-4)
    assert np.abs(_logits(adapted, key=jax.random.key(0)) - _logits(adapted)).max() > 1e-4


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rank=0), "LoraConfig.rank=0"),
        (dict(alpha=-1.0), "LoraConfig.alpha=-1.0"),
        (dict(dropout=1.0), "LoraConfig.dropout=1.0"),
        (dict(targets=("q", "query")), "'query' is unknown"),
        (dict(targets=()), "LoraConfig.targets=()"),
        (dict(targets=("q", "q")), "names a weight role twice"),
        (dict(base_quant=QuantConfig(method="gptq")), "LoraConfig.base_quant.method='gptq'"),
    ],
)
def test_bad_lora_config_values_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**fields)


def test_lora_and_chat_errors(hf_llama, tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.keep_sparsity=True is invalid with lora"):
        TrainConfig(out_dir="x", lora=LoraConfig(), keep_sparsity=True)
    with pytest.raises(ValueError, match="TrainConfig.data_format='json' is unknown"):
        TrainConfig(out_dir="x", data_format="json")
    with pytest.raises(ValueError, match="data='default' is invalid with data_format='chat'"):
        TrainConfig(out_dir="x", data_format="chat")
    cfg = llmarch.presets.get("tiny-dense")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="names no weight of model"):
        lora.apply_lora(model, LoraConfig(targets=("dkv",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank=100 is invalid"):
        lora.apply_lora(model, LoraConfig(rank=100), rngs=nnx.Rngs(0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "human", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: messages\[0\] role 'human' is invalid"):
        load_chat_rows(bad, ByteTokenizer(), seq_len=8, val_fraction=0.5)
