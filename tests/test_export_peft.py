"""``llmarch export --format peft``: a LoRA run fine-tuned from a random transformers Llama is
written as a PEFT adapter directory, which ``peft.PeftModel.from_pretrained`` over the transformers
base turns into the run's merged model (llmarch's logits); and the refusals."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import lora
from llmarch.cli import main
from llmarch.data import ByteTokenizer
from llmarch.export.peft import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, adapter_tensors, export_peft
from llmarch.hf.tokenizer import write_tokenizer
from llmarch.inference.loading import load_for_inference
from llmarch.lora import LoraConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = np.array([[1, 5, 7, 9, 100, 200, 3, 4, 60, 61, 62, 63]], np.int32)
TARGETS = (*lora.ALL_LINEAR, "lm_head")
SHAPES = dict(hidden=32, heads=4, kv_heads=2, ffn=64, vocab=320, layers=2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A random transformers Llama (float32, GQA, untied head) saved with save_pretrained and the
    byte tokenizer, and a 3-step LoRA run from it on every linear and the LM head."""
    root = tmp_path_factory.mktemp("peft")
    config = transformers.LlamaConfig(
        vocab_size=SHAPES["vocab"],
        hidden_size=SHAPES["hidden"],
        intermediate_size=SHAPES["ffn"],
        num_hidden_layers=SHAPES["layers"],
        num_attention_heads=SHAPES["heads"],
        num_key_value_heads=SHAPES["kv_heads"],
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(root / "hf")
    write_tokenizer(ByteTokenizer(), root / "hf", model_max_length=128)
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    train = dict(
        data=str(root / "text.txt"),
        seq_len=32,
        batch_size=4,
        steps=3,
        eval_every=3,
        eval_batches=1,
        progress=False,
        tensorboard=False,
        optimizer={"name": "adamw", "learning_rate": 1e-2},
        lora={"rank": 4, "alpha": 6, "dropout": 0.05, "targets": list(TARGETS)},
    )
    (root / "lora.json").write_text(json.dumps(train))
    out = root / "run"
    argv = ["train", "--init-from", str(root / "hf"), "--config", str(root / "lora.json"), "--out", str(out)]
    assert main(argv) == 0
    return root


def _llmarch_logits(model) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, IDS))


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def test_peft_adapter_over_the_transformers_base_is_the_merged_run(lora_run):
    out = lora_run / "adapter"
    assert main(["export", "--checkpoint", str(lora_run / "run"), "--format", "peft", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    expected = dict(peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=6, lora_dropout=0.05)
    assert {k: config[k] for k in expected} == expected
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == str((lora_run / "hf").resolve())
    projections = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["target_modules"] == projections

    # Names and torch layouts: lora_A [r, in], lora_B [out, r] of each nn.Linear.
    from safetensors.numpy import load_file

    tensors = load_file(out / ADAPTER_WEIGHTS_FILE)
    assert len(tensors) == 2 * (7 * SHAPES["layers"] + 1)
    d, h = SHAPES["hidden"], SHAPES["hidden"] // SHAPES["heads"]
    layer = "base_model.model.model.layers.1."
    for module, (out_features, in_features) in {
        "self_attn.q_proj": (SHAPES["heads"] * h, d),
        "self_attn.k_proj": (SHAPES["kv_heads"] * h, d),
        "self_attn.o_proj": (d, SHAPES["heads"] * h),
        "mlp.down_proj": (d, SHAPES["ffn"]),
    }.items():
        assert tensors[f"{layer}{module}.lora_A.weight"].shape == (4, in_features)
        assert tensors[f"{layer}{module}.lora_B.weight"].shape == (out_features, 4)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (SHAPES["vocab"], 4)

    base = transformers.LlamaForCausalLM.from_pretrained(lora_run / "hf").float().eval()
    before = _torch_logits(base)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    theirs = _torch_logits(model)
    merged, _, _ = load_for_inference(lora_run / "run")
    ours = _llmarch_logits(merged)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs - before).max() > 1e-3  # lora_b moved off zero: the adapters did train
    assert all(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)

    # --dtype casts the adapters.
    half = lora_run / "adapter_bf16"
    assert export_peft(lora_run / "run", half, dtype="bfloat16")["dtype"] == "bfloat16"


def test_peft_export_refuses_what_peft_cannot_hold(lora_run, capsys):
    out = lora_run / "never"
    with pytest.raises(ValueError, match="is a Hugging Face checkpoint: --format peft writes a LoRA run"):
        export_peft(lora_run / "hf", out)
    plain = lora_run / "plain_run"  # the merged model as a plain run: no adapters any more
    run = str(lora_run / "run")
    assert main(["export", "--checkpoint", run, "--format", "run", "--out", str(plain)]) == 0
    with pytest.raises(ValueError, match="is a run with TrainConfig.lora=None"):
        export_peft(plain, out)
    assert not out.exists()  # refused before anything is written
    argv = ["export", "--checkpoint", run, "--format", "peft", "--out", str(out)]
    assert main([*argv, "--max-shard-size", "1GB"]) == 2
    assert "--max-shard-size applies to --format hf, not peft" in capsys.readouterr().err
    assert not out.exists()

    # A weight inside a fused Hugging Face tensor (MLA's kv_a_proj_with_mqa) has no nn.Linear.
    mla = llmarch.Transformer(llmarch.presets.get("tiny-mla"), rngs=nnx.Rngs(0))
    adapted = lora.apply_lora(mla, LoraConfig(rank=2, targets=("o", "dkv")), rngs=nnx.Rngs(1))
    fused = r"role 'dkv'\), which is part of DeepseekV3ForCausalLM's model.layers.0.self_attn.kv_a_proj_"
    with pytest.raises(ValueError, match=fused):
        adapter_tensors(adapted)
    # A memory layer: no Hugging Face architecture holds the model at all.
    pkm = llmarch.Transformer(llmarch.presets.get("tiny-pkm"), rngs=nnx.Rngs(0))
    adapted = lora.apply_lora(pkm, LoraConfig(rank=2, targets=("q",)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="no Hugging Face architecture for PEFT to load: BlockConfig.ffn"):
        adapter_tensors(adapted)
