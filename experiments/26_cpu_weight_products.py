"""Weight products on XLA:CPU (issue #14): the C++ decode matmul and the 2-D weight contraction.

``llmarch.layers.einsum.contract`` runs a layer's plain weight product as a 2-D ``[M,K] @ [K,N]``
on an unsharded CPU program, and sends 2 to 8 rows to ``kernels_cpu.dense_matmul``. This script
measures what each choice buys, side by side in one process (each variant compiled once, then
timed in interleaved rounds, so load from other processes falls on both alike):

1. One weight product at the shapes of the bench's 56M Llama (D=512, F=1408, V=32000), rows
   M = 1, 2, 4, 8: XLA's dot against the kernel, each streaming 40 copies of the weight (more
   than the last-level cache) as a decode step does; GB/s of weight read.
2. The 56M Llama's decode forward (one token per row over a 256-position cache) at B = 1, 2, 4, 8
   rows, with and without the kernel.
3. The bench's train step (Llama D=256 L=4 GQA 8/4 F=688 V=256, B=8 T=256, AdamW, float32) with
   the 2-D weight contraction against the 3-D ``dot_general`` it replaced: the strided
   transposing copies XLA:CPU writes in the backward pass (``copy_bitcast_fusion`` thunks in the
   compiled program), step time, and the first loss.

Writes experiments/results/26_cpu_weight_products.md.

    python experiments/26_cpu_weight_products.py [--quick]
"""

import argparse
import datetime
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import interleaved_medians, load_average, random_llama  # noqa: E402

import kernels_cpu.dense_matmul as cd  # noqa: E402
import llmarch.layers.einsum as einsum  # noqa: E402
from kernels_cpu.build import load, unavailable  # noqa: E402
from llmarch import machine  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "26_cpu_weight_products.md"
SHAPES = [(512, 512), (512, 256), (512, 1408), (1408, 512), (512, 32000)]  # q/o, k/v, gate/up, down, head


def compiled(fn, *args):
    """``fn`` jitted and compiled now, after clearing jax's caches (so a switch read at trace time,
    flipped between variants, is traced anew), with its optimized HLO text."""
    jax.clear_caches()
    comp = jax.jit(fn).lower(*args).compile()
    return comp, comp.as_text()


def variants(switch, fn, *args):
    """``{name: compiled}`` for the switch off ("xla") and on ("ours")."""
    out = {}
    for name, on in (("xla", False), ("ours", True)):
        switch(on)
        out[name] = compiled(fn, *args)
    switch(True)
    return out


def blocking(comp, *args):
    """A call of ``comp(*args)`` that waits for its result (for ``interleaved_medians``)."""
    return lambda: jax.block_until_ready(comp(*args))


def chain(product):
    """``product`` over a list of weights, each call waiting for the last (one weight streamed at
    a time, as a decode step reads its layers)."""

    def run(x, ws):
        for w in ws:
            x = x + 1e-30 * product(x, w)[:, :1]
        return x

    return run


def kernel_switch(on: bool) -> None:
    cd.supports = _supports if on else (lambda *a, **k: False)


def flatten_switch(on: bool) -> None:
    einsum._unsharded_cpu = _unsharded if on else (lambda: False)


_supports, _unsharded = cd.supports, einsum._unsharded_cpu


def products(repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    lines = ["| weight [K, N] | M | XLA GB/s | kernel GB/s | kernel / XLA |", "|---|---|---|---|---|"]
    for K, N in SHAPES:
        copies = 40 if K * N < 2**22 else 3
        ws = [jnp.asarray(rng.normal(size=(K, N)).astype(np.float32)) for _ in range(copies)]
        for M in (1, 2, 4, 8):
            x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))

            calls = {}
            for name, product in (("xla", jnp.dot), ("kernel", cd.dense_matmul)):
                calls[name] = blocking(compiled(chain(product), x, ws)[0], x, ws)
                calls[name]()
            med = interleaved_medians(calls, repeats)
            rate = {k: copies * K * N * 4 / v / 1e9 for k, v in med.items()}
            lines.append(
                f"| [{K}, {N}] | {M} | {rate['xla']:.1f} | {rate['kernel']:.1f} | "
                f"{rate['kernel'] / rate['xla']:.2f}× |"
            )
            print(lines[-1], flush=True)
    return lines


