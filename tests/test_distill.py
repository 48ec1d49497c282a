"""Distillation: the divergences against their definitions (numpy, by hand), the objective's parts,
the config's errors, and a student distilled from a trained teacher beating the same student
trained on labels alone for the same steps; on-policy (GKD) steps sample from the student."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from llmarch import sources
from llmarch.cli import main
from llmarch.distill import DistillConfig, divergence, forward_kl, jsd, reverse_kl
from llmarch.train.config import TrainConfig

RNG = np.random.default_rng(0)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), -1)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_divergences_equal_their_definitions(tau):
    t, s = RNG.normal(size=(2, 3, 7)) * 2, RNG.normal(size=(2, 3, 7)) * 2
    p, q = _softmax(t / tau), _softmax(s / tau)
    np.testing.assert_allclose(forward_kl(jnp.asarray(t), jnp.asarray(s), tau), tau**2 * _kl(p, q), rtol=1e-5)
    np.testing.assert_allclose(reverse_kl(jnp.asarray(t), jnp.asarray(s), tau), tau**2 * _kl(q, p), rtol=1e-5)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        want = tau**2 * (beta * _kl(p, m) + (1 - beta) * _kl(q, m))
        np.testing.assert_allclose(jsd(jnp.asarray(t), jnp.asarray(s), tau, beta), want, rtol=1e-5, atol=1e-7)


def test_divergences_by_hand():
    """Two-token distributions worked out on paper: P = (0.5, 0.5), Q = (0.25, 0.75)."""
    t = jnp.log(jnp.array([0.5, 0.5]))
    s = jnp.log(jnp.array([0.25, 0.75]))
    np.testing.assert_allclose(forward_kl(t, s), 0.5 * np.log(2) + 0.5 * np.log(2 / 3), rtol=1e-6)
    np.testing.assert_allclose(reverse_kl(t, s), 0.25 * np.log(0.5) + 0.75 * np.log(1.5), rtol=1e-6)
    # JSD(1/2) is the Jensen-Shannon divergence: M = (0.375, 0.625)
    m = np.array([0.375, 0.625])
    want = 0.5 * _kl(np.array([0.5, 0.5]), m) + 0.5 * _kl(np.array([0.25, 0.75]), m)
    np.testing.assert_allclose(jsd(t, s, 1.0, 0.5), want, rtol=1e-6)
    # the temperature's square scales the softened divergence (Hinton et al.)
    np.testing.assert_allclose(forward_kl(2 * t, 2 * s, 2.0), 4 * forward_kl(t, s), rtol=1e-6)


def test_divergences_are_zero_on_equal_logits_and_handle_zero_probabilities():
    z = jnp.asarray(RNG.normal(size=(4, 9)))
    for name in ("forward_kl", "reverse_kl", "jsd"):
        np.testing.assert_allclose(divergence(name, z, z, temperature=1.5), 0.0, atol=1e-6)
    hard = jnp.array([[0.0, -1e9, 3.0]])  # the teacher puts no mass on token 1
    for name in ("forward_kl", "reverse_kl", "jsd"):
        assert np.isfinite(np.asarray(divergence(name, hard, jnp.zeros((1, 3))))).all()
    with pytest.raises(ValueError, match="divergence 'l2' is unknown"):
        divergence("l2", z, z)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss", "kl", "DistillConfig.loss='kl' is invalid"),
        ("temperature", 0.0, "DistillConfig.temperature=0.0 is invalid"),
        ("temperature", float("nan"), "temperature=nan is invalid"),
        ("alpha", 1.5, "DistillConfig.alpha=1.5 is invalid"),
        ("beta", 1.0, "DistillConfig.beta=1.0 is invalid"),
        ("on_policy_fraction", -0.1, "on_policy_fraction=-0.1 is invalid"),
        ("prompt_len", -1, "prompt_len=-1 is invalid"),
        ("teacher", "", "DistillConfig.teacher='' is invalid"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**{"teacher": "t", field: value})


def _cfg(out, **fields):
    base = dict(
        out_dir=str(out),
        preset="tiny-dense",
        seq_len=64,
        batch_size=8,
        steps=24,
        eval_every=24,
        eval_batches=4,
        checkpoint_every=24,
        log_every=4,
        progress=False,
        tensorboard=False,
    )
    return TrainConfig(**{**base, **fields})


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    """A toy corpus: text from a random first-order Markov chain over 16 letters, whose next-letter
    distributions a teacher can learn almost exactly, while a single sampled label says little."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnop"))
    transition = rng.dirichlet(np.full(16, 0.5), size=16)
    docs = []
    for _ in range(200):
        s = [rng.integers(16)]
        for _ in range(400):
            s.append(rng.choice(16, p=transition[s[-1]]))
        docs.append("".join(letters[s]))
    path = tmp_path_factory.mktemp("markov") / "markov.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def teacher(markov):
    """A tiny model trained on the chain until its loss nears the chain's entropy (~2.16 nats)."""
    out = markov.parent / "teacher"
    cfg = _cfg(out, data=str(markov), steps=150, eval_every=150, checkpoint_every=150, seed=1)
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=3e-3))
    assert sources.train(cfg, log=lambda s: None).val_loss < 2.3
    return out


