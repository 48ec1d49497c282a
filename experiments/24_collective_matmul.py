"""Collective matmul for tensor parallelism: the SwiGLU FFN and attention's projections with their
all-gather and reduce-scatter decomposed into ppermute rings (``llmarch.collective_matmul``)
against plain Megatron TP (XLA's all-reduce), on 8 simulated CPU devices.

1. Wall time of one FFN layer, forward and forward+backward, plain TP vs collective matmul, on
   data=2 x tensor=4 (interleaved medians). XLA:CPU runs collectives synchronously and the 8
   "devices" share this machine's cores, so no overlap can show here: the ratio measures the
   rings' extra work (n smaller matmuls, n-1 transfers, the dynamic slices), not the benefit.
2. The compiled structure for tensor = 2, 4, 8: ring transfers (collective-permutes) in the
   forward and in the forward+backward, the longest chain of dependent transfers (the ring's
   latency in steps; ``bidirectional=True`` halves it), and for each transfer the number of GEMMs
   that are neither its ancestors nor its descendants (what a latency-hiding scheduler may run
   while it is in flight).
3. A 2-layer model's train step (attention and FFN as rings) under the rules ``tp`` (residual
   stream replicated over tensor) and ``tp_sp`` (sequence-split, Megatron sequence parallelism),
   plain vs collective matmul: collectives in the compiled program, those left inside the blocks,
   step time and loss.

Writes experiments/results/24_collective_matmul.md.

    python experiments/24_collective_matmul.py
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import interleaved_medians, load_average  # noqa: E402

import llmarch  # noqa: E402
from llmarch import machine, sharding  # noqa: E402
from llmarch.collective_matmul import all_gather_matmul  # noqa: E402
from llmarch.config import AttentionConfig  # noqa: E402
from llmarch.hlo import Dataflow  # noqa: E402
from llmarch.layers.ffn import SwiGLU  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "24_collective_matmul.md"
MESHES = {2: "data=4,tensor=2", 4: "data=2,tensor=4", 8: "tensor=8"}
_COLLECTIVE = re.compile(
    r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("
)


def ffn_programs(n: int, cm: bool, B: int, T: int, D: int, F: int):
    """The FFN layer's forward and forward+backward, jitted (fresh jits: the rules are read at
    trace time), its state and input placed on the mesh."""
    mesh = sharding.make_mesh(MESHES[n])
    with sharding.use(mesh, "tp"):
        graphdef, state = nnx.split(SwiGLU(D, F, rngs=nnx.Rngs(0), collective_matmul=cm))
        x = jax.device_put(
            jax.random.normal(jax.random.key(1), (B, T, D)), sharding.batch_sharding(mesh, "tp", 3)
        )

        def forward(state, x):
            return nnx.merge(graphdef, state)(x)

        grad = jax.grad(lambda s, x: jnp.sum(forward(s, x) ** 2), argnums=(0, 1))
        fwd = jax.jit(forward).lower(state, x).compile()
        both = jax.jit(grad).lower(state, x).compile()
    return fwd, both, state, x


# 1. Wall time -------------------------------------------------------------------------------------

B, T, D, F = 8, 256, 256, 1024
fns, outs = {}, {}
for cm in (False, True):
    fwd, both, state, x = ffn_programs(4, cm, B, T, D, F)
    name = "collective matmul" if cm else "plain TP"
    outs[name] = fwd(state, x)
    fns[f"{name} forward"] = functools.partial(lambda f, s, x: jax.block_until_ready(f(s, x)), fwd, state, x)
    fns[f"{name} fwd+bwd"] = functools.partial(lambda f, s, x: jax.block_until_ready(f(s, x)), both, state, x)
    for fn in (fns[f"{name} forward"], fns[f"{name} fwd+bwd"]):
        fn()
error = float(np.abs(np.asarray(outs["plain TP"]) - np.asarray(outs["collective matmul"])).max())
load_before = load_average()
times = interleaved_medians(fns, repeats=15)
rows = []
for what in ("forward", "fwd+bwd"):
    plain, ring = times[f"plain TP {what}"], times[f"collective matmul {what}"]
    rows.append(f"| {what} | {plain * 1e3:.2f} | {ring * 1e3:.2f} | {ring / plain:.2f} |")
table1 = "\n".join(
    ["| FFN layer | plain TP ms | collective matmul ms | ratio |", "|---|---:|---:|---:|", *rows]
)
print(table1)

# 2. Compiled structure ----------------------------------------------------------------------------


def structure(hlo_text: str) -> tuple[int, int, int, float]:
    """(transfers, longest chain of dependent transfers, fewest and mean independent GEMMs per
    transfer) in compiled HLO."""
    g = Dataflow(hlo_text)
    permutes = [m for m in g.op if g.op[m] in ("collective-permute", "collective-permute-done")]
    gemms = [m for m in g.op if g.is_gemm(m)]
    depth = max((1 + sum(a in permutes for a in g.ancestors(p)) for p in permutes), default=0)
    free = [sum(m not in g.ancestors(p) and p not in g.ancestors(m) for m in gemms) for p in permutes]
    return len(permutes), depth, min(free, default=0), float(np.mean(free)) if free else 0.0


def ring_only(n: int, bidirectional: bool) -> str:
    """The all-gather ring alone (``all_gather_matmul``), to compare the two directions' depth."""
    mesh = sharding.make_mesh(MESHES[n])
    body = functools.partial(all_gather_matmul, axis="tensor", bidirectional=bidirectional)
    run = jax.shard_map(
        lambda x, w: body(x, w),
        mesh=mesh,
        in_specs=(P(None, "tensor"), P(None, "tensor")),
        out_specs=P(None, None, "tensor"),
    )
    return jax.jit(run).lower(jnp.ones((2, 16, 8)), jnp.ones((8, 16))).compile().as_text()


