"""The memory layer on XLA:CPU (issue #14): its two C++ kernels against the XLA code they replace.

- ``llmarch.ops.top_k`` takes ``kernels_cpu.top_k`` for float32 rows on the CPU backend; before,
  the memory layers' searches, MoE routing and sampling called ``jax.lax.top_k``, which XLA:CPU
  runs as its ``TopK`` custom call on one thread. Both give the same bits (the tests check).
- ``llmarch.layers.memory_lookup.read_values`` takes ``kernels_cpu.memory_read`` for a float32
  table; before, XLA gathered the picked rows into a ``[B,J,U]`` buffer, scaled them and pooled
  them per virtual block with a one-hot batched matmul. The same sums up to summation order.

Each variant is compiled once, then timed in interleaved rounds in one process, so load from
other processes falls on all alike:

1. The op alone at the shapes of experiment 07's UltraMem layer (B tokens × 2 heads: the rows'
   and the columns' 512 projected scores, then the 32² = 1024 candidate pairs; k = 32), of MoE
   routing (23 experts, top-2) and of sampling's top log-probabilities (a 32,000 vocabulary, 20).
2. The value read alone at experiment 07's shapes (65,536 rows of U=512, B tokens × J=64 picks,
   X=2 cores, W=4 virtual blocks): XLA's read against the kernel.
3. Experiment 07's UltraMem layer decode step (D=1024, TDQKR, B=8…64): ``impl="xla"`` (XLA's TopK
   and read), the top-k kernel alone, and both kernels (``impl="auto"``, the default). The
   layer runs alone here, so its 21 MB of dense weights stay in the last-level cache between
   calls: faster than in experiment 07, where the MoE layers run in between and evict them.

Writes experiments/results/28_cpu_memory_layer.md.

    python experiments/28_cpu_memory_layer.py [--repeats N]
"""

import argparse
import datetime
import functools
import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import interleaved_medians, load_average  # noqa: E402

from kernels_cpu.build import load, unavailable  # noqa: E402
from llmarch import machine, ops  # noqa: E402
from llmarch.layers import memory_lookup  # noqa: E402
from llmarch.layers.memory import MemoryLayer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "28_cpu_memory_layer.md"
OP_CASES = [  # (what, shape, k)
    ("UltraMem rows/columns, B=8", (8, 2, 512), 32),
    ("UltraMem rows/columns, B=64", (64, 2, 512), 32),
    ("UltraMem candidate pairs, B=64", (64, 2, 1024), 32),
    ("MoE routing, 64 tokens", (64, 23), 2),
    ("sampling top log-probs, 8 rows", (8, 32000), 20),
]


def xla_and_kernel(fn, args, repeats: int) -> tuple[dict, dict]:
    """``(seconds, outputs)`` of ``fn(*args, impl=...)`` jitted for ``"xla"`` and ``"cpu"`` (the
    kernel): each compiled and run once, then timed in interleaved rounds."""
    calls, outs = {}, {}
    for impl in ("xla", "cpu"):
        f = jax.jit(functools.partial(fn, impl=impl))
        outs[impl] = jax.block_until_ready(f(*args))
        calls[impl] = lambda f=f: jax.block_until_ready(f(*args))
    return interleaved_medians(calls, repeats), outs


