"""The CPU kernels (``kernels_cpu``: C++ through XLA's FFI) against their specifications, their
dispatch from ``llmarch.ops``, and the fallback when they cannot be built.

The quantized matmul takes random stored integers in each format (the same independent numpy
packer as the Pallas kernel's tests), with N spanning several 512-column tiles and a ragged last
one, so the work sharing between threads is exercised. Tolerance as there: float32, 2e-5 of the
largest expected magnitude (only the summation order differs).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_quantized_matmul import activations, assert_close, make_weight

from kernels_cpu import build
from kernels_cpu import quantized_matmul as cq
from kernels_pallas.quantized_matmul import quantized_matmul_reference
from llmarch import ops
from llmarch.quant.tensor import QuantizedTensor
from llmarch.quant.tensor import quantize as quantize_tensor

# CI must run these (under CI=true a kernel that cannot be built fails them instead of skipping).
needs_kernels = pytest.mark.skipif(
    build.load() is None and os.environ.get("CI") != "true",
    reason=f"CPU kernels not built here: {build.unavailable()}",
)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_quantized_matmul_matches_reference(bits, symmetric, group_size, M):
    K, N = 96, 1100  # three column tiles, the last one ragged
    q, scale, zero, w = make_weight(K, N, bits, symmetric, group_size)
    x = activations(M, K, jnp.float32)
    got = jax.jit(lambda x: cq.quantized_matmul(x, q, scale, zero, bits=bits))(x)
    want = quantized_matmul_reference(x, q, scale, zero, bits=bits, group_size=group_size)
    assert_close(got, want, jnp.float32, f"bits={bits} symmetric={symmetric} g={group_size} M={M}")
    assert_close(got, np.asarray(x) @ w, jnp.float32)


@needs_kernels
def test_quantized_matmul_in_loops_and_vmap():
    """Inside a while loop (the engine's multi-step decode), a scan, and vmap (one call per row)."""
    q, scale, zero, w = make_weight(64, 600, 4, True, 16)
    x = activations(2, 64, jnp.float32)
    call = lambda x: cq.quantized_matmul(x, q, scale, zero, bits=4)  # noqa: E731
    want = np.asarray(x) @ w

    def body(i, acc):
        return acc + call(x)

    assert_close(jax.jit(lambda: jax.lax.fori_loop(0, 3, body, jnp.zeros((2, 600))))(), 3 * want, jnp.float32)
    ys = jax.jit(lambda: jax.lax.scan(lambda c, xi: (c, call(xi)), 0, jnp.stack([x, 2 * x]))[1])()
    assert_close(ys[1], 2 * want, jnp.float32)
    assert_close(jax.jit(jax.vmap(call))(x[:, None]).reshape(2, 600), want, jnp.float32)


def _qt(K, N, bits, kind="int"):
    q, scale, zero, _ = make_weight(K, N, bits, True, None)
    return QuantizedTensor(q, scale, zero, bits, None, kind, (K, N))


def _uses_kernel(fn, *args) -> bool:
    return "llmarch_quantized_matmul" in jax.jit(fn).lower(*args).as_text()


@needs_kernels
def test_ops_dispatches_decode_rows_to_the_kernel_and_the_rest_to_xla():
    qt = _qt(64, 128, 8)
    fn = lambda x: ops.quantized_matmul(x, qt)  # noqa: E731
    assert _uses_kernel(fn, jnp.ones((1, 64)))
    assert _uses_kernel(fn, jnp.ones((2, 8, 64)))  # [B, T, K]: 16 rows
    assert not _uses_kernel(fn, jnp.ones((17, 64)))  # prefill: XLA's GEMM on dequantized tiles
    assert not _uses_kernel(lambda x: ops.quantized_matmul(x, qt, impl="xla"), jnp.ones((1, 64)))
    x = activations(3, 64, jnp.float32)
    assert_close(ops.quantized_matmul(x, qt), ops.quantized_matmul(x, qt, impl="xla"), jnp.float32)
    assert ops.quantized_matmul(x.astype(jnp.bfloat16), qt).dtype == jnp.bfloat16


@needs_kernels
def test_ops_keeps_sharded_programs_on_xla():
    """The FFI call is opaque to the partitioner: under a mesh of several devices, the XLA path."""
    qt = _qt(64, 128, 8)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert not _uses_kernel(lambda x: ops.quantized_matmul(x, qt), jnp.ones((1, 64)))


def test_impl_cpu_rejects_what_the_kernel_does_not_take():
    with pytest.raises(ValueError, match="impl='cpu' cannot take this quantized_matmul"):
        ops.quantized_matmul(jnp.ones((17, 64)), _qt(64, 128, 8), impl="cpu")
    with pytest.raises(ValueError, match="impl='gpu' is invalid"):
        ops.quantized_matmul(jnp.ones((1, 64)), _qt(64, 128, 8), impl="gpu")


def _subprocess(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


FALLBACK = """
    import warnings
    import jax.numpy as jnp
    from kernels_cpu import build
    from llmarch import ops
    from llmarch.quant.tensor import QuantizedTensor, rtn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build.load() is None
    print("reason:", build.unavailable())
    print("warned:", [str(w.message) for w in caught])
    q, s, z = rtn(jnp.ones((8, 4)), 8, None, True)
    qt = QuantizedTensor(q, s, z, 8, None, "int", (8, 4))
    print("value:", float(ops.quantized_matmul(jnp.ones((1, 8)), qt).sum()))
    import jax
    from llmarch.layers.einsum import contract
    dense = lambda x: contract("BTD,DF->BTF", x, jnp.ones((16, 8)))
    print("dense kernel:", "llmarch_dense_matmul" in jax.jit(dense).lower(jnp.ones((2, 1, 16))).as_text())
    print("dense value:", float(dense(jnp.ones((1, 1, 16))).sum()))
    ones, idx = jnp.ones((4, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32)
    paged = lambda q: ops.paged_attention(q, ones, ones, idx, jnp.array([3]), jnp.array([[2]]))
    paged_text = jax.jit(paged).lower(jnp.ones((1, 1, 2, 8))).as_text()
    print("paged kernel:", "llmarch_paged_attention" in paged_text)
    print("paged value:", float(paged(jnp.ones((1, 1, 2, 8))).sum()))
    top = lambda x: ops.top_k(x, 2)
    print("top_k kernel:", "llmarch_top_k" in jax.jit(top).lower(jnp.ones((3, 5))).as_text())
    print("top_k value:", top(jnp.arange(5.0))[1].tolist())
    from llmarch.layers.memory_lookup import read_values
    read = lambda t: read_values(t, jnp.array([[0, 2]]), jnp.ones((1, 2, 1)), None, 1)
    print("read kernel:", "llmarch_memory_read" in jax.jit(read).lower(jnp.ones((3, 4))).as_text())
    print("read value:", float(read(jnp.ones((3, 4))).sum()))
"""


def test_turned_off_kernels_fall_back_to_xla():
    out = _subprocess(FALLBACK, LLMARCH_CPU_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert "reason: LLMARCH_CPU_KERNELS=0" in out.stdout
    assert "value: 32.0" in out.stdout
    assert "dense kernel: False" in out.stdout and "dense value: 128.0" in out.stdout
    assert "paged kernel: False" in out.stdout and "paged value: 16.0" in out.stdout
    assert "top_k kernel: False" in out.stdout and "top_k value: [4, 3]" in out.stdout
    assert "read kernel: False" in out.stdout and "read value: 8.0" in out.stdout


def test_a_failing_build_warns_once_and_falls_back(tmp_path):
    out = _subprocess(FALLBACK, CXX="false", LLMARCH_KERNEL_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "reason: building kernels_cpu-" in out.stdout
    assert "llmarch CPU kernels unavailable, using the XLA paths" in out.stdout
    assert "value: 32.0" in out.stdout
    assert "dense kernel: False" in out.stdout and "dense value: 128.0" in out.stdout
    assert "paged kernel: False" in out.stdout and "paged value: 16.0" in out.stdout
    assert "top_k kernel: False" in out.stdout and "top_k value: [4, 3]" in out.stdout
    assert "read kernel: False" in out.stdout and "read value: 8.0" in out.stdout
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


@needs_kernels
@pytest.mark.parametrize("block", [None, 32])
@pytest.mark.parametrize("M", [1, 7])
def test_fp8_weights_match_the_xla_path(block, M):
    """float8_e4m3fn through the kernel's 256-entry table, per channel or in square blocks."""
    w = np.random.default_rng(3).normal(size=(96, 1100)).astype(np.float32)
    w[0, :4] = [0.0, -0.0, 1e-9, 448.0]  # zero, negative zero, a subnormal after scaling, the max
    qt = quantize_tensor(jnp.asarray(w), method="fp8", fp8_block=block)
    x = activations(M, 96, jnp.float32)
    assert _uses_kernel(lambda x: ops.quantized_matmul(x, qt), x)
    assert_close(ops.quantized_matmul(x, qt), ops.quantized_matmul(x, qt, impl="xla"), jnp.float32)


@needs_kernels
def test_fp8_blocks_that_do_not_divide_k_stay_on_xla():
    qt = quantize_tensor(jnp.ones((80, 64)), method="fp8", fp8_block=32)  # K=80: a partial block
    assert not _uses_kernel(lambda x: ops.quantized_matmul(x, qt), jnp.ones((1, 80)))


WARM = """
    import hashlib, os
    import jax, jax.numpy as jnp, numpy as np
    from kernels_cpu.dense_matmul import dense_matmul
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 1408), np.float32))
    ws = [jnp.asarray(rng.standard_normal((1408, 700), np.float32)) for _ in range(4)]
    f = jax.jit(lambda x, ws: [dense_matmul(x, w) for w in ws])
    bits = lambda ys: hashlib.sha256(b"".join(np.asarray(y).tobytes() for y in ys)).hexdigest()
    print("digest:", bits(f(x, ws)))
    assert all(bits(f(x, ws)) == bits(f(x, ws)) for _ in range(20))
    pid = os.fork()  # a child has none of the parent's warm threads: XLA's pool, same bits
    if pid == 0:
        os._exit(0 if bits(f(x, ws)) == bits(f(x, ws)) else 3)
    print("child:", os.waitpid(pid, 0)[1])
"""


@needs_kernels
def test_warm_threads_change_no_bits_and_survive_fork():
    """The kernels' warm helper threads (pool.h) take tasks, never the result: the same bits with
    them, without them (``LLMARCH_CPU_WARM_THREADS=0``: XLA's pool only), and in a forked child."""
    warm = _subprocess(WARM)
    cold = _subprocess(WARM, LLMARCH_CPU_WARM_THREADS="0")
    for out in (warm, cold):
        assert out.returncode == 0, out.stderr
        assert "child: 0" in out.stdout
    digest = [line for line in warm.stdout.splitlines() if line.startswith("digest:")]
    assert digest and digest[0] in cold.stdout
