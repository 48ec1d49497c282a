"""Pipeline parallelism: the bubble and the activation memory of GPipe, 1F1B (PipeDream-Flush) and
interleaved 1F1B, counted in the schedules llmarch runs and read off the compiled programs.

1. For p = 2, 4, 8 stages and m microbatches: the idle fraction of every schedule's table
   (``llmarch.pipeline_schedule``: idle stage-ticks over all stage-ticks) against the papers'
   ``(p-1)/(m+p-1)`` (GPipe, 1F1B) and ``(p-1)/(v·m+p-1)`` (interleaved, v = 2), and the most
   microbatches the busiest device holds between a forward and its backward (in whole-stage units).
2. On 8 simulated CPU devices (stage=4, data=2), a tiny dense model's pipelined loss and gradient
   (``llmarch.pipeline.pipeline_loss``) compiled per schedule: XLA's temporary memory per device,
   the buffer slots the schedule allocates, and the loss against one device's.
3. On stage=2, tensor=2, data=2: the per-device memory of the compiled pipeline with ``tensor`` a
   tensor-parallel axis inside the stages ("tp" rules) against ``tensor`` as a row split ("dp").

Writes experiments/results/23_pipeline.md.

    python experiments/23_pipeline.py
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import llmarch  # noqa: E402
from llmarch import machine, pipeline, sharding  # noqa: E402
from llmarch import pipeline_schedule as ps  # noqa: E402
from llmarch.train.step import loss_fn  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "23_pipeline.md"

# 1. The schedules' tables ---------------------------------------------------------------------------------

rows = []
for p in (2, 4, 8):
    for m in (p, 2 * p, 4 * p, 8 * p):
        for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
            s = ps.build(name, p, m, v)
            rows.append(
                f"| {p} | {m} | {name}{f' (v={v})' if v > 1 else ''} | {s.ticks} | {s.bubble():.4f} "
                f"| {s.ideal_bubble():.4f} | {max(s.in_flight)} | {s.activation_stages():.2f} |"
            )
table1 = "\n".join(
    [
        "| p | m | schedule | ticks | measured bubble | paper's bubble | peak in-flight (chunks) "
        "| peak activations (stages) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
)
print(table1)

# 2. The compiled programs ---------------------------------------------------------------------------------

P, DATA, M, B, T = 4, 2, 8, 16, 64
cfg = llmarch.presets.get("tiny-dense").replace(num_layers=8, max_seq_len=T)
model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
batch = {k: jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32) for k in ("inputs", "targets")}
gd, params, rest = nnx.split(model, nnx.Param, ...)
ref = float(loss_fn(gd, params, rest, batch, loss_chunk=None)[0])
mesh = sharding.make_mesh(f"stage={P},data={DATA}")
rows = []
for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):

    def loss(params, name=name, v=v):
        mdl = nnx.merge(gd, params, rest)
        return pipeline.pipeline_loss(mdl, batch, mesh=mesh, schedule=name, microbatches=M, virtual=v)[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    value, _ = compiled(params)
    s = ps.build(name, P, M, v)
    slot = B // M // DATA * T * cfg.d_model * 4  # one [b, T, D] float32 buffer slot per device
    rows.append(
        f"| {name}{f' (v={v})' if v > 1 else ''} | {s.act_slots} + {s.grad_slots} | "
        f"{(s.act_slots + s.grad_slots + 2) * slot / 1024:.0f} | {temp / 1024:.0f} "
        f"| {float(value):.6f} | {ref:.6f} |"
    )
table2 = "\n".join(
    [
        "| schedule | activation + gradient slots | buffers KiB (incl. 2 empty slots) "
        "| XLA temp KiB per device | pipelined loss | one-device loss |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
)
print(table2)

# 3. tensor inside the stages: a model axis (the "tp" rules) against one more row split ("dp") ------------

TP_MESH, TP_M = "stage=2,tensor=2,data=2", 4
tp_mesh = sharding.make_mesh(TP_MESH)
rows3 = []
for rules in ("dp", "tp"):
    table = sharding.with_stage_layers(rules)  # the trainer's placement: each stage's layers on its devices
    placed = sharding.shard_state(params, tp_mesh, table)

    def loss(params, rules=rules):
        mdl = nnx.merge(gd, params, rest)
        return pipeline.pipeline_loss(
            mdl, batch, mesh=tp_mesh, schedule="1f1b", microbatches=TP_M, rules=rules
        )[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(placed).compile()
    mem = compiled.memory_analysis()
    row_axes, model_axes = pipeline.stage_axes(dict(tp_mesh.shape), sharding.rules(rules))
    value, _ = compiled(placed)
    program = compiled.as_text()
    rows3.append(
        f"| {rules} | {', '.join(model_axes) or '—'} | {', '.join(row_axes)} "
        f"| {mem.argument_size_in_bytes / 1024:.0f} | {mem.output_size_in_bytes / 1024:.0f} "
        f"| {mem.temp_size_in_bytes / 1024:.0f} | {program.count(' all-reduce(')} | {float(value):.6f} |"
    )
table3 = "\n".join(
    [
        "| rules | model axes in a stage | row axes | arguments KiB per device | outputs (gradients) KiB "
        "| XLA temp KiB | all-reduce ops | pipelined loss |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *rows3,
    ]
)
print(table3)

text = f"""# 23: pipeline parallelism, bubble and activation memory per schedule

