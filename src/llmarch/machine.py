"""The machine's description and its measured rooflines, written beside every benchmark or
experiment result.

A CPU has no published peak, so the two rooflines a result is compared with are measured here,
in the same process as the result: the float32 matmul rate XLA reaches (compute-bound work) and
the rate at which an XLA matrix-vector product streams a large matrix from memory (bandwidth-bound
work, e.g. batch-1 decoding, which reads every weight once per token).
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp


def describe() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{len(devices)} x {'/'.join(kinds)} ({jax.default_backend()}), "
        f"python {platform.python_version()}, jax {jax.__version__}"
    )


def _best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile, and touch the memory once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(n: int = 1024, *, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 ``[n,n] @ [n,n]`` matmul, best of ``repeats``: the
    compute roofline of this device (on a CPU, the stand-in for a published peak)."""
    if n <= 0 or repeats <= 0:
        raise ValueError(f"matmul_flops: n={n} and repeats={repeats} must be > 0")
    a = jnp.ones((n, n), jnp.float32)
    return 2 * n**3 / _best_seconds(jax.jit(lambda a: a @ a), a, repeats=repeats)


def stream_bandwidth(nbytes: int = 256 * 2**20, *, width: int = 4096, repeats: int = 10) -> float:
    """Bytes/s at which a jitted float32 matrix-vector product ``[rows,width] @ [width]`` reads a
    ``nbytes`` matrix, best of ``repeats``: the bandwidth roofline of work that reads each byte
    once (the matrix is far larger than the caches, so it streams from memory every time)."""
    rows = nbytes // (4 * width)
    if rows <= 0 or repeats <= 0:
        raise ValueError(
            f"stream_bandwidth: nbytes={nbytes} must hold one row of width={width} float32 "
            f"and repeats={repeats} must be > 0"
        )
    m = jnp.ones((rows, width), jnp.float32)
    v = jnp.ones((width,), jnp.float32)
    seconds = _best_seconds(jax.jit(lambda m, v: m @ v), m, v, repeats=repeats)
    return rows * width * 4 / seconds