def decode(repeats: int) -> list[str]:
    _, model, _ = random_llama(vocab=32000, d_model=512, layers=8, heads=8, kv_heads=4, ffn=1408, max_len=512)
    graphdef, state = nnx.split(model)

    def forward(st, t, p, c):
        return nnx.merge(graphdef, st)(t, positions=p, cache=c).logits

    lines = [
        "| rows B | XLA ms | with the kernel ms | speedup | kernel calls | max logit difference |",
        "|---|---|---|---|---|---|",
    ]
    for B in (1, 2, 4, 8):
        S = 256
        args = (
            state,
            jnp.full((B, 1), 5, jnp.int32),
            jnp.full((B, 1), S // 2, jnp.int32),
            model.init_cache(B, S),
        )
        progs = variants(kernel_switch, forward, *args)
        outs = {k: comp(*args) for k, (comp, _) in progs.items()}
        calls = {k: blocking(comp, *args) for k, (comp, _) in progs.items()}
        med = interleaved_medians(calls, repeats)
        lines.append(
            f"| {B} | {med['xla'] * 1e3:.2f} | {med['ours'] * 1e3:.2f} | {med['xla'] / med['ours']:.2f}× | "
            f"{progs['ours'][1].count('llmarch_dense_matmul')} | "
            f"{float(jnp.abs(outs['xla'] - outs['ours']).max()):.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def train(repeats: int) -> list[str]:
    from llmarch.train.optim import OptimizerConfig, build_optimizer
    from llmarch.train.step import make_train_step

    B, T, V = 8, 256, 256
    _, model, cfg = random_llama(vocab=V, d_model=256, layers=4, heads=8, kv_heads=4, ffn=688, max_len=T)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = build_optimizer(OptimizerConfig(), 1000, model=cfg)
    tokens = np.random.default_rng(0).integers(0, V, (B, T + 1))
    data = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
    }
    state = (params, rest, tx.init(params))
    step = make_train_step(graphdef, tx, donate=False, update_rest=True)
    progs = variants(flatten_switch, step, *state, data)
    calls = {
        k: (lambda comp=comp: jax.block_until_ready(comp(*state, data))) for k, (comp, _) in progs.items()
    }
    losses = {k: float(comp(*state, data)[-1]["loss"]) for k, (comp, _) in progs.items()}
    med = interleaved_medians(calls, repeats)
    copies = {k: text.count("copy_bitcast_fusion") for k, (_, text) in progs.items()}
    return [
        "| weight contraction | copy_bitcast_fusion mentions in the HLO | step ms | tokens/s | first loss |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {copies[k]} | {med[k] * 1e3:.0f} | {B * T / med[k]:,.0f} | {losses[k]:.4f} |"
            for k, label in (("xla", "3-D `dot_general` (before)"), ("ours", "2-D `[M,K] @ [K,N]` (now)"))
        ),
        "",
        f"Speedup of the step: **{med['xla'] / med['ours']:.2f}×**.",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args(argv)
    if load() is None:
        raise SystemExit(f"the CPU kernels are not built here: {unavailable()}; nothing to compare")
    reps = (3, 3, 2) if args.quick else (15, 30, 8)
    start = load_average()
    sections = [
        ("1. One weight product, streamed (40 copies; 3 of the LM head)", products(reps[0])),
        ("2. The 56M Llama's decode forward", decode(reps[1])),
        ("3. The train step", train(reps[2])),
    ]
    text = [
        "# 26 Weight products on XLA:CPU: the decode matmul kernel and the 2-D contraction",
        "",
        f"Command: `python experiments/26_cpu_weight_products.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine.describe()}  ",
        f"Date: {datetime.date.today()}; load average (1 min) {start:.1f} at the start, "
        f"{load_average():.1f} at the end; medians of interleaved rounds (ratios, not times, are the result)",
        "",
    ]
    for title, lines in sections:
        text += [f"## {title}", "", *lines, ""]
    RESULTS.write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
