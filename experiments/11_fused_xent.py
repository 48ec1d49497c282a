"""Peak memory and step time of a train step: plain loss vs the fused, vocabulary-chunked one.

A small Llama-shaped model (d=256, 2 layers, GQA 8/4, F=688) with Llama 3's vocabulary
(V=128,256), so the logits, not the model, dominate memory: B×T = 8×256 tokens of float32
logits are 1.05 GB. Each train step (``llmarch.train.step.make_train_step``, AdamW, float32,
donated state as the trainer runs it) is compiled once per loss, and XLA's compiled memory
statistics (``jit(...).lower(...).compile().memory_analysis()``) give its temporaries and its
peak (arguments + outputs + temporaries − donated aliases). The plain loss is
``loss_chunk=None`` (the model's ``[B,T,V]`` logits, optax's cross entropy); the fused one is the
default ``loss_chunk`` (``llmarch.ops.cross_entropy``: on CPU, a loop over vocabulary chunks).

Step times: the contenders interleaved in one process, ``--repeats`` rounds after a warm-up,
medians; the ratio is the result (the machine is shared: its load average is recorded).

On a TPU or GPU (where the fused loss runs the Pallas kernels) the script also times the op
alone at a larger shape, kernels against the XLA path and the reference, with their errors, and
writes ``results/11_fused_xent_<platform>.md``; ``--kernels`` runs that part on a CPU too
(interpreted: a smoke test, not a timing).

    python experiments/11_fused_xent.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kernels_pallas.cross_entropy import cross_entropy_reference
from llmarch import machine, ops
from llmarch.config import AttentionConfig, ModelConfig
from llmarch.model import Transformer
from llmarch.train.step import DEFAULT_LOSS_CHUNK, loss_fn, make_train_step

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=256)
parser.add_argument(
    "--kernels",
    action="store_true",
    help="also time the kernels on CPU (always on TPU/GPU; interpreted here)",
)
parser.add_argument("--kernel-tokens", type=int, default=8192)
parser.add_argument("--kernel-width", type=int, default=2048)
args = parser.parse_args()

V, B, T = 128_256, args.batch, args.seq
MEMORY_CHUNKS = (None, 2048, DEFAULT_LOSS_CHUNK, 32768)  # None: the plain loss
TIMED_CHUNKS = (None, DEFAULT_LOSS_CHUNK, 32768)


def model_config(tie: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=V,
        d_model=256,
        num_layers=2,
        ffn_dim=688,
        attention=AttentionConfig(num_heads=8, num_kv_heads=4, head_dim=32),
        max_seq_len=T,
        tie_embeddings=tie,
        name="llama-shaped d256 L2 V128256",
    )


def setup(tie: bool):
    graphdef, params, rest = nnx.split(Transformer(model_config(tie), rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.adamw(1e-3)
    tokens = jax.random.randint(jax.random.key(0), (B, T + 1), 0, V)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return graphdef, tx, params, rest, tx.init(params), batch


def label(chunk) -> str:
    return "plain ([B,T,V] logits)" if chunk is None else f"fused, chunk {chunk:,}"


def kernel_section() -> str:
    """The op alone at a larger shape (bfloat16 x and w, V=128,256): the Pallas kernels against
    the XLA path and the reference, value and gradients of ``Σ nll + 1e-4·Σ lse²``."""
    N, D = args.kernel_tokens, args.kernel_width
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (N, D), jnp.bfloat16)
    w = (jax.random.normal(k[1], (V, D)) * D**-0.5).astype(jnp.bfloat16)
    labels = jax.random.randint(k[2], (N,), 0, V)
    contenders = {
        "reference ([N,V] logits)": lambda x, w: cross_entropy_reference(x, w, labels),
        f"XLA path, chunk {DEFAULT_LOSS_CHUNK:,}": lambda x, w: ops.cross_entropy(x, w, labels, impl="xla"),
        "Pallas kernels": lambda x, w: ops.cross_entropy(x, w, labels, impl="pallas"),
    }
    results = {}
    for name, fn in contenders.items():

        def loss(x, w, fn=fn):
            nll, lse = fn(x, w)
            return jnp.sum(nll) + 1e-4 * jnp.sum(jnp.square(lse))

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
        out = jax.block_until_ready(f(x, w))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(x, w))
            times.append(time.perf_counter() - start)
        results[name] = (out, temp, statistics.median(times))
    ref = next(iter(results.values()))[0]

    def err(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    model_flops = 6 * N * D * V  # forward and backward matmuls, the recomputation not counted
    rows = "\n".join(
        f"| {name} | {temp:,} | {t * 1e3:.2f} | {model_flops / t / 1e12:.1f} | {err(out[0], ref[0]):.1e} "
        f"| {err(out[1][0], ref[1][0]):.1e} | {err(out[1][1], ref[1][1]):.1e} |"
        for name, (out, temp, t) in results.items()
    )
    return f"""