{datetime.date.today()}; `python experiments/23_pipeline.py`; {machine.describe()}; 8 simulated CPU devices.

## 1. Bubble and in-flight activations of the schedules llmarch runs

One tick is one forward or one backward of one (virtual) stage on one microbatch, counted alike
(`llmarch.pipeline_schedule`); the measured bubble is idle stage-ticks over all stage-ticks of the
timed table; "in-flight" counts the microbatch inputs the busiest device holds between a forward
and its backward (chunks of `1/v` of a stage for interleaved; the stages column divides by v).

{table1}

- The measured bubble equals `(p-1)/(m+p-1)` for GPipe and 1F1B and `(p-1)/(v·m+p-1)` for the
  interleaved schedule in every row (also asserted in `tests/test_pipeline_parallel.py`).
- GPipe holds all m microbatches per stage; 1F1B at most p (stage d: `p-d`), independent of m;
  interleaved `p·(1 + (p-1)/(p·v))` stages' worth on the first device (Megatron-LM, §2.2) once m
  is large enough for its warm-up.

## 2. The compiled pipelines (stage={P}, data={DATA}, m={M}, tiny-dense with 8 layers, B={B}, T={T})

{table2}

- The buffer column is what the schedule allocates for stage inputs (kept for the backward's
  recompute) and incoming gradients: an SPMD program gives every device the busiest device's
  slots. XLA's temporary memory adds the scan's other carries (the gradient accumulators of the
  stage's weights and of the embedding and head, which every device holds whole) and one stage's
  backward; the pipeline's input is the token ids, embedded on the first stage (no `[m,b,T,D]`
  embedded batch or its gradient on any device). At this toy size the weights' accumulators
  dominate, so the schedules' difference shows in the buffer column more than in the total
  (interleaved's total is the smallest: its chunk is half a stage, so the one backward running at a
  time holds half the intermediates).
- Every schedule recomputes a stage's forward in its backward from the kept input (stage-level
  rematerialization), so activation memory is inputs only; the cost is one extra forward per
  microbatch and stage.

## 3. Tensor parallelism inside the stages ({TP_MESH}, 1F1B, m={TP_M}, the same model and batch)

The pipeline's `shard_map` is manual over `stage` and the row axes only; `tensor` stays automatic
when the rules name it ("tp": heads, FFN hidden units and vocabulary over `tensor`), so each
stage's weights, their gradients and its per-layer activations are split over it and XLA inserts
the Megatron all-reduces. Under "dp" (no rule names `tensor`) it is one more split of the
microbatch rows, as every non-stage axis was before: weights and gradients whole on each device.
Parameters placed by `with_stage_layers(rules)`, as the trainer places them.

{table3}

- One-device loss: {ref:.6f}. The arguments (the parameters) and outputs (their gradients) are
  what each device holds of the model: with `tensor` a model axis, half a stage's, where as a row
  axis it held the whole stage. The added all-reduces are tensor parallelism's (the compiled
  program's op names): the attention and FFN output projections' partial sums in the forward, its
  recompute and the backward, and the embedding lookup and log-sum-exp over the vocabulary split
  over `tensor`; the row split needs only the gradients' and losses' sums.
- XLA's temporary memory (the scan's gradient accumulators and buffer slots, and one stage's
  backward with the layers' kept intermediates) moves the other way at this toy width (D=64): the
  accumulators halve, but the microbatch rows are split 2 ways instead of 4, and without sequence
  parallelism the residual stream and the norms' activations are whole over `tensor` (Megatron's
  trade: weights split, the `[b,T,D]` activations replicated), so the buffer slots and the
  backward's `[b,T,D]`-sized intermediates double. The weights' share grows with the width
  (weights and their gradients scale as D², those activations as D).
"""
RESULTS.write_text(text)
print(f"wrote {RESULTS}")
