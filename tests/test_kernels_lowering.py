"""Every kernel lowers for TPU (Mosaic) and for NVIDIA GPUs (Pallas' Triton backend).

Exported from this CPU with ``jax.export`` at realistic shapes (head dim 128, page sizes 16
and 64, bfloat16), as docs/architecture.md prescribes for kernels: a tile a target rejects fails
here as it would on the chip. Training kernels export their forward and backward (``value_and_grad``).
Lowering checks the Pallas-to-Mosaic/Triton translation and the tiling rules, not the
chips' own compilers (which run only on the hardware).
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas import cross_entropy as ce
from kernels_pallas import flash_attention as fa
from kernels_pallas import fp8_blockwise_matmul as f8
from kernels_pallas import grouped_matmul as gm
from kernels_pallas import memory_lookup as ml
from kernels_pallas import mla_decode as md
from kernels_pallas import paged_attention as pa

BF16, I32 = jnp.bfloat16, jnp.int32
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def sds(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _export(fn, args, platform):
    kw = {}
    if platform == "cuda":
        kw["disabled_checks"] = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(fn), platforms=[platform], **kw)(*args).mlir_module()


def _loss_and_grads(fn, argnums):
    return jax.value_and_grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=argnums)


def _flash():
    B, T, N, K, H = 2, 1024, 8, 2, 128

    def f(q, k, v, pos, seg):
        return fa.flash_attention(
            q,
            k,
            v,
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            sliding_window=512,
        )

    args = (sds((B, T, N, H)), sds((B, T, K, H)), sds((B, T, K, H)), sds((B, T), I32), sds((B, T), I32))
    return _loss_and_grads(f, (0, 1, 2)), args, 3  # forward, dq, dk/dv


def _gmm():
    M, K, N, E = 2048, 1024, 1536, 8
    args = (sds((M, K)), sds((E, K, N)), sds((E,), I32))
    return _loss_and_grads(gm.gmm, (0, 1)), args, 3  # gmm, gmm (d lhs), tgmm


def _memory_lookup():
    M, D, B, J = 65536, 1024, 256, 32

    def f(table, weights, idx):
        return ml.memory_lookup(table, idx, weights)

    args = (sds((M, D)), sds((B, J), jnp.float32), sds((B, J), I32))
    return _loss_and_grads(f, (0, 1)), args, None  # TPU: several calls (SMEM-sized chunks)


def _memory_lookup_grouped():
    M, D, B, J, W = 65536, 512, 256, 32, 4

    def f(table, weights, idx, blocks):
        return ml.memory_lookup_grouped(table, idx, weights, blocks, W)

    args = (sds((M, D)), sds((B, J), jnp.float32), sds((B, J), I32), sds((B, J), I32))
    return _loss_and_grads(f, (0, 1)), args, None


def _paged(page_size):
    B, T, N, K, H, P, max_pages = 8, 4, 32, 8, 128, 2048, 4096 // page_size
    args = (
        sds((B, T, N, H)),
        sds((P, page_size, K, H)),
        sds((P, page_size, K, H)),
        sds((B, max_pages), I32),
        sds((B,), I32),
        sds((B, T), I32),
    )
    return pa.paged_attention, args, 1


def _mla():
    B, T, N, A, R, P, ps, max_pages = 8, 1, 128, 512, 64, 2048, 64, 64
    args = (
        sds((B, T, N, A)),
        sds((B, T, N, R)),
        sds((P, ps, A)),
        sds((P, ps, R)),
        sds((B, max_pages), I32),
        sds((B,), I32),
        sds((B, T), I32),
    )
    return (lambda *a: md.mla_decode(*a, scale=192**-0.5)), args, 1


def _cross_entropy(transpose_w):
    """Llama 3's vocabulary (128,256: padded to TPU's 512-entry tiles, exact in GPU's 128), bf16
    activations, a float32 weight (cast inside); both weight layouts (tied table, LM head)."""
    B, D, V = 4096, 1024, 128256

    def f(x, w, labels):
        nll, lse = ce.cross_entropy(x, w, labels, transpose_w=transpose_w)
        return nll + 1e-4 * lse**2

    w = sds((D, V) if transpose_w else (V, D), jnp.float32)
    # forward; backward: TPU a dx and a dW kernel, GPU one kernel with atomics
    return _loss_and_grads(f, (0, 1)), (sds((B, D)), w, sds((B,), I32)), {"tpu": 3, "cuda": 2}


def _fp8_blockwise_matmul():
    """DeepSeek-V3's FP8 GEMM at a 7168-wide projection: 4096 tokens, e4m3 operands, 128-scales."""
    M, K, N = 4096, 7168, 2048
    F8, F32 = jnp.float8_e4m3fn, jnp.float32
    args = (sds((M, K), F8), sds((M, K // 128), F32), sds((K, N), F8), sds((K // 128, N // 128), F32))
    return f8.fp8_blockwise_matmul, args, 1  # forward only


KERNELS = {
    "cross_entropy": lambda: _cross_entropy(False),
    "cross_entropy_lm_head": lambda: _cross_entropy(True),
    "flash_attention": _flash,
    "fp8_blockwise_matmul": _fp8_blockwise_matmul,
    "grouped_matmul": _gmm,
    "memory_lookup": _memory_lookup,
    "memory_lookup_grouped": _memory_lookup_grouped,
    "paged_attention_page16": lambda: _paged(16),
    "paged_attention_page64": lambda: _paged(64),
    "mla_decode": _mla,
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_lowers(kernel, platform):
    backend = jax.default_backend()
    if backend in ("gpu", "tpu") and {"gpu": "cuda"}.get(backend, backend) != platform:
        # On an accelerator, kernels_pallas._common.dispatch builds that chip's kernel only
        # (no platform_dependent), so the other target is exported from a CPU host, as in CI.
        pytest.skip(f"exporting for {platform} from a {backend} backend")
    fn, args, num_calls = KERNELS[kernel]()
    module = _export(fn, args, platform)
    calls = module.count(CUSTOM_CALL[platform])
    assert calls >= 1, f"{kernel} exported for {platform} without a Pallas kernel"
    if isinstance(num_calls, dict):
        num_calls = num_calls[platform]
    if num_calls is not None:
        assert calls == num_calls
