"""Paged decode attention on XLA:CPU (issue #14): the C++ kernel against the blocked XLA loop.

``llmarch.ops.paged_attention`` (and ``ops.mla_decode``) take ``kernels_cpu.paged_attention`` on
the CPU backend for a float32 cache and at most 16 query positions per row; before, they ran
``kernels_pallas._paged_xla.blocked_attention``, a while loop of small thunks per block of pages.
This script measures both side by side in one process (each compiled once, then timed in
interleaved rounds, so load from other processes falls on both alike):

1. The op alone over the 56M Llama's cache layout (8 layers, K=4 KV heads of H=64, N=8 query
   heads, 16-position pages, one pool for all layers as the engine keeps it), one decode token
   per row, at B rows of S positions: ms for the 8 layers, and GB/s of cache read.
2. Absorbed MLA decoding (``ops.mla_decode``: N=16 heads, latent A=256, RoPE R=32), 8 layers.
3. The ``Engine``: batch-1 greedy decode of the 56M Llama (128 tokens), and 32 requests x 64 new
   tokens (prompts 16-128, experiment 09's ``engine_runs``), with and without the kernel; the
   greedy tokens of both.

Writes experiments/results/27_cpu_paged_attention.md.

    python experiments/27_cpu_paged_attention.py [--quick]
"""

import argparse
import datetime
import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import interleaved_medians, load_average, random_llama  # noqa: E402

from kernels_cpu.build import load, unavailable  # noqa: E402
from llmarch import machine, ops  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "27_cpu_paged_attention.md"
LAYERS, PS = 8, 16
_serves = ops._paged_kernel_serves


def kernel_switch(on: bool) -> None:
    """Dispatch with the kernel (``"auto"`` as shipped) or without it (the XLA loop); read at
    trace time, so every variant is traced after the switch and jax's caches cleared."""
    ops._paged_kernel_serves = _serves if on else (lambda *a, **k: False)
    jax.clear_caches()


