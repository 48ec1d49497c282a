"""``attention_xla`` (the XLA path of ``llmarch.ops.attention``) against ``attention_reference``:
values and gradients, every mask option, GQA/MQA/MHA, float32 and bfloat16.

Tolerances as in ``test_kernels_flash_attention.py``, relative to the largest magnitude of the
expected array: float32 2e-5; bfloat16 1.5e-2 against the float32 reference on the same
bf16-rounded inputs.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from test_kernels_flash_attention import _inputs, _options, assert_close

from kernels_pallas._attention_xla import attention_xla
from kernels_pallas.flash_attention import attention_reference
from llmarch import ops


def _value_and_grads(fn, d_out, *args):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(d_out.astype(out.dtype)))


def _check(shape, dtype, opts):
    B, T, S, N, K, H = shape
    q, k, v, d_out = _inputs(B, T, S, N, K, H, dtype)
    got = jax.jit(functools.partial(_value_and_grads, functools.partial(attention_xla, **opts), d_out))(
        q, k, v
    )
    want = _value_and_grads(
        functools.partial(attention_reference, **opts), d_out, *(x.astype(jnp.float32) for x in (q, k, v))
    )
    assert got[0].dtype == dtype
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert_close(a, b, dtype, f"{name} {shape} {dtype.__name__} {opts}")


SHAPES = (
    (1, 13, 13, 4, 2, 16),  # GQA, G = 2
    (2, 9, 17, 6, 1, 8),  # MQA, queries at the end of the keys (decoding against a cache)
    (2, 8, 8, 3, 3, 4),  # MHA
)


@pytest.mark.parametrize("option", ["causal", "window", "segments", "noncausal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_xla_matches_reference(shape, dtype, option):
    B, T, S = shape[:3]
    _check(shape, dtype, _options(option, B, T, S))


def test_attention_xla_scale_and_empty_rows():
    """An explicit scale (MLA passes its own); queries that see no key (position -1, as padding
    has) get zero output and zero gradients, never NaN."""
    B, T, S = 2, 6, 6
    kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    q_pos = kv_pos.at[1, :2].set(-1)
    _check((B, T, S, 4, 2, 8), jnp.float32, dict(q_positions=q_pos, kv_positions=kv_pos, scale=0.3))
    q, k, v, d_out = _inputs(B, T, S, 4, 2, 8, jnp.float32)
    out, dq, dk, dv = _value_and_grads(
        functools.partial(attention_xla, q_positions=q_pos, kv_positions=kv_pos), d_out, q, k, v
    )
    assert not jnp.any(out[1, :2]) and not jnp.any(dq[1, :2])
    assert all(bool(jnp.isfinite(x).all()) for x in (out, dq, dk, dv))


def test_ops_attention_runs_attention_xla_on_cpu():
    assert ops.resolve("attention", "xla")[1] is attention_xla
    if jax.default_backend() == "cpu":
        assert ops.resolve("attention")[1] is attention_xla