## The op alone on {jax.devices()[0].device_kind}: N={N:,} tokens, D={D:,}, V={V:,}, bfloat16

Value and gradients of `Σ nll + 1e-4·Σ lse²`, median of {args.repeats} runs; errors are
max |Δ| / max |reference| (loss, dx, dW); TFLOP/s counts the 6·N·D·V model FLOPs.

| implementation | temporaries (bytes) | time (ms) | model TFLOP/s | loss err | dx err | dW err |
|---|---|---|---|---|---|---|
{rows}
"""


def loss_gradient_temp(graphdef, params, rest, batch, chunk) -> int:
    """Temporaries of the loss's gradient alone (no optimizer update, no guard)."""
    grad = jax.grad(lambda p: loss_fn(graphdef, p, rest, batch, loss_chunk=chunk)[0])
    return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes


GB = 1e9
load_before = os.getloadavg()
memory_rows = []
for tie in (False, True):
    graphdef, tx, params, rest, opt_state, batch = setup(tie)
    for chunk in MEMORY_CHUNKS:
        step = make_train_step(graphdef, tx, donate=True, loss_chunk=chunk)
        stats = step.lower(params, rest, opt_state, batch).compile().memory_analysis()
        peak = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
        grad_temp = loss_gradient_temp(graphdef, params, rest, batch, chunk)
        memory_rows.append((tie, chunk, stats.temp_size_in_bytes, peak, grad_temp))
        print(
            f"tie={tie} {label(chunk)}: temp {stats.temp_size_in_bytes / GB:.3f} GB, peak {peak / GB:.3f} GB"
        )

# Timing (untied, as Llama 3): each contender's state is its own (donated), same initial values.
graphdef, tx, params, rest, opt_state, batch = setup(False)
contenders = {}
for chunk in TIMED_CHUNKS:
    step = make_train_step(graphdef, tx, donate=True, loss_chunk=chunk)
    state = jax.tree.map(lambda x: x.copy(), (params, opt_state))
    state = step(state[0], rest, state[1], batch)[:2]  # compile and warm up
    jax.block_until_ready(state)
    contenders[chunk] = [step, state, []]
for _ in range(args.repeats):
    for entry in contenders.values():
        step, (p, o), times = entry
        start = time.perf_counter()
        p, o, metrics = step(p, rest, o, batch)
        jax.block_until_ready((p, o, metrics))
        times.append(time.perf_counter() - start)
        entry[1] = (p, o)
load_after = os.getloadavg()
median = {chunk: statistics.median(entry[2]) for chunk, entry in contenders.items()}

logits_gb = B * T * V * 4 / GB
load = f"Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} (a shared machine)"
plain = {row[0]: row for row in memory_rows if row[1] is None}
memory_table = "\n".join(
    f"| {'tied' if tie else 'untied'} | {label(chunk)} | {temp:,} | {peak:,} | {peak / GB:.3f} "
    f"| {peak / plain[tie][3]:.2f} | {grad_temp:,} | {grad_temp / plain[tie][4]:.2f} |"
    for tie, chunk, temp, peak, grad_temp in memory_rows
)
timing_table = "\n".join(
    f"| {label(chunk)} | {median[chunk] * 1e3:,.0f} | {B * T / median[chunk]:,.0f} "
    f"| {median[chunk] / median[None]:.2f} | {', '.join(f'{t * 1e3:.0f}' for t in contenders[chunk][2])} |"
    for chunk in TIMED_CHUNKS
)
text = f"""# 11 fused cross entropy: train-step memory and time, plain vs vocabulary-chunked loss

Command: `python experiments/11_fused_xent.py --repeats {args.repeats}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}  \n{load}

Model: d=256, 2 layers, GQA 8/4 (head dim 32), F=688, V={V:,}; AdamW, float32, state donated;
B×T = {B}×{T} = {B * T:,} tokens, whose float32 logits alone are {logits_gb:.3f} GB.

## Compiled memory (`memory_analysis()`), bytes

Train step: peak = arguments + outputs + temporaries − donated aliases. Its temporaries also
hold the gradients, the optimizer's update and the finite guard's candidate state, whatever the
loss; the last two columns are the temporaries of the loss's gradient alone (`jax.grad` of
`loss_fn`, the parameter gradients included).

| head | loss | step temps | step peak | peak (GB) | peak / plain | loss-gradient temps | / plain |
|---|---|---|---|---|---|---|---|
{memory_table}

## Step time on this CPU (untied head)

Median of {args.repeats} interleaved steps per contender after a warm-up step.

| loss | step (ms, median) | tokens/s | time / plain | all steps (ms) |
|---|---|---|---|---|
{timing_table}
"""
if args.kernels or jax.default_backend() != "cpu":
    text += kernel_section()
platform = jax.devices()[0].platform
name = "11_fused_xent.md" if platform == "cpu" else f"11_fused_xent_{platform}.md"
path = pathlib.Path(__file__).parent / "results" / name
path.write_text(text)
print(text)
print(f"wrote {path}")
