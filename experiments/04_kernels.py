"""Every Pallas kernel against its reference, written to experiments/results/04_kernels.md.

On a GPU or TPU (``jax.devices()[0].platform``), each kernel runs compiled at realistic
shapes (bfloat16, head dim 128) and is timed against its XLA reference (and flash attention
also against ``jax.nn.dot_product_attention(implementation="cudnn")`` on GPUs): median of
``--repeats`` runs after a warm-up. Compute-bound kernels report achieved FLOP/s against the
chip's peak (``llmarch.train.metrics.PEAK_FLOPS``), decoding and gathers report bytes/s
against its HBM bandwidth (``PEAK_BYTES`` below). Goals on an H100: flash attention forward
within 1.2x of cuDNN; paged and MLA decode at >= 70% of HBM bandwidth.

On a CPU, Pallas kernels run only in the interpreter, so timings would measure the
interpreter: the script reports interpret-mode correctness only (max |kernel - reference|,
values and gradients) at small shapes, and says so.

    python experiments/04_kernels.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import pathlib

import _kernel_bench as kb
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import flash_attention as fa
from kernels_pallas import grouped_matmul as gm
from kernels_pallas import memory_lookup as ml
from kernels_pallas import mla_decode as md
from kernels_pallas import paged_attention as pa
from llmarch import machine
from llmarch.train import metrics

# HBM bandwidth per chip (bytes/s), by the longest matching device-kind prefix.
PEAK_BYTES = {
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
    "NVIDIA H100": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100": 2.0e12,
}

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument(
    "--out",
    default=None,
    help="results file (default: results/04_kernels.md on a CPU, "
    "results/04_kernels_<device kind>.md on an accelerator)",
)
args = parser.parse_args()

platform = jax.devices()[0].platform
device_kind = jax.devices()[0].device_kind
ACCELERATOR = platform in ("gpu", "tpu")  # realistic shapes, compiled kernels
TIMED = ACCELERATOR  # time and report throughput (meaningless for the interpreter)
INTERPRET = not ACCELERATOR
DTYPE = jnp.bfloat16 if ACCELERATOR else jnp.float32


def _peak(table: dict[str, float]) -> float | None:
    matches = [name for name in table if device_kind.startswith(name)]
    return table[max(matches, key=len)] if matches else None


def _time(fn, *xs) -> float:
    return kb.median_seconds(fn, *xs, repeats=args.repeats)


def _normal(key, shape, dtype=DTYPE):
    return kb.normal(key, shape, dtype)


rows = []  # (kernel, shape, error, kernel ms, reference ms, extra ms, 'flops'/'bytes', per second)


def record(name, shape, kernel, reference, inputs, **kw):
    """Compares (and on an accelerator times) ``kernel`` and ``reference`` on ``inputs``. A kernel
    that fails to lower or run becomes a row saying so, so one failure does not hide the others."""
    try:
        _record(name, shape, kernel, reference, inputs, **kw)
    except Exception as e:  # noqa: BLE001 -- reported in the table, not swallowed
        message = " ".join(f"{type(e).__name__}: {e}".split())[:300].replace("|", "/")
        rows.append((name, shape, f"FAILED ({message})", None, None, None, None, None))
    print(rows[-1], flush=True)


def _record(name, shape, kernel, reference, inputs, *, flops=None, bytes_=None, extra=None):
    err = kb.max_abs_err(jax.jit(kernel)(*inputs), jax.jit(reference)(*inputs))
    if not TIMED:
        rows.append((name, shape, err, None, None, None, None, None))
        return
    t_k, t_r = _time(kernel, *inputs), _time(reference, *inputs)
    t_x = _time(extra, *inputs) if extra is not None else None
    kind, amount = ("flops", flops) if flops is not None else ("bytes", bytes_)
    t_x = None if t_x is None else t_x * 1e3
    rows.append((name, shape, err, t_k * 1e3, t_r * 1e3, t_x, kind, amount / t_k))


def _measured_peaks() -> dict[str, float]:
    """This chip's ceilings measured here (medians of ``--repeats``): a bf16 8192^3 matmul
    (FLOP/s), and the faster of two passes over a 1 GiB array (bytes/s): elementwise ``x + 1``
    counting bytes read and written (XLA cannot simplify it away as it could ``x * 1``), and a
    sum, which only reads."""
    n = 8192
    a, b = _normal(30, (n, n), jnp.bfloat16), _normal(31, (n, n), jnp.bfloat16)
    x = jnp.ones((2**28,), jnp.float32) if ACCELERATOR else jnp.ones((2**20,), jnp.float32)
    mm = _time(lambda a, b: a @ b, a, b)
    elementwise, read = _time(lambda x: x + 1, x), _time(jnp.sum, x)
    nbytes = x.size * x.dtype.itemsize
    return {"flops": 2 * n**3 / mm, "bytes": max(2 * nbytes / elementwise, nbytes / read)}


# ---------------------------------------------------------------------------------- attention
B, T, N, K, H = (4, 4096, 32, 8, 128) if ACCELERATOR else (1, 40, 4, 2, 16)
q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
pos = jnp.broadcast_to(jnp.arange(T), (B, T))
blocks = None if ACCELERATOR else fa.BlockSizes(16, 16, 16, 16)
flash = functools.partial(
    fa.flash_attention, q_positions=pos, kv_positions=pos, block_sizes=blocks, interpret=INTERPRET
)
ref = functools.partial(fa.attention_reference, q_positions=pos, kv_positions=pos)
cudnn = None
if platform == "gpu":

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


attn_flops = 4 * B * N * T * T * H / 2  # two matmuls, causal half
shape = f"B={B} T=S={T} N={N} K={K} H={H} causal"
record("flash attention fwd", shape, flash, ref, (q, k, v), flops=attn_flops, extra=cudnn)
d_out = _normal(3, (B, T, N, H), jnp.float32)
record(
    "flash attention fwd+bwd",
    shape,
    kb.grads(flash, (0, 1, 2), d_out),
    kb.grads(ref, (0, 1, 2), d_out),
    (q, k, v),
    flops=3.5 * attn_flops,
    extra=None if cudnn is None else kb.grads(cudnn, (0, 1, 2), d_out),
)
q_w = functools.partial(flash, sliding_window=T // 8)
r_w = functools.partial(ref, sliding_window=T // 8)
record("flash attention fwd, window T/8", shape, q_w, r_w, (q, k, v), flops=4 * B * N * T * (T // 8) * H)

# ------------------------------------------------------------------------------ grouped matmul
M, Dm, F, E = (16384, 4096, 2048, 8) if ACCELERATOR else (45, 24, 40, 5)
sizes = np.random.default_rng(0).multinomial(M, np.ones(E) / E).astype(np.int32)
sizes[1] = 0  # an empty expert
sizes[0] += M - sizes.sum()
sizes = jnp.asarray(sizes)
lhs, rhs = _normal(4, (M, Dm)), _normal(5, (E, Dm, F))
g_blocks = None if ACCELERATOR else gm.BlockSizes(8, 8, 8)
gmm_k = functools.partial(gm.gmm, group_sizes=sizes, block_sizes=g_blocks, interpret=INTERPRET)
gmm_r = functools.partial(gm.gmm_xla, group_sizes=sizes)
shape = f"M={M} K={Dm} N={F} E={E} (one empty)"
record("gmm", shape, gmm_k, gmm_r, (lhs, rhs), flops=2 * M * Dm * F)
d_out = _normal(6, (M, F), jnp.float32)
record(
    "gmm fwd+bwd (gmm, gmm, tgmm)",
    shape,
    kb.grads(gmm_k, (0, 1), d_out),
    kb.grads(gmm_r, (0, 1), d_out),
    (lhs, rhs),
    flops=6 * M * Dm * F,
)

# ------------------------------------------------------------------------------ memory lookup
Mm, Dv, Bt, J = (262144, 1024, 8192, 32) if ACCELERATOR else (64, 24, 9, 6)
table = _normal(7, (Mm, Dv))
idx = jax.random.randint(jax.random.key(8), (Bt, J), 0, Mm)
wts = _normal(9, (Bt, J), jnp.float32)
m_blocks = (
    None
    if ACCELERATOR
    else ml.BlockSizes(picks_per_step=4, tokens_per_call=4, entries_per_call=16, block_b=4, block_d=8)
)
look_k = functools.partial(ml.memory_lookup, block_sizes=m_blocks, interpret=INTERPRET)
itemsize = jnp.dtype(DTYPE).itemsize
shape = f"M={Mm} D={Dv} B={Bt} J={J}"
record(
    "memory lookup",
    shape,
    lambda t, w: look_k(t, idx, w),
    lambda t, w: ml.memory_lookup_reference(t, idx, w),
    (table, wts),
    bytes_=Bt * J * Dv * itemsize + Bt * Dv * itemsize,
)
d_out = _normal(10, (Bt, Dv), jnp.float32)
record(
    "memory lookup fwd+bwd",
    shape,
    kb.grads(lambda t, w: look_k(t, idx, w), (0, 1), d_out),
    kb.grads(lambda t, w: ml.memory_lookup_reference(t, idx, w), (0, 1), d_out),
    (table, wts),
    bytes_=3 * Bt * J * Dv * itemsize + Mm * Dv * 4,
)

W = 4  # UltraMem's implicit value expansion: each pick adds into one of W blocks
blocks = jax.random.randint(jax.random.key(20), (Bt, J), 0, W)
d_out = _normal(21, (Bt, W, Dv), jnp.float32)
record(
    f"memory lookup grouped (W={W}) fwd+bwd",
    shape,
    kb.grads(
        lambda t, w: ml.memory_lookup_grouped(
            t, idx, w, blocks, W, block_sizes=m_blocks, interpret=INTERPRET
        ),
        (0, 1),
        d_out,
    ),
    kb.grads(lambda t, w: ml.memory_lookup_grouped_reference(t, idx, w, blocks, W), (0, 1), d_out),
    (table, wts),
    bytes_=3 * Bt * J * Dv * itemsize + Mm * Dv * 4,
)

# ---------------------------------------------------------------------------- paged attention
Bd, Kd, Nd, ps, ctx = (32, 8, 32, 16, 4096) if ACCELERATOR else (3, 2, 4, 4, 21)
max_pages = -(-ctx // ps)
P = Bd * max_pages
tables = jax.random.permutation(jax.random.key(11), P).reshape(Bd, max_pages).astype(jnp.int32)
lengths = jnp.full((Bd,), ctx, jnp.int32)
qd = _normal(12, (Bd, 1, Nd, H))
kp, vp = _normal(13, (P, ps, Kd, H)), _normal(14, (P, ps, Kd, H))
q_pos = (lengths - 1)[:, None]
p_blocks = None if ACCELERATOR else pa.BlockSizes(pages_per_block=2, num_splits=2)
record(
    "paged attention decode",
    f"B={Bd} N={Nd} K={Kd} H={H} page={ps} context={ctx}",
    lambda q, kp, vp: pa.paged_attention(
        q, kp, vp, tables, lengths, q_pos, block_sizes=p_blocks, interpret=INTERPRET
    ),
    lambda q, kp, vp: pa.paged_attention_reference(q, kp, vp, tables, lengths, q_pos),
    (qd, kp, vp),
    bytes_=2 * Bd * ctx * Kd * H * itemsize,
)

# -------------------------------------------------------------------------------- MLA decode
Nm, A, R, ps_m = (128, 512, 64, 64) if ACCELERATOR else (4, 32, 8, 4)
max_pages = -(-ctx // ps_m)
P = Bd * max_pages
tables = jax.random.permutation(jax.random.key(15), P).reshape(Bd, max_pages).astype(jnp.int32)
q_a, q_r = _normal(16, (Bd, 1, Nm, A)), _normal(17, (Bd, 1, Nm, R))
c, kr = _normal(18, (P, ps_m, A)), _normal(19, (P, ps_m, R))
scale = 192**-0.5
record(
    "MLA latent decode",
    f"B={Bd} N={Nm} A={A} R={R} page={ps_m} context={ctx}",
    lambda *a: md.mla_decode(
        *a, tables, lengths, q_pos, scale=scale, block_sizes=p_blocks, interpret=INTERPRET
    ),
    lambda *a: md.mla_decode_reference(*a, tables, lengths, q_pos, scale=scale),
    (q_a, q_r, c, kr),
    bytes_=Bd * ctx * (A + R) * itemsize,
)


# ------------------------------------------------------------------------------------- report
def _rate(kind: str, value: float) -> str:
    return f"{value / 1e12:.1f} TFLOP/s" if kind == "flops" else f"{value / 1e9:.0f} GB/s"


def _err(e) -> str:
    return e if isinstance(e, str) else f"{e:.2e}"


if TIMED:
    measured = _measured_peaks()
    datasheet = {"flops": _peak(metrics.PEAK_FLOPS), "bytes": _peak(PEAK_BYTES)}
    header = (
        "| kernel | shape | max abs err | kernel (ms) | XLA reference (ms) | cuDNN (ms) | "
        "achieved | of measured peak | of datasheet peak |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for n, s, e, tk, tr, tx, kind, value in rows:
        if tk is None:
            lines.append(f"| {n} | {s} | {_err(e)} | | | | | | |")
            continue
        sheet = datasheet[kind]
        lines.append(
            f"| {n} | {s} | {_err(e)} | {tk:.3f} | {tr:.3f} | {'' if tx is None else f'{tx:.3f}'} | "
            f"{_rate(kind, value)} | {value / measured[kind]:.0%} | "
            f"{'' if sheet is None else f'{value / sheet:.0%}'} |"
        )
    body = "\n".join(lines)
    mode = (
        f"Compiled kernels on {device_kind}, {DTYPE.__name__}; medians of {args.repeats} runs. "
        "Error: max |kernel - XLA reference| (bf16 outputs). Measured peaks, this run: "
        f"{_rate('flops', measured['flops'])} (bf16 8192^3 matmul), {_rate('bytes', measured['bytes'])} "
        f"(best of a 1 GiB elementwise pass and a 1 GiB sum). Datasheet peaks: {datasheet['flops']} FLOP/s, "
        f"{datasheet['bytes']} bytes/s."
    )
else:
    header = "| kernel | shape | max abs err vs reference |\n|---|---|---|"
    body = "\n".join(f"| {n} | {s} | {_err(e)} |" for n, s, e, *_ in rows)
    mode = (
        "**Interpret mode, correctness only.** This machine has no GPU or TPU: Pallas runs "
        "the kernels in its interpreter (the TPU build), so timings would measure the "
        "interpreter and are not reported. Errors are max |kernel - reference| in float32 at "
        "small shapes that still span several blocks, pages and calls; fwd+bwd rows compare "
        "all gradients. An error of 0 means bit-identical (the same summation order)."
    )

text = f"""# 04 Pallas kernels vs their references

Command: `python experiments/04_kernels.py --repeats {args.repeats}`

Machine: {machine.describe()}  \nDate: {datetime.date.today()}

{mode}

{header}
{body}
"""
slug = "" if not ACCELERATOR else "_" + "_".join(device_kind.lower().split())
path = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"04_kernels{slug}.md")
path.write_text(text)
print(text)
print(f"wrote {path}")
