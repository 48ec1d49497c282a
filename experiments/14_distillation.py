"""Knowledge distillation: a small student trained on labels alone against the same student trained on
a teacher's distributions, at equal steps, batch and data order; held-out loss, next to Hinton et
al. (2015), GKD (Agarwal et al., ICLR 2024) and MiniLLM (Gu et al. 2024); written to
experiments/results/14_distillation.md and 14_distillation.png.

The teacher is experiment 12's model (``experiments/_quant_exp.py``: Llama-style, D=256, 4 blocks,
F=768, 4.5M parameters, a 2048-token byte-level BPE learned on tinyshakespeare's training split),
reused from ``experiments/runs/12_quantization`` or trained there first (~15-25 min on 2 cores). The
student is the same architecture at D=128, 2 blocks, F=384, 2 heads of 64, with the same tokenizer,
sequence length (256), seed, data order, optimizer and steps. Six objectives, each through
``llmarch.sources.train`` (``TrainConfig.distill``):

1. scratch: cross-entropy on the labels only;
2. Hinton KD: forward KL at temperature 2 (times τ²), alpha 0.5 (half soft targets, half labels);
3. forward KL, alpha 1 (soft targets only, τ=1);
4. reverse KL, alpha 1 (MiniLLM's divergence, here without its policy-gradient training);
5. generalized JSD(β=0.5), alpha 1 (GKD's divergence on corpus text: "supervised KD");
6. on-policy GKD: JSD(0.5) where a fraction λ of the steps train on the student's own samples
   (temperature 1) continuing the first half of each row (``--on-policy``, ``--prompt-len``).

Phase 1 trains each from random weights (``--steps``). GKD and MiniLLM distil into students that
were first trained on labels, so phase 2 continues the scratch student of phase 1 (``init_from``)
``--warm-steps`` more steps with each objective (objective 1: more label training).

Reported per student: cross-entropy and perplexity over the whole held-out split of the teacher's
run (the last 10% of the text, never trained on), the forward KL to the teacher there, the gap to
the label-only student, wall seconds; and, as a proxy of generation quality (MiniLLM's and GKD's
concern), the teacher's loss on the student's sampled continuations of held-out prompts with their
distinct bigrams. The curves are the trainer's ``val_loss`` (the first ``eval_batches`` batches of the
same split) and its ``loss`` (cross-entropy on the corpus labels; on-policy steps left out).

    python experiments/14_distillation.py [--steps 300] [--warm-steps 100] [--runs scratch,fkl,...]
    python experiments/14_distillation.py --quick    # a ~2 minute smoke test (tiny teacher and student)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import shutil
import sys
import time

import _quant_exp as qx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import machine, sources
from llmarch.config import AttentionConfig, ModelConfig
from llmarch.distill import DistillConfig
from llmarch.inference.generate import generate
from llmarch.inference.loading import load_for_inference
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.heldout import make_evaluator
from llmarch.train.trainer import load_rows

HERE = pathlib.Path(__file__).resolve().parent
# key -> (label, DistillConfig fields; None: labels only). GKD's λ and prompt: command line.
RUNS = {
    "scratch": ("labels only", None),
    "hinton": ("Hinton KD: forward KL, τ=2, α=0.5", dict(loss="forward_kl", temperature=2.0, alpha=0.5)),
    "fkl": ("forward KL, α=1", dict(loss="forward_kl")),
    "rkl": ("reverse KL, α=1", dict(loss="reverse_kl")),
    "jsd": ("JSD(β=0.5), α=1", dict(loss="jsd", beta=0.5)),
    "gkd": ("on-policy GKD: JSD(β=0.5), λ={lam}", dict(loss="jsd", beta=0.5)),
}
SAMPLE_PROMPT, SAMPLE_NEW, SAMPLE_ROWS = 32, 96, 16  # held-out prompts continued by every model
TIE = 0.01  # nats: differences below this are not called a win (one seed per run)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="phase 1 steps (default 300; --quick 30)")
    parser.add_argument(
        "--warm-steps", type=int, default=None, help="phase 2 steps (100; --quick 10; 0: none)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows of 256 tokens per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="phase 1 peak learning rate (the teacher's)")
    parser.add_argument("--warm-lr", type=float, default=5e-4, help="phase 2 peak learning rate")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}")
    parser.add_argument("--on-policy", type=float, default=0.5, help="λ: share of GKD steps on samples")
    parser.add_argument("--prompt-len", type=int, default=0, help="GKD prompt tokens (0: half the row)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (1500; --quick 60)")
    parser.add_argument("--quick", action="store_true", help="tiny teacher, student and workload")
    parser.add_argument("--fresh", action="store_true", help="retrain students even if finished runs exist")
    parser.add_argument("--data", default=str(qx.DATA))
    parser.add_argument("--out", default=None, help="results file (default results/14_distillation.md)")
    args = parser.parse_args(argv)
    args.runs = tuple(r for r in args.runs.split(",") if r)
    if not args.runs or any(r not in RUNS for r in args.runs):
        parser.error(f"--runs {','.join(args.runs)!r}: each must be one of {', '.join(RUNS)}")
    if args.warm_steps and "scratch" not in args.runs:
        parser.error("--warm-steps > 0 continues the scratch student: --runs must include scratch")
    args.steps = args.steps or (30 if args.quick else 300)
    args.warm_steps = (10 if args.quick else 100) if args.warm_steps is None else args.warm_steps
    args.teacher_steps = args.teacher_steps or (60 if args.quick else 1500)
    return args


def student_config(vocab_size: int, quick: bool) -> ModelConfig:
    """The teacher's architecture at half the width and depth (a quarter of the blocks' weights):
    D=128, 2 blocks, F=384, 2 heads of 64 (``quick``: D=64, 1 block, F=192, 1 head of 64)."""
    d, layers, heads = (64, 1, 1) if quick else (128, 2, 2)
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d,
        num_layers=layers,
        ffn_dim=3 * d,
        max_seq_len=512,
        attention=AttentionConfig(num_heads=heads, num_kv_heads=heads, head_dim=64),
        name="student-quick" if quick else "student-1m",
    )


def run_config(base: TrainConfig, out, key: str, teacher, args, init_from=None) -> TrainConfig:
    """The teacher run's settings (data, tokenizer, split, seed and so the data order, optimizer)
    with the student, ``args``' steps and batch, and run ``key``'s objective; ``init_from``: phase 2,
    continuing that run's weights (its model config, so none is given here)."""
    fields = RUNS[key][1]
    distill = None
    if fields is not None:
        if key == "gkd":
            fields = dict(fields, on_policy_fraction=args.on_policy, prompt_len=args.prompt_len)
        distill = DistillConfig(teacher=str(teacher), **fields)
    steps, lr = (args.warm_steps, args.warm_lr) if init_from else (args.steps, args.lr)
    return dataclasses.replace(
        base,
        out_dir=str(out),
        model=None if init_from else student_config(base.model.vocab_size, args.quick),
        init_from=str(init_from) if init_from else None,
        batch_size=args.batch_size,
        steps=steps,
        eval_every=max(steps // 12, 1),
        eval_batches=8,
        log_every=max(steps // 30, 1),
        checkpoint_every=steps,
        distill=distill,
        optimizer=dataclasses.replace(base.optimizer, learning_rate=lr, warmup_steps=max(1, steps // 10)),
    )


def train_student(cfg: TrainConfig, fresh: bool) -> float:
    """Trains the run of ``cfg`` from its start and returns its wall seconds (teacher loading,
    compiling and evaluations included); a finished run of the same settings is reused unless
    ``fresh``."""
    out, settings = pathlib.Path(cfg.out_dir), cfg.to_json()
    done = out / "result.json"
    if not fresh and done.is_file() and json.loads(done.read_text())["settings"] == settings:
        seconds = json.loads(done.read_text())["seconds"]
        print(f"reused {out} ({seconds:.0f}s when trained)", flush=True)
        return seconds
    shutil.rmtree(out, ignore_errors=True)  # a partial or different run: never resumed into
    start = time.perf_counter()
    sources.train(cfg, log=lambda s: print(f"  {s}", flush=True))
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"settings": settings, "seconds": seconds}))
    return seconds


def held_out_scores(model, teacher, evaluation: np.ndarray, batch: int = 16) -> tuple[float, float]:
    """``(mean cross-entropy, mean KL(teacher ‖ model))`` per position over every row of
    ``evaluation [R, T+1]`` (one full forward pass per row, as ``_quant_exp.perplexity``)."""

    @jax.jit
    def sums(tokens):
        logp = jax.nn.log_softmax(model(tokens[:, :-1]).astype(jnp.float32), -1)  # [B, T, V]
        logt = jax.nn.log_softmax(teacher(tokens[:, :-1]).astype(jnp.float32), -1)
        nll = -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return nll, jnp.sum(jnp.exp(logt) * (logt - logp))

    totals = np.zeros(2)
    for i in range(0, len(evaluation), batch):
        totals += [float(x) for x in sums(jnp.asarray(evaluation[i : i + batch]))]
    nll, kl = totals / (evaluation.shape[0] * (evaluation.shape[1] - 1))
    return float(nll), float(kl)


def sample_scores(model, teacher, prompts: np.ndarray) -> tuple[float, float]:
    """``(teacher's mean loss on the sampled tokens, distinct-bigram fraction)`` of ``model``'s
    continuations (temperature 1, seed 0) of ``prompts [B, P]``: a mode-seeking student writes
    text its teacher finds likely, at the risk of repeating itself."""
    seq = generate(model, prompts, SAMPLE_NEW, temperature=1.0, seed=0)  # [B, P + new]
    logt = jax.nn.log_softmax(teacher(jnp.asarray(seq[:, :-1])).astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logt, jnp.asarray(seq[:, 1:, None]), -1)[:, prompts.shape[1] - 1 :]
    new = seq[:, prompts.shape[1] :]
    bigrams = {(r, a, b) for r, row in enumerate(new) for a, b in zip(row[:-1], row[1:], strict=True)}
    return float(jnp.mean(nll)), len(bigrams) / (new.shape[0] * (new.shape[1] - 1))


def n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_phase(keys, base, root, teacher_run, teacher, evaluation, prompts, args, init_from=None):
    """Trains (or reuses) one student per objective of ``keys`` and scores it: ``({key: row}, the
    last run's config)``."""
    rows, cfg = {}, None
    for key in keys:
        cfg = run_config(base, root / key, key, teacher_run, args, init_from)
        print(f"== {root.name}/{key}", flush=True)
        seconds = train_student(cfg, args.fresh)
        student = load_for_inference(cfg.out_dir)[0]
        ce, kl = held_out_scores(student, teacher, evaluation)
        nll, distinct = sample_scores(student, teacher, prompts)
        records = metrics.read(pathlib.Path(cfg.out_dir) / "metrics.jsonl")
        rows[key] = dict(
            val_ce=ce,
            kl=kl,
            sample_nll=nll,
            distinct2=distinct,
            seconds=seconds,
            params=n_params(student),
            val=[(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
            # an on-policy step's CE is against the student's own samples, not the corpus
            train=[(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("on_policy")],
        )
        print(f"   held-out CE {ce:.4f} (ppl {math.exp(ce):.2f}), KL to teacher {kl:.4f}, {seconds:.0f}s")
    return rows, cfg


def plot(path: pathlib.Path, labels: dict, phases: list, teacher_curve_loss: float, t_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    panels = [(f"{title}: validation CE", rows, "val") for title, rows in phases]
    panels.insert(1, (f"{phases[0][0]}: training CE on corpus labels", phases[0][1], "train"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (title, rows, kind) in zip(axes, panels, strict=True):
        for key, r in rows.items():
            ax.plot(
                *zip(*r[kind], strict=True), marker="o" if kind == "val" else None, ms=3, label=labels[key]
            )
        ax.axhline(teacher_curve_loss, color="k", ls="--", lw=1, label=f"{t_name} validation CE")
        values = [v for r in rows.values() for _, v in r[kind][len(r[kind]) // 4 :]]
        ax.set_ylim(min(teacher_curve_loss, *values) - 0.1, max(values) + 0.1)  # not the first steps' ~7.6
        ax.set(title=title, xlabel="step", ylabel="nats per token")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(a: float, b: float) -> str:
    return "a tie" if abs(a - b) < TIE else "lower" if a < b else "higher"


def verdict(rows: dict, labels: dict, phase: str) -> list[str]:
    """Sentences from one phase's numbers: distillation against labels, then each paper's claim."""
    out, loss = [], {k: r["val_ce"] for k, r in rows.items()}
    base = loss.get("scratch")
    if base is not None and len(loss) > 1:
        best = min((k for k in loss if k != "scratch"), key=loss.get)
        wins = [labels[k] for k, v in loss.items() if k != "scratch" and v < base - TIE]
        out.append(
            f"{phase}: a distilled student beats the label-only one at equal steps: "
            f"**{'yes' if wins else 'no'}**. Best: {labels[best]}, {loss[best]:.4f} against {base:.4f} "
            f"nats ({loss[best] - base:+.4f}, perplexity {math.exp(loss[best] - base) - 1:+.1%}); more than "
            f"{TIE} nats below labels only: {', '.join(wins) or 'none'}."
        )
        kd = [k for k in ("hinton", "fkl") if k in loss]
        if kd:
            out.append(
                "Hinton et al. (2015), soft targets teach a small model more than one-hot labels: "
                + "; ".join(f"{labels[k]} {loss[k] - base:+.4f} nats ({compare(loss[k], base)})" for k in kd)
                + "."
            )
    if "rkl" in rows and "fkl" in rows:
        r, f = rows["rkl"], rows["fkl"]
        out.append(
            f"Gu et al. 2024 (MiniLLM), reverse KL is mode seeking and gives better generations than "
            f"forward KL (not better perplexity): held-out CE {r['val_ce'] - f['val_ce']:+.4f} nats from "
            f"forward KL's; the teacher's loss on its samples {r['sample_nll']:.3f} against "
            f"{f['sample_nll']:.3f} ({compare(r['sample_nll'], f['sample_nll'])}; lower is the paper's "
            f"direction), distinct bigrams {r['distinct2']:.1%} against {f['distinct2']:.1%}."
        )
    if "gkd" in rows and "jsd" in rows:
        g, j = rows["gkd"], rows["jsd"]
        out.append(
            f"Agarwal et al. 2024 (GKD), on-policy JSD beats supervised JSD: held-out CE "
            f"{g['val_ce'] - j['val_ce']:+.4f} nats ({compare(g['val_ce'], j['val_ce'])}); the teacher's "
            f"loss on its samples {g['sample_nll']:.3f} against {j['sample_nll']:.3f} "
            f"({compare(g['sample_nll'], j['sample_nll'])}); "
            f"{g['seconds'] / j['seconds']:.1f}x the wall time."
        )
    return out


def table(rows: dict, labels: dict, teacher_row: str | None = None) -> str:
    base = rows.get("scratch", {}).get("val_ce")
    lines = [
        "| student | held-out CE | perplexity | vs labels only | KL(teacher‖student) | curve's last "
        "val_loss | teacher's loss on its samples | distinct bigrams | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        vs = "—" if base is None or key == "scratch" else f"{r['val_ce'] - base:+.4f}"
        lines.append(
            f"| {labels[key]} | {r['val_ce']:.4f} | {math.exp(r['val_ce']):.2f} | {vs} | {r['kl']:.4f} "
            f"| {r['val'][-1][1]:.4f} | {r['sample_nll']:.3f} | {r['distinct2']:.1%} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines + ([teacher_row] if teacher_row else []))


def main(argv=None) -> None:
    args = parse_args(argv)
    data = pathlib.Path(args.data)
    if not data.is_file():
        sys.exit(f"{data} is absent: this experiment needs the shared tinyshakespeare corpus")
    began = time.perf_counter()
    teacher_run = HERE / "runs" / ("12_quantization-quick" if args.quick else "12_quantization")
    trained = qx.ensure_trained(teacher_run, args.teacher_steps, args.quick, data)
    base = trained["config"]
    teacher, teacher_cfg, _ = load_for_inference(teacher_run)
    root = HERE / "runs" / ("14_distillation-quick" if args.quick else "14_distillation")
    labels = {k: RUNS[k][0].format(lam=args.on_policy) for k in args.runs}

    _, evaluation = qx.held_out(base)  # the teacher run's whole validation split, [R, T+1]
    prompts = evaluation[:SAMPLE_ROWS, :SAMPLE_PROMPT]
    common = (base, teacher_run, teacher, evaluation, prompts, args)
    cold, first = train_phase(args.runs, base, root, *common[1:])
    warm = {}
    if args.warm_steps:
        warm, _ = train_phase(args.runs, base, root / "warm", *common[1:], init_from=root / "scratch")

    T = base.seq_len
    t_ce, _ = held_out_scores(teacher, teacher, evaluation)
    t_nll, t_distinct = sample_scores(teacher, teacher, prompts)
    train_rows, val_rows = load_rows(first.resolved())
    tokens = np.asarray(train_rows.tokens, np.int32)
    t_train_ce, _ = held_out_scores(
        teacher, teacher, np.stack([tokens[i * T : i * T + T + 1] for i in range(64)])
    )
    graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
    curve_eval = make_evaluator(graphdef, val_rows, batch_size=first.batch_size, batches=first.eval_batches)
    t_curve = curve_eval(params, rest)  # on the students' curves' part of the split
    seconds = time.perf_counter() - began

    # -- the results ----------------------------------------------------------------------------
    path = (
        pathlib.Path(args.out)
        if args.out
        else (root if args.quick else HERE / "results") / "14_distillation.md"
    )
    path.parent.mkdir(parents=True, exist_ok=True)  # a smoke test's results stay beside its runs
    t_name = f"teacher ({n_params(teacher) / 1e6:.1f}M)"
    phases = [(f"phase 1 ({args.steps} steps from random weights)", cold)]
    if warm:
        phases.append((f"phase 2 ({args.warm_steps} steps from the label-only student)", warm))
    plot(path.with_suffix(".png"), labels, phases, t_curve, t_name)
    t_row = (
        f"| {t_name} | {t_ce:.4f} | {math.exp(t_ce):.2f} | — | 0 | {t_curve:.4f} | {t_nll:.3f} "
        f"| {t_distinct:.1%} | — |"
    )
    memorized = (
        "it has memorized much of its 1 MB corpus, and the students distil its distributions on that "
        "same training text, where they are sharper than on new text"
        if t_train_ce < t_ce - 0.2
        else "it fits its training text about as well as new text"
    )
    s, s_params = student_config(teacher_cfg.vocab_size, args.quick), cold[args.runs[0]]["params"]
    how = "reused" if trained["reused"] else "trained in this run"
    command = "python experiments/14_distillation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    warm_text = "Phase 2 was not run (`--warm-steps 0`)."
    if warm:
        steps = args.warm_steps
        warm_text = f"""Each objective continues phase 1's label-only student for {steps} more steps
(`init_from`:
its weights, a fresh optimizer, peak learning rate {args.warm_lr:g} with {max(1, args.warm_steps // 10)}
warmup steps, the same first batches as phase 1 again), the setting of GKD and MiniLLM, whose students
start from supervised fine-tuned models. "labels only" is simply more label training.

{table(warm, labels)}

{chr(10).join(f"- {line}" for line in verdict(warm, labels, "Phase 2"))}"""
    gkd = ""
    if "gkd" in args.runs:
        gkd = (
            f" On-policy GKD: a share λ={args.on_policy} of the steps (drawn from seed and step) replace the "
            f"batch by the student's samples at temperature 1 (`llmarch.inference.generate`, KV cache) "
            f"continuing the first {args.prompt_len or T // 2} tokens of each row to {T + 1} tokens; "
            "those steps train on JSD alone over the sampled positions and see no corpus labels."
        )
    tokens = args.steps * first.batch_size * T / 1e6
    text = f"""# 14 Knowledge distillation into a 5x smaller student

Command: `{command.strip()}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Teacher: experiment 12's `{teacher_cfg.name}` ({n_params(teacher) / 1e6:.2f}M parameters:
D={teacher_cfg.d_model}, {teacher_cfg.num_layers} blocks, F={teacher_cfg.ffn_dim}), {trained["steps"]} steps
of {base.batch_size}x{T} tokens on tinyshakespeare ({how}). Its held-out loss is {t_ce:.4f} nats,
on 64 rows of its own training text {t_train_ce:.4f}: {memorized}.

Students: D={s.d_model}, {s.num_layers} block(s), F={s.ffn_dim}, {s.attention.num_heads} head(s) of
{s.attention.head_dim}, the teacher's {s.vocab_size}-token tokenizer ({s_params / 1e6:.2f}M parameters,
{s_params / n_params(teacher):.0%} of the teacher's; embedding and LM head are
{2 * s.vocab_size * s.d_model / s_params:.0%} of them), trained in batches of {first.batch_size}x{T}
tokens, seed {first.seed} (the same batches in the same order), AdamW, cosine schedule. Only the
objective differs.{gkd}

Held-out CE: the mean next-token cross-entropy over the teacher run's whole validation split (the
last 10% of the text: {evaluation.shape[0]} rows of {T} tokens, never trained on); perplexity its exp;
KL(teacher‖student) over the same positions. Curve's last val_loss: the trainer's evaluation (the
first {first.eval_batches} batches of that split), as plotted. Samples: {SAMPLE_ROWS} held-out prompts of
{SAMPLE_PROMPT} tokens continued by {SAMPLE_NEW} tokens at temperature 1 (seed 0), scored by the teacher.
Wall s: the training call (teacher loading, compiling, sampling and evaluations included; a reused
run shows the seconds it took when trained). Differences under {TIE} nats are called ties: every
row is one seed. Whole experiment {seconds / 60:.1f} min.

## Phase 1: {args.steps} steps from random weights ({tokens:.2f}M tokens, peak learning rate {args.lr:g})

{table(cold, labels, t_row)}

{chr(10).join(f"- {line}" for line in verdict(cold, labels, "Phase 1 (the issue's done-when)"))}

## Phase 2: distilling into the label-trained student

{warm_text}

![curves](14_distillation.png)

Hinton et al. (2015) multiply the softened divergence by τ² so its gradients keep their weight
against the label loss at any τ (`llmarch.distill.losses`); the τ=2, α=0.5 rows use that scaling.
"""
    path.write_text(text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