def _tables(B: int, S: int, rng) -> tuple[jax.Array, jax.Array, int]:
    """Block tables of B rows of S positions over a shuffled pool (per layer), and its size."""
    per_row = -(-S // PS)
    pages = B * per_row + 1
    tables = rng.permutation(pages - 1)[: B * per_row].reshape(B, per_row) + 1  # page 0: trash
    return jnp.asarray(tables, jnp.int32), jnp.full((B,), S, jnp.int32), pages


def _layers_call(attend, tables, lengths, pages):
    """A jitted function attending ``q`` over each of the 8 layers' parts of one pool in turn (the
    engine's view: ``tables + layer * pages``), each layer's output feeding the next query."""

    def run(q, *pools):
        for layer in range(LAYERS):
            out = attend(q, *pools, tables + layer * pages, lengths)
            q = q.at[..., : out.shape[-1]].add(1e-30 * out)
        return out  # the last layer's (each layer waited for the one before)

    return run


def _time(fn, args, repeats):
    """``{variant: seconds}`` (medians of interleaved rounds) and the two outputs; ``fn`` is traced
    once per variant (the switch is read at trace time)."""
    comps, outs = {}, {}
    for name, on in (("xla", False), ("kernel", True)):
        kernel_switch(on)
        comps[name] = jax.jit(fn).lower(*args).compile()
        outs[name] = jax.block_until_ready(comps[name](*args))
    kernel_switch(True)
    calls = {k: (lambda c=c: jax.block_until_ready(c(*args))) for k, c in comps.items()}
    return interleaved_medians(calls, repeats), outs


def paged(repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    N, K, H = 8, 4, 64
    lines = [
        "| rows B | positions S | XLA loop ms | kernel ms | speedup | kernel GB/s of cache | max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for B, S in ((1, 140), (1, 500), (8, 100), (32, 100), (32, 500)):
        tables, lengths, pages = _tables(B, S, rng)
        k_pool, v_pool = (
            jnp.asarray(rng.normal(size=(LAYERS * pages, PS, K, H)), jnp.float32) for _ in range(2)
        )
        q = jnp.asarray(rng.normal(size=(B, 1, N, H)), jnp.float32)
        qpos = jnp.full((B, 1), S - 1, jnp.int32)

        def attend(q, k, v, t, n, qpos=qpos):
            return ops.paged_attention(q, k, v, t, n, qpos)

        run = _layers_call(attend, tables, lengths, pages)
        med, outs = _time(run, (q, k_pool, v_pool), repeats)
        gb = LAYERS * B * S * K * H * 2 * 4 / 1e9
        lines.append(
            f"| {B} | {S} | {med['xla'] * 1e3:.2f} | {med['kernel'] * 1e3:.2f} | "
            f"{med['xla'] / med['kernel']:.2f}× | {gb / med['kernel']:.1f} | "
            f"{float(jnp.abs(outs['xla'] - outs['kernel']).max()):.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def mla(repeats: int) -> list[str]:
    rng = np.random.default_rng(1)
    N, A, R = 16, 256, 32
    lines = [
        "| rows B | positions S | XLA loop ms | kernel ms | speedup | kernel GB/s of cache | max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for B, S in ((1, 500), (8, 200), (32, 200)):
        tables, lengths, pages = _tables(B, S, rng)
        c_kv = jnp.asarray(rng.normal(size=(LAYERS * pages, PS, A)), jnp.float32)
        k_r = jnp.asarray(rng.normal(size=(LAYERS * pages, PS, R)), jnp.float32)
        q = jnp.asarray(rng.normal(size=(B, 1, N, A + R)), jnp.float32)
        qpos = jnp.full((B, 1), S - 1, jnp.int32)

        def attend(q, c, r, t, n, qpos=qpos):
            return ops.mla_decode(q[..., :A], q[..., A:], c, r, t, n, qpos, scale=0.1)

        run = _layers_call(attend, tables, lengths, pages)
        med, outs = _time(run, (q, c_kv, k_r), repeats)
        gb = LAYERS * B * S * (A + R) * 4 / 1e9
        lines.append(
            f"| {B} | {S} | {med['xla'] * 1e3:.2f} | {med['kernel'] * 1e3:.2f} | "
            f"{med['xla'] / med['kernel']:.2f}× | {gb / med['kernel']:.1f} | "
            f"{float(jnp.abs(outs['xla'] - outs['kernel']).max()):.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def engine(repeats: int, quick: bool) -> list[str]:
    from llmarch.inference import Engine, SamplingParams

    exp09 = importlib.import_module("09_serving_throughput")
    _, model, cfg = random_llama(
        vocab=32000, d_model=512, layers=8, heads=8, kv_heads=4, ffn=1408, max_len=512
    )
    rng = np.random.default_rng(2)
    prompt = rng.integers(1, cfg.vocab_size, 16).tolist()
    n = 32 if quick else 128
    requests, new = (8, 16) if quick else (32, 64)
    prompt_lens = rng.integers(16, 129, requests)
    prompts = [rng.integers(1, cfg.vocab_size, p).tolist() for p in prompt_lens]
    rates, tokens = {}, {}
    for name, on in (("xla", False), ("kernel", True)):
        kernel_switch(on)
        eng = Engine(model, cfg, max_num_seqs=1, max_len=len(prompt) + n, min_decode_rows=1)
        params = SamplingParams(max_tokens=n, temperature=0.0)
        eng.generate([prompt], params)  # compile
        per_token = []
        for _ in range(repeats):
            out = eng.generate([prompt], params)[0]
            per_token.append(sum(out.token_latencies) / len(out.token_latencies))
        tokens[name] = out.token_ids
        served = exp09.engine_runs(
            model, cfg, prompts, np.full(requests, new), dict(max_num_seqs=32, max_len=128 + new)
        )
        rates[name] = (1 / float(np.median(per_token)), served["rate"])
        print(name, rates[name], flush=True)
    kernel_switch(True)
    same = next((i for i, (a, b) in enumerate(zip(*tokens.values(), strict=True)) if a != b), n)
    return [
        "| workload | XLA loop tok/s | kernel tok/s | speedup |",
        "|---|---|---|---|",
        f"| batch-1 greedy decode, {n} tokens (median of {repeats} runs) | {rates['xla'][0]:,.0f} | "
        f"{rates['kernel'][0]:,.0f} | {rates['kernel'][0] / rates['xla'][0]:.2f}× |",
        f"| {requests} requests × {new} new tokens (the second of two runs) | {rates['xla'][1]:,.0f} | "
        f"{rates['kernel'][1]:,.0f} | {rates['kernel'][1] / rates['xla'][1]:.2f}× |",
        "",
        f"Batch-1 greedy tokens identical for the first {same} of {n}. The two engines ran one after "
        "the other (not interleaved): the batch-1 figures are medians of several runs, the serving "
        "figures one run each, so read them as ±10%.",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args(argv)
    if load() is None:
        raise SystemExit(f"the CPU kernels are not built here: {unavailable()}; nothing to compare")
    reps = (3, 2) if args.quick else (30, 5)
    start = load_average()
    sections = [
        ("1. Paged attention, 8 layers, one decode token per row (N=8, K=4, H=64)", paged(reps[0])),
        ("2. Absorbed MLA decoding, 8 layers (N=16, A=256, R=32)", mla(reps[0])),
        ("3. The Engine, 56M Llama (D=512, L=8, GQA 8/4, V=32000)", engine(reps[1], args.quick)),
    ]
    text = [
        "# 27 Paged decode attention on XLA:CPU: the C++ kernel against the blocked XLA loop",
        "",
        f"Command: `python experiments/27_cpu_paged_attention.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine.describe()}  ",
        f"Date: {datetime.date.today()}; load average (1 min) {start:.1f} at the start, "
        f"{load_average():.1f} at the end; sections 1-2: medians of interleaved rounds (ratios, not "
        "times, are the result)",
        "",
    ]
    for title, lines in sections:
        text += [f"## {title}", "", *lines, ""]
    RESULTS.write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
