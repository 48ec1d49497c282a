"""Timing and checking helpers shared by the kernel experiments (04_kernels.py, gpu_tune.py)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *xs, repeats: int) -> float:
    """Median seconds of ``fn(*xs)`` (jitted) over ``repeats`` runs, after a warm-up run."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*xs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_abs_err(a, b) -> float:
    """Largest ``|a - b|`` over the leaves of two pytrees, in float32."""
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def normal(key: int, shape, dtype) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def grads(fn, argnums, cotangent):
    """The gradients of ``sum(fn(*a) * cotangent)``: a backward pass seeded with ``cotangent``."""
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent), argnums=argnums)
