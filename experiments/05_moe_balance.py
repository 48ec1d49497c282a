"""tiny-moe on tinyshakespeare: does auxiliary-loss-free balancing keep the experts evenly loaded?

Trains `tiny-moe` (Mixtral-style, 8 experts, top-2) with `llmarch.train.trainer` three ways: no
balancing at all; DeepSeek-V3's auxiliary-loss-free balancing (a non-trainable per-expert bias b_i
added to the routing scores, b_i += γ·sign(mean load − load_i) after every step); and, for
reference, the Switch-style auxiliary loss. Reports the max/mean expert load ratio (1 = perfectly
balanced) that the trainer logs, and the validation loss. Writes experiments/results/05_moe_balance.md.

    python experiments/05_moe_balance.py [--steps 150]
"""

import argparse
import datetime
import pathlib
import tempfile
import time

import numpy as np

from llmarch import machine, presets
from llmarch.config import MoEConfig
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.optim import OptimizerConfig
from llmarch.train.trainer import train

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "05_moe_balance.md"

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--gamma", type=float, default=5e-3)
args = parser.parse_args()
if not DATA.is_file():
    raise SystemExit(f"{DATA} is absent: this experiment needs the shared tinyshakespeare corpus")

base = presets.get("tiny-moe")
moe = dict(num_experts=base.moe.num_experts, top_k=base.moe.top_k, expert_dim=base.moe.expert_dim)
RUNS = {
    "none": MoEConfig(**moe),
    f"aux-loss-free (γ={args.gamma:g})": MoEConfig(**moe, router_bias=True, bias_update_rate=args.gamma),
    "Switch aux loss (α=0.01)": MoEConfig(**moe, aux_loss_coef=0.01),
}
LOG_EVERY = 10

rows, curves = [], {}
for name, moe_cfg in RUNS.items():
    out = tempfile.mkdtemp(prefix="llmarch-moe-balance-")
    cfg = TrainConfig(
        out_dir=out,
        model=base.replace(moe=moe_cfg),
        data=str(DATA),
        tokenizer="byte",
        steps=args.steps,
        seq_len=128,
        batch_size=16,
        eval_every=args.steps,
        eval_batches=8,
        log_every=LOG_EVERY,
        checkpoint_every=args.steps,
        tensorboard=False,
        progress=False,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=15, weight_decay=0.01),
    )
    start = time.perf_counter()
    result = train(cfg, log=lambda s: None)
    seconds = time.perf_counter() - start
    records = [r for r in metrics.read(pathlib.Path(out) / "metrics.jsonl") if "load_ratio" in r]
    curves[name] = [(r["step"], r["load_ratio"]) for r in records]
    late = [r for r in records if r["step"] > args.steps // 2]  # the second half of training
    loads = np.array(late[-1]["expert_load"])  # [layers, E] at the last logged step
    rows.append(
        (
            name,
            np.mean([r["load_ratio"] for r in late]),
            np.mean([r["load_ratio_max"] for r in late]),
            loads.max(1) / loads.mean(1),
            result.val_loss,
            seconds,
        )
    )
    print(f"{name}: load ratio {rows[-1][1]:.3f}, val loss {result.val_loss:.4f}, {seconds:.0f} s")

table = "\n".join(
    f"| {n} | {mean:.3f} | {worst:.3f} | {', '.join(f'{v:.2f}' for v in last)} | {val:.4f} | {s:.0f} |"
    for n, mean, worst, last, val, s in rows
)
steps = [s for s, _ in next(iter(curves.values()))]
curve = "\n".join(
    f"| {s} | " + " | ".join(f"{dict(c)[s]:.3f}" for c in curves.values()) + " |" for s in steps
)
none_ratio, free_ratio = rows[0][1], rows[1][1]
text = f"""# 05 MoE load balancing: auxiliary-loss-free bias vs none

`tiny-moe` (D=64, 2 layers, each an MoE of 8 SwiGLU experts of width 128, softmax top-2 routing,
dropless), trained {args.steps} steps on tinyshakespeare (byte tokens, 16 × 128 tokens per step,
AdamW 3e-3) through `llmarch.train.trainer`. The load of expert i is its share of the step's
token-expert assignments; the ratio is max_i load_i / mean_i load_i per MoE layer (1.0 = every
expert gets the same number of tokens, 4.0 = two experts get everything). "mean" averages the
layers' ratios, "worst layer" takes the largest, both averaged over the logged steps of the second
half of training (every {LOG_EVERY} steps, each step's own batch).

| balancing | load ratio, layer mean | load ratio, worst layer | per layer, last step | val loss | wall (s) |
|---|---|---|---|---|---|
{table}

Auxiliary-loss-free balancing brings the mean max/mean load ratio from {none_ratio:.3f} to
{free_ratio:.3f} without adding any term to the loss: the bias only changes which experts are
selected, never the gate values (DeepSeek-V3, §2.1.2).

Load ratio during training (mean of layers):

| step | {" | ".join(RUNS)} |
|---|{"---|" * len(RUNS)}
{curve}

Machine: {machine.describe()}. Written {datetime.date.today()} by `python experiments/05_moe_balance.py
--steps {args.steps} --gamma {args.gamma:g}`.
"""
RESULTS.parent.mkdir(exist_ok=True)
RESULTS.write_text(text)
print(text)
