"""What every kernel wrapper shares: targets, dispatch, compiler params, tiling checks.

A kernel is built for one *target*: ``"tpu"`` (Mosaic) or ``"gpu"`` (Pallas' Triton backend).
The two differ in what a BlockSpec may look like (TPU: the last two block dims divisible by
8 and 128 or whole; Triton: every loaded tile a power of two in size), in their compiler
params (which cannot lower for the other target), and in whether index maps may read
scalar-prefetched data (TPU only). ``interpret=True`` runs a target's kernel with the Pallas
interpreter, on any backend; on CPU it is the only way a kernel runs.

``dispatch`` picks the build at trace time: on a TPU or GPU backend the native one; elsewhere
(CPU, or exporting for another platform from a CPU) ``jax.lax.platform_dependent`` stages out
the TPU and Triton builds side by side, and the interpreted kernel for any other platform. So
``jax.export(..., platforms=["tpu"])`` and ``platforms=["cuda"]`` each lower one build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.intmath import cdiv, next_pow2, round_up  # noqa: F401 (common.cdiv, ...)

TARGETS = ("tpu", "gpu")
# The target whose kernel the interpreter runs when a wrapper gets interpret=True.
INTERPRET_TARGET = "tpu"

# A finite "minus infinity" for masked scores: exp(MASKED - m) underflows to 0 without the
# inf - inf = nan of a true -inf. Masked entries are also zeroed explicitly after the exp.
MASKED = -0.7 * float(np.finfo(np.float32).max)

Build = Callable[[str, bool], Callable[..., Any]]


def dispatch(build: Build, *args: Any, interpret: bool) -> Any:
    """Runs ``build(target, interpret)(*args)`` for the target that will execute it.

    ``build`` must be a pure function of its arguments (it is traced once per target).
    """
    if interpret:
        return build(INTERPRET_TARGET, True)(*args)
    backend = jax.default_backend()
    if backend == "tpu":
        return build("tpu", False)(*args)
    if backend in ("gpu", "cuda", "rocm"):
        return build("gpu", False)(*args)
    gpu = build("gpu", False)
    return jax.lax.platform_dependent(
        *args, tpu=build("tpu", False), cuda=gpu, rocm=gpu, default=build(INTERPRET_TARGET, True)
    )


def compiler_params(
    target: str,
    interpret: bool,
    *,
    semantics: tuple[str, ...] | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    vmem_limit_bytes: int | None = None,
):
    """Per-target compiler params; ``None`` when interpreting (the interpreter ignores them)."""
    if interpret:
        return None
    if target == "tpu":
        return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def div(a, b):
    """``a // b`` for non-negative ints, traced or not. Inside a Mosaic kernel ``//`` lowers
    through ``sign``, which needs a real TPU to query; ``lax.div`` (truncation) does not."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    a = jnp.asarray(a)
    return jax.lax.div(a, jnp.asarray(b, a.dtype))


def pad_axis(x: jax.Array, axis: int, size: int, *, mode: str = "constant") -> jax.Array:
    """``x`` padded at the end of ``axis`` to ``size`` (zeros, or the edge value)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def check_positive(owner: str, **sizes: Any) -> None:
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{owner}.{name}={value!r} is invalid: must be a positive integer")


def fit_block(
    owner: str,
    name: str,
    block: int,
    extent: int,
    target: str,
    interpret: bool,
    *,
    lane: bool = False,
    min_gpu: int = 1,
) -> int:
    """The tile actually used along an axis of ``extent`` elements for a requested ``block``.

    A block larger than the (padded) extent shrinks to cover it once; otherwise it must tile
    for the target: on TPU a multiple of 8 (sublanes) or of 128 (``lane=True``: the axis is,
    somewhere in the kernel, the minor one), on GPU a power of two of at least ``min_gpu``
    (Triton's dot needs 16). The interpreter takes any positive size. The axis is then padded
    to a multiple of the tile, so the extent itself need not be one.
    """
    if interpret:
        return min(block, extent)
    if target == "tpu":
        unit = 128 if lane else 8
        if block >= extent:
            return round_up(extent, 8)  # one tile; a whole (padded) axis needs no lane alignment
        if block % unit:
            raise ValueError(
                f"{owner}.{name}={block} does not tile on TPU: must be a multiple of "
                f"{unit} (or at least the extent {extent})"
            )
        return block
    if block & (block - 1) or block < min_gpu:
        raise ValueError(
            f"{owner}.{name}={block} does not tile on GPU (Triton): must be a power of two >= {min_gpu}"
        )
    return max(min(block, next_pow2(extent)), min_gpu)


def is_concrete(*xs: Any) -> bool:
    """True when every array is a concrete value (not a tracer): value checks can run."""
    return all(x is None or not isinstance(x, jax.core.Tracer) for x in xs)


def check_dtype(name: str, x: jax.Array, kinds: tuple[Any, ...]) -> None:
    if not any(jnp.issubdtype(x.dtype, k) for k in kinds):
        raise TypeError(f"{name} has dtype {x.dtype}: expected {' or '.join(map(str, kinds))}")


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name} has shape {np.shape(x)}: expected rank {rank} {layout}")