rows = []
for n in (2, 4, 8):
    fwd, both, _, _ = ffn_programs(n, True, 8, 16, 32, 64)
    for what, text in (("FFN forward", fwd.as_text()), ("FFN fwd+bwd", both.as_text())):
        steps, depth, low, mean = structure(text)
        rows.append(f"| {n} | {what} | {steps} | {depth} | {low} | {mean:.1f} |")
    for bidi in (False, True):
        steps, depth, low, mean = structure(ring_only(n, bidi))
        label = f"all_gather_matmul{' bidirectional' if bidi else ''}"
        rows.append(f"| {n} | {label} | {steps} | {depth} | {low} | {mean:.1f} |")
table2 = "\n".join(
    [
        "| tensor n | program | ring transfers | longest transfer chain | fewest independent GEMMs "
        "per transfer | mean |",
        "|---:|---|---:|---:|---:|---:|",
        *rows,
    ]
)
print(table2)

# 3. A model's collectives -------------------------------------------------------------------------

cfg0 = llmarch.presets.get("tiny-dense").replace(
    num_layers=2, attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16)
)
tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, cfg0.vocab_size)
mesh = sharding.make_mesh(MESHES[4])
_OP = re.compile(
    r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\([^\n]*?"
    r'op_name="([^"]*)"'
)


def loss_fn(state, graphdef, tokens):
    logits = nnx.merge(graphdef, state)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


rows, losses, steps = [], {}, {}
for cm, rules in ((False, "tp"), (True, "tp"), (False, "tp_sp"), (True, "tp_sp")):
    cfg = cfg0.replace(collective_matmul=cm)
    label = f"{rules}, {'collective matmul' if cm else 'plain'}"
    with sharding.use(mesh, rules):
        graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
        t = jax.device_put(tokens, sharding.batch_sharding(mesh, rules))
        # a function of its own per layout: jax's trace cache keys on the function, not the rules
        step = jax.jit(lambda s, g, t: jax.value_and_grad(loss_fn)(s, g, t), static_argnums=1)
        compiled = step.lower(state, graphdef, t).compile()
    ops = _OP.findall(compiled.as_text())
    total = collections.Counter(op for op, _ in ops)
    inside = collections.Counter(
        op for op, name in ops if op != "collective-permute" and re.search("/(attention|ffn)/", name)
    )
    losses[label] = float(compiled(state, t)[0])
    steps[label] = functools.partial(lambda c, s, t: jax.block_until_ready(c(s, t)), compiled, state, t)
    steps[label]()
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
    rows.append([label, kinds, ", ".join(f"{k} {v}" for k, v in sorted(inside.items())) or "none"])
step_times = interleaved_medians(steps, repeats=10)
base = step_times["tp, plain"]
table3 = "\n".join(
    [
        "| rules, layers | collectives in the train step | non-ring collectives inside blocks "
        "| step ms | vs tp plain | loss |",
        "|---|---|---|---:|---:|---:|",
        *(
            f"| {label} | {kinds} | {inside} | {step_times[label] * 1e3:.1f} | "
            f"{step_times[label] / base:.2f} | {losses[label]:.6f} |"
            for label, kinds, inside in rows
        ),
    ]
)
print(table3)

text = f"""# 24: collective matmul for tensor parallelism

{datetime.date.today()}; `python experiments/24_collective_matmul.py`; {machine.describe()}; 8 simulated
CPU devices; load average {load_before:.2f} before timing.

## 1. One SwiGLU FFN layer, data=2 x tensor=4, B={B}, T={T}, D={D}, F={F}, float32 (median of 15)

{table1}

Largest difference between the two outputs: {error:.2e}.

- **No gain is expected on a CPU, and none shows.** XLA:CPU issues collective-permute (and every
  collective) as one blocking op, and the 8 simulated devices share this machine's cores, so a
  transfer cannot run under a matmul; the ratio is the rings' overhead: `n` matmuls of `T/n` rows
  instead of one, `n-1` transfers of `[B,T/n,D]` instead of one all-reduce, and the dynamic
  slices/updates that place each chunk. The benefit is on GPU/TPU, where collective-permute is an
  async start/done pair that the latency-hiding scheduler can put beside the independent GEMM
  (section 2); it was not measured here (no accelerator in this run).
- The plain path is one all-reduce of `[B,T,D]` after the down projection; the collective path is a
  reduce-scatter ring (overlappable) plus, under the `tp` rules (residual stream replicated over
  `tensor`), one all-gather of `[B,T/n,D]` back to the residual layout (not overlapped). The bytes
  moved are the same (an all-reduce is a reduce-scatter then an all-gather); half of them now have
  compute beside them. The input side costs nothing: the replicated input is sliced, not gathered.

## 2. The compiled rings (HLO data flow, `llmarch.hlo.Dataflow`)

{table2}

- The FFN is one all-gather ring (gate and up share it: each step multiplies the chunk in hand by
  both) and one reduce-scatter ring: `2(n-1)` transfers forward; the backward adds two more rings
  (autodiff through ppermute: the all-gather's transpose is a reduce-scatter ring running the other
  way, and vice versa), `4(n-1)` in all. Every transfer has at least one GEMM that neither feeds it
  nor waits for it, which is what `tests/test_collective_matmul.py` asserts. The ring's latency is
  the longest chain of dependent transfers: `n-1` steps one way, `ceil((n-1)/2)` with
  `bidirectional=True` (each chunk sent both ways round the ring; the FFN layer uses the one-way
  ring). In the FFN the reduce-scatter ring starts after the whole all-gather ring (its first step
  slices `silu(gate)·up`, which XLA builds whole), so the FFN's chain is `2(n-1)`; starting each
  reduce-scatter step as soon as its chunk has arrived would fuse the two rings, not done here.

## 3. A 2-layer model's train step, data=2 x tensor=4 (B=8, T=64, D=64, median of 10)

{table3}

- Collective matmul covers attention's q/k/v and output projections (one all-gather ring for the
  three, one reduce-scatter ring) and the FFN's (one for gate and up, one for down): 4 rings of
  n-1 = 3 transfers per layer and pass, so 2 layers x 4 x 3 x (forward + backward) = 48 permutes.
  XLA combines collectives of the same kind, so the other counts are ops in the program.
- Under `tp` the residual stream is replicated over `tensor`: each sublayer's sequence-split output
  is gathered back (the all-gathers inside blocks, forward and backward), not overlapped; the bytes
  equal the plain path's all-reduce (a reduce-scatter then an all-gather), half of them now beside
  compute. Under `tp_sp` (Megatron sequence parallelism, `seq -> tensor` at block boundaries) the
  stream stays split, norms and residual adds run on T/n tokens, and nothing but the rings is left
  inside the blocks; what remains is per model (the head's weight, the embedding lookup and the
  loss's token shift on sequence-split tokens). That is the layout to use with
  `collective_matmul=True`.
- `tp_sp` without collective matmul is correct, but nothing in attention constrains its
  sequence-split input, and XLA's propagation gathers weights and activations inside the blocks
  (the plain `tp_sp` row).
- On this CPU the step times carry the rings' overhead and no overlap (section 1); the per-layer
  structure, not the CPU time, is what carries over to GPU/TPU.
"""
RESULTS.write_text(text)
print(f"wrote {RESULTS}")
