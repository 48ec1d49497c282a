"""The harness's profile reader (experiments/_profile.py): interval unions, the dots of optimized
HLO with their shapes and FLOPs, and a real trace of a small jitted program. No timing asserted."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import _profile as profile  # noqa: E402


def test_union_counts_overlaps_once():
    assert profile.union_ns([]) == 0
    assert profile.union_ns([(0, 10), (5, 15), (20, 30)]) == 25
    assert profile.union_ns([(20, 30), (0, 10), (2, 3)]) == 20


def test_dot_shapes_and_flops_from_hlo():
    def f(x, w, a, b):
        return x @ w, jnp.einsum("bij,bjk->bik", a, b)

    args = (jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((2, 4, 5)), jnp.ones((2, 5, 3)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    shapes = set(profile.dot_shapes(hlo).values())
    flops = sorted(s.flops for s in shapes)
    assert flops == sorted([2 * 8 * 16 * 32, 2 * 2 * 4 * 5 * 3]), shapes
    matmul = next(s for s in shapes if s.flops == 2 * 8 * 16 * 32)
    assert matmul.rhs_bytes == 4 * 16 * 32
    a, b = (
        jnp.asarray(np.random.default_rng(0).standard_normal(s, np.float32)) for s in (matmul.lhs, matmul.rhs)
    )
    assert jax.lax.dot_general(a, b, matmul.dims).shape == (8, 32)  # the parsed dims are usable
    assert profile.lone_dot_seconds(matmul, repeats=2, stream_bytes=4 * 16 * 32 * 3) > 0


def test_trace_and_breakdown_of_a_program():
    f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
    x, w = jnp.ones((64, 128)), jnp.ones((128, 256))
    f(x, w).block_until_ready()
    events = profile.trace(lambda: f(x, w).block_until_ready(), 2)
    parts = profile.breakdown(events, per=2)
    assert parts["span"] > 0 and 0 <= parts["idle"] <= parts["span"]
    assert 0 < parts["dots"] <= parts["span"]
    table = profile.dot_table(events, f.lower(x, w).compile().as_text(), per=2)
    assert sum(r["count"] for r in table) == 2  # two products per call
    assert all(r["lone_s"] > 0 and r["median_s"] > 0 for r in table)


def test_kernel_calls_are_named_and_counted_as_products():
    """A ``kernels_cpu.dense_matmul`` call shows as ``ffi_call`` to the profiler: ``ffi_kinds``
    names it by its kernel, ``dot_shapes`` reads its operands, and ``breakdown`` counts it as a
    product."""
    import pytest

    from kernels_cpu.build import load
    from kernels_cpu.dense_matmul import dense_matmul

    if load() is None:
        pytest.skip("the CPU kernels are not built on this machine")
    f = jax.jit(lambda x, w: jnp.tanh(dense_matmul(x, w)))
    x, w = jnp.ones((2, 128)), jnp.ones((128, 256))
    f(x, w).block_until_ready()
    hlo = f.lower(x, w).compile().as_text()
    kinds = profile.ffi_kinds(hlo)
    assert list(kinds.values()) == ["dense_matmul"]
    (name,) = kinds
    shape = profile.dot_shapes(hlo)[name]
    assert (shape.lhs, shape.rhs, shape.kernel, shape.flops) == (
        (2, 128),
        (128, 256),
        True,
        2 * 2 * 128 * 256,
    )
    events = profile.trace(lambda: f(x, w).block_until_ready(), 2)
    parts = profile.breakdown(events, per=2, kinds=kinds)
    assert parts["dense_matmul"] > 0 and parts["dots"] >= parts["dense_matmul"]
    assert "ffi_call" not in parts
    (row,) = profile.dot_table(events, hlo, per=2)
    assert row["count"] == 1 and row["lone_s"] > 0
