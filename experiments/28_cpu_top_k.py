"""Top-k selection on XLA:CPU (issue #14): the C++ kernel against XLA's ``TopK`` custom call.

``llmarch.ops.top_k`` takes ``kernels_cpu.top_k`` for float32 rows on the CPU backend; before, the
memory layers' searches, MoE routing and sampling called ``jax.lax.top_k``, which XLA:CPU runs as
its ``TopK`` custom call on one thread. Both give the same bits (the tests check), so this script
measures only time, side by side in one process (each compiled once, then timed in interleaved
rounds, so load from other processes falls on both alike):

1. The op alone at the shapes of experiment 07's UltraMem layer (B tokens × 2 heads: the rows'
   and the columns' 512 projected scores, then the 32² = 1024 candidate pairs; k = 32), of MoE
   routing (23 experts, top-2) and of sampling's top log-probabilities (a 32,000 vocabulary, 20).
2. Experiment 07's UltraMem layer decode step (D=1024, TDQKR, B=8…64) with its selections on the
   kernel (``impl="auto"``) and on XLA's TopK (``impl="xla"``; on CPU that changes nothing else:
   the value read is XLA's either way). The layer runs alone here, so its 21 MB of weights stay
   in the last-level cache between calls: faster than in experiment 07, where the MoE layers
   run in between and evict them.

Writes experiments/results/28_cpu_top_k.md.

    python experiments/28_cpu_top_k.py [--repeats N]
"""

import argparse
import datetime
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
from llmarch.layers.memory import MemoryLayer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "28_cpu_top_k.md"
OP_CASES = [  # (what, shape, k)
    ("UltraMem rows/columns, B=8", (8, 2, 512), 32),
    ("UltraMem rows/columns, B=64", (64, 2, 512), 32),
    ("UltraMem candidate pairs, B=64", (64, 2, 1024), 32),
    ("MoE routing, 64 tokens", (64, 23), 2),
    ("sampling top log-probs, 8 rows", (8, 32000), 20),
]


def op_table(repeats: int) -> list[str]:
    rows = ["| selection | x | k | XLA TopK µs | kernel µs | speedup |", "|---|---|---|---|---|---|"]
    for what, shape, k in OP_CASES:
        x = jax.random.normal(jax.random.key(len(rows)), shape, jnp.float32)
        calls = {}
        for impl in ("xla", "cpu"):
            f = jax.jit(lambda x, k=k, impl=impl: ops.top_k(x, k, impl=impl))
            jax.block_until_ready(f(x))
            calls[impl] = lambda f=f, x=x: jax.block_until_ready(f(x))
        pairs = zip(ops.top_k(x, k, impl="xla"), ops.top_k(x, k), strict=True)
        same = all(np.array_equal(a, b) for a, b in pairs)
        assert same, f"{what}: the kernel's selection differs from XLA's"
        t = interleaved_medians(calls, repeats)
        rows.append(
            f"| {what} | {list(shape)} | {k} | {t['xla'] * 1e6:,.0f} | {t['cpu'] * 1e6:,.0f} | "
            f"{t['xla'] / t['cpu']:.2f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def layer_table(batches, repeats: int) -> list[str]:
    exp07 = importlib.import_module("07_memory_decode")
    cfg = exp07.ultramem_config(1024, 512)
    with nnx.use_eager_sharding(False):
        graph, state = nnx.split(MemoryLayer(1024, cfg, rngs=nnx.Rngs(0), pre_norm=True))

    def step(impl):
        def run(state, x):
            layer = nnx.merge(graph, state)
            layer.impl = impl
            return layer(x)[0]

        return jax.jit(run)

    rows = ["| B | top-k on XLA's TopK ms | on the kernel ms | speedup |", "|---|---|---|---|"]
    for B in batches:
        x = jax.random.normal(jax.random.key(B), (B, 1, 1024), jnp.float32)
        fns = {impl: step(impl) for impl in ("xla", "auto")}
        outs = {impl: jax.block_until_ready(f(state, x)) for impl, f in fns.items()}
        np.testing.assert_array_equal(outs["xla"], outs["auto"])  # the same slots, the same sums
        calls = {i: (lambda f=f, x=x: jax.block_until_ready(f(state, x))) for i, f in fns.items()}
        t = interleaved_medians(calls, repeats)
        rows.append(f"| {B} | {t['xla'] * 1e3:.2f} | {t['auto'] * 1e3:.2f} | {t['xla'] / t['auto']:.2f}× |")
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
    ops_rows = op_table(args.repeats)
    layer_rows = layer_table([int(b) for b in args.batches.split(",")], max(5, args.repeats // 2))
    text = "\n".join(
        [
            "# 28 Top-k selection on XLA:CPU: the C++ kernel against XLA's TopK",
            "",
            "Command: `python experiments/28_cpu_top_k.py`  ",
            f"Machine: {machine.describe()}  ",
            f"Date: {datetime.date.today()}; load average (1 min) {start_load:.1f} at the start, "
            f"{load_average():.1f} at the end; medians of interleaved rounds (ratios, not times, are the "
            "result). Outputs identical in every case (checked).",
            "",
            "## 1. The op alone",
            "",
            *ops_rows,
            "",
            "## 2. Experiment 07's UltraMem layer, one decode step",
            "",
            *layer_rows,
            "",
        ]
    )
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
