"""Tile and launch parameters of the GPU (Triton) kernels, swept on the accelerator: flash
attention forward and backward, paged GQA decode and MLA latent decode, at experiment 04's
shapes. Each configuration is checked against the XLA reference and timed (median of
``--repeats``); each sweep stops after ``--budget`` seconds with what it has. Prints one table per
kernel, fastest first, with flash attention against cuDNN and the decoders as a share of the
measured memory bandwidth, and writes them to ``--out``.

    python experiments/gpu_tune.py [--repeats 10] [--budget 60] [--out results/gpu_tune_<device>.md]

Needs a GPU: the kernels' block sizes only mean something compiled.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import pathlib
import time

import _kernel_bench as kb
import jax
import jax.numpy as jnp

from kernels_pallas import flash_attention as fa
from kernels_pallas import mla_decode as md
from kernels_pallas import paged_attention as pa
from llmarch import machine

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=10)
parser.add_argument("--budget", type=float, default=60.0, help="seconds per sweep")
parser.add_argument("--out", default=None)
args = parser.parse_args()
if jax.default_backend() != "gpu":
    raise SystemExit(f"gpu_tune needs a GPU; this backend is {jax.default_backend()}")
device_kind = jax.devices()[0].device_kind
DTYPE = jnp.bfloat16


def _time(fn, *xs) -> float:
    return kb.median_seconds(fn, *xs, repeats=args.repeats)


def _normal(key, shape, dtype=DTYPE):
    return kb.normal(key, shape, dtype)


sections = []


def sweep(title, configs, make, inputs, reference, *, unit, amount, peers):
    """Times ``make(config)`` for each config (until the budget is spent) against ``peers``
    (name -> function), all on ``inputs``; ``amount`` FLOPs or bytes per call."""
    want = jax.jit(reference)(*inputs)
    peer_ms = {name: _time(fn, *inputs) * 1e3 for name, fn in peers.items()}
    rows, start = [], time.perf_counter()
    for config in configs:
        if time.perf_counter() - start > args.budget:
            break
        fn = make(config)
        try:
            err = kb.max_abs_err(jax.jit(fn)(*inputs), want)
            ms = _time(fn, *inputs) * 1e3
        except Exception as e:  # noqa: BLE001 -- a config that does not compile is a row
            rows.append((float("inf"), config, " ".join(f"{type(e).__name__}: {e}".split())[:160]))
            continue
        rate = amount / (ms / 1e3)
        if unit == "flops":
            shown = f"{rate / 1e12:.1f} TFLOP/s"
        else:
            shown = f"{rate / 1e9:.0f} GB/s, {rate / BANDWIDTH:.0%} of measured bandwidth"
        rows.append((ms, config, f"err {err:.2e}, {shown}"))
        print(title, config, f"{ms:.3f} ms", rows[-1][2], flush=True)
    rows.sort(key=lambda r: r[0])
    peers_text = ", ".join(f"{n} {t:.3f} ms" for n, t in peer_ms.items())
    lines = [f"## {title}", "", f"Peers: {peers_text}. {len(rows)} of {len(configs)} configs tried.", ""]
    lines += ["| config | ms | vs best peer | note |", "|---|---|---|---|"]
    best_peer = min(peer_ms.values())
    for ms, config, note in rows:
        ratio = "" if ms == float("inf") else f"{ms / best_peer:.2f}x"
        lines.append(f"| {config} | {ms:.3f} | {ratio} | {note} |")
    sections.append("\n".join(lines))
    print(sections[-1], flush=True)


# Memory bandwidth, three ways: the decoders' ceiling.
x = jnp.ones((2**28,), jnp.float32)  # 1 GiB
nbytes = x.size * 4
bw = {
    "x + 1 (read + write)": 2 * nbytes / _time(lambda x: x + 1, x),
    "sum (read)": nbytes / _time(jnp.sum, x),
    "copy (read + write)": 2 * nbytes / _time(lambda x: x.copy(), x),
}
del x
BANDWIDTH = max(bw.values())
sections.append("## Memory bandwidth\n\n" + "\n".join(f"- {k}: {v / 1e9:.0f} GB/s" for k, v in bw.items()))
print(sections[-1], flush=True)

# Flash attention, experiment 04's shape.
B, T, N, K, H = 4, 4096, 32, 8, 128
q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
pos = jnp.broadcast_to(jnp.arange(T), (B, T))
flops = 4 * B * N * T * T * H / 2


def flash(bs):
    return functools.partial(fa.flash_attention, q_positions=pos, kv_positions=pos, block_sizes=bs)


def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


fwd_configs = [
    fa.BlockSizes(block_q=bq, block_kv=bk, num_warps=w, num_stages=s)
    for bq, bk, w, s in itertools.product((128, 64), (64, 128, 32), (8, 4), (2, 3, 1))
]
sweep(
    "flash attention fwd",
    fwd_configs,
    flash,
    (q, k, v),
    functools.partial(fa.attention_reference, q_positions=pos, kv_positions=pos),
    unit="flops",
    amount=flops,
    peers={"cuDNN": cudnn},
)
d_out = _normal(3, (B, T, N, H), jnp.float32)


def grads(fn):
    return kb.grads(fn, (0, 1, 2), d_out)


bwd_configs = [
    fa.BlockSizes(block_q_bwd=bq, block_kv_bwd=bk, num_warps=w, num_stages=s)
    for bq, bk, w, s in itertools.product((64, 128, 32), (64, 128, 32), (8, 4), (2, 1))
]
sweep(
    "flash attention fwd+bwd",
    bwd_configs,
    lambda bs: grads(flash(bs)),
    (q, k, v),
    grads(functools.partial(fa.attention_reference, q_positions=pos, kv_positions=pos)),
    unit="flops",
    amount=3.5 * flops,
    peers={"cuDNN": grads(cudnn)},
)
del q, k, v

# Paged GQA decode and MLA decode, experiment 04's shapes.
Bd, ctx = 32, 4096
lengths = jnp.full((Bd,), ctx, jnp.int32)
q_pos = (lengths - 1)[:, None]


def tables_for(page_size, key):
    pages = -(-ctx // page_size)
    return jax.random.permutation(jax.random.key(key), Bd * pages).reshape(Bd, pages).astype(jnp.int32)


Kd, Nd, ps = 8, 32, 16
tables = tables_for(ps, 11)
qd = _normal(12, (Bd, 1, Nd, H))
kp, vp = _normal(13, (Bd * ctx // ps, ps, Kd, H)), _normal(14, (Bd * ctx // ps, ps, Kd, H))
paged_configs = [
    pa.BlockSizes(num_splits=sp, num_warps=w, num_stages=s)
    for sp, w, s in itertools.product((4, 8, 2, 16), (4, 8), (2, 3, 1))
]


def paged_reference(q, kp, vp):
    return pa.paged_attention_reference(q, kp, vp, tables, lengths, q_pos)


sweep(
    "paged attention decode",
    paged_configs,
    lambda bs: lambda q, kp, vp: pa.paged_attention(q, kp, vp, tables, lengths, q_pos, block_sizes=bs),
    (qd, kp, vp),
    paged_reference,
    unit="bytes",
    amount=2 * Bd * ctx * Kd * H * 2,
    peers={"XLA reference": paged_reference},
)
del kp, vp

Nm, A, R, ps_m = 128, 512, 64, 64
tables = tables_for(ps_m, 15)
q_a, q_r = _normal(16, (Bd, 1, Nm, A)), _normal(17, (Bd, 1, Nm, R))
c, kr = _normal(18, (Bd * ctx // ps_m, ps_m, A)), _normal(19, (Bd * ctx // ps_m, ps_m, R))
mla_configs = [
    pa.BlockSizes(num_splits=sp, num_warps=w, num_stages=s, rows_per_block=rb)
    for rb, sp, w, s in itertools.product((64, 32, 16), (4, 8, 2), (8, 4), (1, 2))
]
sweep(
    "MLA latent decode",
    mla_configs,
    lambda bs: lambda *a: md.mla_decode(*a, tables, lengths, q_pos, scale=192**-0.5, block_sizes=bs),
    (q_a, q_r, c, kr),
    lambda *a: md.mla_decode_reference(*a, tables, lengths, q_pos, scale=192**-0.5),
    unit="bytes",
    amount=Bd * ctx * (A + R) * 2,
    peers={"XLA reference": lambda *a: md.mla_decode_reference(*a, tables, lengths, q_pos, scale=192**-0.5)},
)

text = (
    f"# GPU kernel tuning sweep\n\nCommand: `python experiments/gpu_tune.py --repeats {args.repeats} "
    f"--budget {args.budget}`\n\nMachine: {machine.describe()}  \nDate: {datetime.date.today()}\n\n"
    f"bfloat16. Measured bandwidth ceiling (best of three): {BANDWIDTH / 1e9:.0f} GB/s. "
    "Decoders are compared with their XLA references.\n\n" + "\n\n".join(sections) + "\n"
)
slug = "_".join(device_kind.lower().split())
path = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"gpu_tune_{slug}.md")
path.write_text(text)
print(f"wrote {path}")
