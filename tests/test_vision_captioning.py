"""`llmarch train --task shapes-captions` trains the shapes captioner, writes a checkpoint that
`llmarch generate --image FILE --prompt TEXT` serves, and refuses bad flags in one line; the
captioner's scoring against hand-made captions."""

import json

import numpy as np
import pytest

from llmarch import cli
from llmarch.data.shapes import ShapesConfig, ShapesDataset
from llmarch.vision.captioning import IMAGE_MARKER, ShapesRunConfig, score_captions, shapes_data


def test_score_captions_counts_each_true_shape():
    truths = ["a red circle on the left and a blue square at the top", "a green triangle on the right"]
    preds = ["a red square on the left and a blue square at the top", "a green triangle on the right"]
    s = score_captions(truths, preds)
    assert s["exact"] == 0.5
    assert s["position"] == 1.0 and s["colour"] == 1.0
    assert s["shape"] == pytest.approx(2 / 3) and s["both"] == pytest.approx(2 / 3)
    assert s["extra"] == 0.0
    s = score_captions(["a red circle on the left"], ["a red circle at the bottom"])
    assert (s["position"], s["colour"], s["extra"]) == (0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "run"
    argv = ["train", "--task", "shapes-captions", "--out", str(out), "--steps", "3", "--batch-size", "4"]
    assert cli.main([*argv, "--log-every", "1", "--lr", "0.001"]) == 0
    return out


def test_cli_trains_writes_a_checkpoint_and_a_report(run_dir, capsys):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "report.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["model_type"] == "llava"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 3 and np.isfinite(report["held_out_loss"])
    assert 0.0 <= report["colour"] <= 1.0 and report["prompt"] == f"{IMAGE_MARKER}Caption: "
    # A second run into the same directory is refused, not overwritten.
    assert cli.main(["train", "--task", "shapes-captions", "--out", str(run_dir), "--steps", "1"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_generate_reads_the_run_back(run_dir, tmp_path, capsys):
    from flax import nnx
    from PIL import Image

    from llmarch.inference.loading import load_for_inference
    from llmarch.vision.captioning import shapes_format
    from llmarch.vision.llava import Llava
    from llmarch.vision.preprocess import ImageProcessing
    from llmarch.vision.train import greedy_captions

    record = shapes_data(1, seed=7)[0]
    png = tmp_path / "shapes.png"
    Image.fromarray(record["image"]).save(png)
    capsys.readouterr()
    prompt = f"{IMAGE_MARKER}Caption: "
    argv = ["generate", "--checkpoint", str(run_dir), "--image", str(png), "--prompt", prompt]
    assert cli.main([*argv, "--temperature", "0", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed.startswith("[0.0] (")
    # The engine's greedy caption is what the training code's own greedy captioner writes.
    model, _, tok = load_for_inference(run_dir, vision=True)
    assert isinstance(model, Llava)
    prefix = shapes_format(model.cfg).prefix(tok)
    assert prefix[0] == model.cfg.image_token_id  # no BOS: the text prompt is the training prefix
    pixels = ImageProcessing.for_tower(model.cfg.vision, run_dir)(png)[None]
    graphdef, state = nnx.split(model)
    out = greedy_captions(
        graphdef, (state,), prefix, pixels, max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    ids = [int(t) for t in out[0] if t not in (tok.eos_id, tok.pad_id)]
    assert printed.split(") ", 1)[1] == tok.decode(ids)
    # One line for a prompt without the marker.
    assert (
        cli.main(["generate", "--checkpoint", str(run_dir), "--image", str(png), "--prompt", "Caption: "])
        == 2
    )
    assert "holds 0 image placeholders" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--preset", "tiny-moe"], "does not take --preset"),
        (["--steps", "0"], "ShapesRunConfig.steps=0 is invalid"),
        (["--data", "x.txt"], "does not take --data"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(tmp_path, capsys, extra, match):
    argv = ["train", "--task", "shapes-captions", "--out", str(tmp_path / "r"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_cli_refuses_shapes_captions_across_processes(tmp_path, capsys, monkeypatch):
    """Every process would train its own captioner into the same --out: refused."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert cli.main(["train", "--task", "shapes-captions", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "runs in one process" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_run_config_checks_fields():
    with pytest.raises(ValueError, match="patch_size=20 is invalid"):
        ShapesRunConfig(out_dir="x", patch_size=20)
    with pytest.raises(ValueError, match="warmup_steps=9 is invalid"):
        ShapesRunConfig(out_dir="x", steps=5, warmup_steps=9)
    # optax's cosine needs a step after the warmup: warmup_steps == steps is refused by name
    with pytest.raises(ValueError, match="warmup_steps=5 is invalid"):
        ShapesRunConfig(out_dir="x", steps=5, warmup_steps=5)
    # 64 image tokens leave no room for the prompt and caption in the rows
    with pytest.raises(ValueError, match="patch_size=8 is invalid: gives 64 image tokens"):
        ShapesRunConfig(out_dir="x", image_size=64, patch_size=8)


def test_thirds_layout_puts_each_shape_inside_its_grid_cell():
    from llmarch.data.shapes import LAYOUTS

    n = 48
    cfg = ShapesConfig(image_size=n, num_examples=100, layout="thirds", min_size=0.11, max_size=0.14)
    ds = ShapesDataset(cfg)
    cells = {p: (int(fy * 3), int(fx * 3)) for p, (fy, fx) in LAYOUTS["thirds"].items()}
    for i in range(len(ds)):
        image = ds[i]["image"]
        lit = image.any(-1)  # [H, W]
        owned = np.zeros_like(lit)
        for s in ds.shapes(i):
            r, c = cells[s.position]
            cell = lit[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
            assert cell.sum() > 40  # the whole shape is in its patch, ...
            owned[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = True
        assert not (lit & ~owned).any()  # ... and nothing is drawn outside the shapes' cells
    with pytest.raises(ValueError, match="max_size=0.16 is invalid"):
        ShapesConfig(layout="thirds", max_size=0.16, jitter=0.02)
    with pytest.raises(ValueError, match="layout='halves' is invalid"):
        ShapesConfig(layout="halves")
