"""The engine on checkpoints: a transformers LlamaForCausalLM loaded through llmarch.hf gives the
same greedy tokens as transformers' generate; `llmarch generate` serves a Hugging Face checkpoint
and an `llmarch train` run directory."""

import pytest

import llmarch
from llmarch import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_greedy import engine_and_transformers_greedy  # noqa: E402  (needs torch)

pytestmark = pytest.mark.hf
V = 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random small Llama (spread-out weights, so that greedy argmaxes are not near ties)."""
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_engine_greedy_equals_transformers_generate(hf_dir):
    path, hf_model = hf_dir
    model, cfg = llmarch.hf.load_pretrained(path)
    ours, want = engine_and_transformers_greedy(model, cfg, hf_model, V, max_tokens=16)
    assert ours == want


def test_cli_generates_from_a_hugging_face_checkpoint(hf_dir, capsys):
    path, _ = hf_dir
    argv = [
        "generate",
        "--checkpoint",
        str(path),
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "7 8",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
    ]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[0.0] (length) ")
    assert len(lines[0].split(") ")[1].split()) == 5
    assert cli.main(["generate", "--checkpoint", str(path), "--prompt", "hi"]) == 2  # no tokenizer
    assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_generates_from_an_llmarch_run(tmp_path, capsys):
    from llmarch.train.config import TrainConfig
    from llmarch.train.trainer import train

    run = tmp_path / "run"
    train(
        TrainConfig(
            out_dir=str(run),
            preset="tiny-dense",
            seq_len=32,
            batch_size=2,
            steps=1,
            eval_every=1,
            eval_batches=1,
            log_every=1,
            checkpoint_every=1,
            tensorboard=False,
            progress=False,
        ),
        log=lambda *_: None,
    )
    argv = [
        "generate",
        "--checkpoint",
        str(run),
        "--prompt",
        "To be",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--stream",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "6 tokens" in out.err
    # n > 1 with a 2-token prompt once hung; the summary counts the tokens generated.
    argv = [
        "generate",
        "--checkpoint",
        str(run),
        "--prompt",
        "hi",
        "--n",
        "3",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert out.out.count("(length)") == 3 and out.err.startswith("12 tokens in"), out.err