def test_distilled_student_beats_the_label_trained_one(teacher, markov, tmp_path):
    """Hinton et al.'s claim on the toy task: with little data per step, the teacher's whole
    distribution teaches more than one sampled label (measured: ~2.51 against ~2.69 nats)."""

    def student(out, **fields):
        cfg = _cfg(
            out, data=str(markov), steps=48, eval_every=48, checkpoint_every=48, batch_size=2, seq_len=32
        )
        optimizer = dataclasses.replace(cfg.optimizer, learning_rate=3e-3)
        return dataclasses.replace(cfg, optimizer=optimizer, **fields)

    scratch = sources.train(student(tmp_path / "scratch"), log=lambda s: None)
    distilled = sources.train(
        student(tmp_path / "kd", distill=DistillConfig(teacher=str(teacher))), log=lambda s: None
    )
    # the same student, data order and steps: only the objective differs; validation is plain CE
    assert distilled.val_loss < scratch.val_loss - 0.08, (distilled.val_loss, scratch.val_loss)
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all("distill_loss" in r for r in records if "loss" in r)
    saved = json.loads((tmp_path / "kd" / "train_config.json").read_text())
    assert saved["distill"]["teacher"] == str(teacher.resolve())


def test_on_policy_steps_train_on_student_samples(teacher, tmp_path):
    kd = DistillConfig(teacher=str(teacher), loss="jsd", on_policy_fraction=0.5, prompt_len=16)
    result = sources.train(
        _cfg(tmp_path / "gkd", steps=8, eval_every=8, log_every=1, distill=kd), log=lambda s: None
    )
    records = [json.loads(line) for line in (tmp_path / "gkd" / "metrics.jsonl").read_text().splitlines()]
    flags = [r["on_policy"] for r in records if "on_policy" in r]
    assert len(flags) == 8 and 0 < sum(flags) < 8  # λ = 0.5 of 8 steps, drawn from seed and step
    assert np.isfinite(result.val_loss)
    # the draw is a function of (seed, step): the same steps again
    sources.train(_cfg(tmp_path / "gkd2", steps=8, eval_every=8, log_every=1, distill=kd), log=lambda s: None)
    again = [json.loads(line) for line in (tmp_path / "gkd2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in again if "on_policy" in r] == flags


def test_teacher_and_student_must_share_vocabulary_and_tokenizer(teacher, tmp_path):
    from llmarch import presets

    wide = presets.get("tiny-dense").replace(vocab_size=512)
    with pytest.raises(ValueError, match="vocab_size=320, the student 512: teacher and student must share"):
        sources.train(_cfg(tmp_path / "a", model=wide, distill=DistillConfig(teacher=str(teacher))))
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(ValueError, match="must share a tokenizer"):
        sources.train(_cfg(tmp_path / "b", tokenizer=str(tok), distill=DistillConfig(teacher=str(teacher))))
    with pytest.raises(FileNotFoundError, match="DistillConfig.teacher directory"):
        sources.train(_cfg(tmp_path / "c", distill=DistillConfig(teacher=str(tmp_path / "none"))))
    from llmarch.train.trainer import train

    with pytest.raises(ValueError, match="needs its teacher"):
        train(_cfg(tmp_path / "d", distill=DistillConfig(teacher=str(teacher))))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prompt_must_be_shorter_than_the_row():
    with pytest.raises(ValueError, match="DistillConfig.prompt_len=64 is invalid: must be shorter"):
        _cfg("x", distill=DistillConfig(teacher="t", prompt_len=64))


def test_cli_distill(teacher, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["distill", "--teacher", str(teacher), "--student-preset", "tiny-dense", "--loss", "reverse_kl"]
    args += ["--temperature", "2", "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--out", str(out)]
    assert main([*args, "--no-tensorboard", "--eval-every", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    saved = json.loads((out / "train_config.json").read_text())["distill"]
    assert saved["loss"] == "reverse_kl" and saved["temperature"] == 2.0
    assert main(["distill", "--teacher", str(teacher), "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --student-preset P or --student SRC" in capsys.readouterr().err
    assert (
        main([*args[:3], "--student-preset", "tiny-dense", "--loss", "l2", "--out", str(tmp_path / "y")]) == 2
    )
    assert "DistillConfig.loss='l2' is invalid" in capsys.readouterr().err