def op_table(repeats: int) -> list[str]:
    rows = ["| selection | x | k | XLA TopK µs | kernel µs | speedup |", "|---|---|---|---|---|---|"]
    for what, shape, k in OP_CASES:
        x = jax.random.normal(jax.random.key(len(rows)), shape, jnp.float32)
        t, outs = xla_and_kernel(lambda x, impl, k=k: ops.top_k(x, k, impl=impl), (x,), repeats)
        same = all(np.array_equal(a, b) for a, b in zip(outs["xla"], outs["cpu"], strict=True))
        assert same, f"{what}: the kernel's selection differs from XLA's"
        rows.append(
            f"| {what} | {list(shape)} | {k} | {t['xla'] * 1e6:,.0f} | {t['cpu'] * 1e6:,.0f} | "
            f"{t['xla'] / t['cpu']:.2f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def read_table(batches, repeats: int) -> list[str]:
    rows = ["| B | XLA read µs | kernel µs | speedup |", "|---|---|---|---|"]
    M, U, J, X, W = 65536, 512, 64, 2, 4
    table = jax.random.normal(jax.random.key(0), (M, U), jnp.float32)
    for B in batches:
        k = jax.random.split(jax.random.key(B), 3)
        picks = jax.random.randint(k[0], (B, J), 0, M)
        weights = jax.random.normal(k[1], (B, J, X), jnp.float32)
        blocks = jax.random.randint(k[2], (B, J), 0, W)
        read = lambda t, r, w, b, impl: memory_lookup.read_values(t, r, w, b, W, impl=impl)  # noqa: E731
        t, outs = xla_and_kernel(read, (table, picks, weights, blocks), repeats)
        np.testing.assert_allclose(outs["cpu"], outs["xla"], rtol=1e-5, atol=1e-5)
        rows.append(f"| {B} | {t['xla'] * 1e6:,.0f} | {t['cpu'] * 1e6:,.0f} | {t['xla'] / t['cpu']:.2f}× |")
        print(rows[-1], flush=True)
    return rows


def layer_table(batches, repeats: int) -> list[str]:
    exp07 = importlib.import_module("07_memory_decode")
    cfg = exp07.ultramem_config(1024, 512)
    with nnx.use_eager_sharding(False):
        graph, state = nnx.split(MemoryLayer(1024, cfg, rngs=nnx.Rngs(0), pre_norm=True))
    serves = ops.memory_read_kernel_serves

    def step(impl, x, read_kernel=True):
        def run(state, x):
            layer = nnx.merge(graph, state)
            layer.impl = impl
            return layer(x)[0]

        ops.memory_read_kernel_serves = serves if read_kernel else (lambda *a: False)
        try:  # the switch is read at trace time: trace now
            return jax.jit(run).lower(state, x).compile()
        finally:
            ops.memory_read_kernel_serves = serves

    rows = [
        "| B | XLA (TopK, read) ms | top-k kernel ms | both kernels ms | speedup, top-k | speedup, both |",
        "|---|---|---|---|---|---|",
    ]
    for B in batches:
        x = jax.random.normal(jax.random.key(B), (B, 1, 1024), jnp.float32)
        fns = {"xla": step("xla", x), "top_k": step("auto", x, read_kernel=False), "both": step("auto", x)}
        outs = {name: jax.block_until_ready(f(state, x)) for name, f in fns.items()}
        np.testing.assert_array_equal(outs["xla"], outs["top_k"])  # the same slots, the same sums
        np.testing.assert_allclose(outs["both"], outs["xla"], rtol=1e-4, atol=1e-5)  # summation order
        calls = {name: (lambda f=f, x=x: jax.block_until_ready(f(state, x))) for name, f in fns.items()}
        t = interleaved_medians(calls, repeats)
        rows.append(
            f"| {B} | {t['xla'] * 1e3:.2f} | {t['top_k'] * 1e3:.2f} | {t['both'] * 1e3:.2f} | "
            f"{t['xla'] / t['top_k']:.2f}× | {t['xla'] / t['both']:.2f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="8,16,32,64")
    args = parser.parse_args(argv)
    if load() is None:
        raise SystemExit(f"error: the CPU kernels are unavailable: {unavailable()}")
    start_load = load_average()
    batches = [int(b) for b in args.batches.split(",")]
    ops_rows = op_table(args.repeats)
    read_rows = read_table(batches, args.repeats)
    layer_rows = layer_table(batches, max(5, args.repeats // 2))
    text = "\n".join(
        [
            "# 28 The memory layer on XLA:CPU: the top-k and value-read kernels against XLA",
            "",
            "Command: `python experiments/28_cpu_memory_layer.py`  ",
            f"Machine: {machine.describe()}  ",
            f"Date: {datetime.date.today()}; load average (1 min) {start_load:.1f} at the start, "
            f"{load_average():.1f} at the end; medians of interleaved rounds (ratios, not times, are the "
            "result). Checked in every case: top-k's outputs identical, the read's equal up to summation "
            "order.",
            "",
            "## 1. Top-k alone",
            "",
            *ops_rows,
            "",
            "## 2. The value read alone (65,536 rows of 512, 64 picks a token, 2 cores, 4 virtual blocks)",
            "",
            *read_rows,
            "",
            "## 3. Experiment 07's UltraMem layer, one decode step",
            "",
            *layer_rows,
            "",
        ]
    )
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
