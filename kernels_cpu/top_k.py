"""``jax.lax.top_k`` of float32 rows on CPU: the C++ kernel ``top_k.cc`` (see its header for why
and how), called through ``jax.ffi``.

``llmarch.ops.top_k`` sends float32 selections here on the CPU backend, unsharded, when the
kernel is built; ``jax.lax.top_k`` is the specification it matches bit for bit (values, indices,
the order of ties and of NaNs). Differentiable in ``x`` as ``jax.lax.top_k`` is: the values'
tangent is ``x``'s tangent at the chosen indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu.build import load


def supports(x_dtype) -> bool:
    """Whether dispatch sends a selection of this dtype here: float32, and the kernel built."""
    return jnp.dtype(x_dtype) == jnp.float32 and load() is not None


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(values [..., k] float32, indices [..., k] int32)``: the ``k`` largest entries of each
    row of ``x [..., n]``, best first, as ``jax.lax.top_k``."""
    if load() is None:
        raise RuntimeError("the CPU kernels are unavailable; check kernels_cpu.build.unavailable()")
    if x.ndim < 1 or jnp.dtype(x.dtype) != jnp.float32:
        raise ValueError(f"top_k: x must be float32 with at least one axis, got {x.dtype} {x.shape}")
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"top_k: k={k} must be in [0, {x.shape[-1]}] (the last axis of x {x.shape})")
    out = x.shape[:-1] + (k,)
    return jax.ffi.ffi_call(
        "llmarch_top_k",
        (jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32)),
        vmap_method="broadcast_all",  # the kernel treats every leading axis as rows
    )(x, k=np.int64(k))


@top_k.defjvp
def _top_k_jvp(k, primals, tangents):
    (x,), (dx,) = primals, tangents
    values, indices = top_k(x, k)
    d_values = jnp.take_along_axis(dx, indices, axis=-1)
    return (values, indices), (d_values, np.zeros(indices.shape, jax.dtypes.float0))
