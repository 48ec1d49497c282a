"""Train-step throughput (tokens/s) and MFU of tiny-dense and small-20m on this machine.

MFU needs the device's peak FLOP/s. For known accelerators it comes from
`llmarch.train.metrics.PEAK_FLOPS`; a CPU has no published figure, so here the "peak" is
measured: the best float32 matmul throughput XLA reaches on this machine (a 2048³ matmul),
and MFU is the train step's model FLOP/s (6N + attention, causal) over that. Timings are the
median of repeated steps after compilation, one shape per model, all in one process.

    python experiments/03_train_throughput.py [--steps 10]
"""

import argparse
import datetime
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from llmarch import accounting, machine, presets
from llmarch.model import Transformer
from llmarch.train import metrics
from llmarch.train.optim import OptimizerConfig, build_optimizer
from llmarch.train.step import make_train_step

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

device_kind = jax.devices()[0].device_kind
peak = metrics.peak_flops(device_kind)
peak_source = f"published peak of {device_kind}"
if peak is None:
    peak = machine.matmul_flops(2048, repeats=10)
    peak_source = "measured float32 matmul peak (2048³, best of 10)"

rows = []
for name, batch, seq in (("tiny-dense", 16, 128), ("small-20m", 8, 256)):
    cfg = presets.get(name)
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = build_optimizer(OptimizerConfig(), 1000)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 256)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params, opt_state, m = step(params, rest, opt_state, data)  # compile
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, m = step(params, rest, opt_state, data)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    tokens_per_s = batch * seq / seconds
    flops = accounting.train_flops_per_token(cfg, seq, causal=True)
    rows.append(
        (
            name,
            accounting.param_count(cfg),
            batch,
            seq,
            seconds * 1e3,
            tokens_per_s,
            flops * tokens_per_s / 1e9,
            accounting.mfu(tokens_per_s, flops, peak),
        )
    )

header = (
    "| model | params | batch × seq | step (ms, median) | tokens/s | model GFLOP/s | MFU |\n"
    "|---|---|---|---|---|---|---|"
)
table = "\n".join(
    f"| {n} | {p:,} | {b} × {s} | {ms:.1f} | {tps:,.0f} | {gf:.2f} | {u:.1%} |"
    for n, p, b, s, ms, tps, gf, u in rows
)
text = f"""# 03 train-step throughput and MFU

Command: `python experiments/03_train_throughput.py --steps {args.steps}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

Peak used for MFU: {peak / 1e9:.1f} GFLOP/s ({peak_source}). FLOPs per token: 6N + causal attention
(`llmarch.accounting.train_flops_per_token(..., causal=True)`); float32, AdamW, no remat.

{header}
{table}
"""
path = pathlib.Path(__file__).parent / "results" / "03_train_throughput.md"
path.write_text(text)
print(text)
print(f"wrote {path}")
