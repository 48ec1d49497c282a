"""DeepSeek-V3's blockwise-scaled FP8 GEMM (technical report §3.3.2): ``y = x · w`` from e4m3 operands.

Operands as ``llmarch.quant.fp8_blockwise`` makes them: ``xq [M, K]`` float8_e4m3fn with one float32
scale per 1×128 tile along K (``xs [M, K/128]``), ``wq [K, N]`` float8_e4m3fn with one per
128×128 block (``ws [K/128, N/128]``). Each 128-wide chunk ``c`` of K is one MMA of exact products
(e4m3 is exact in bfloat16, so the tiles are widened to bfloat16 and multiplied with float32
accumulation: FP8 bytes in memory and the recipe's numerics, but bfloat16 MMA throughput; a native
e4m3 dot is chip-specific and left for later) whose sum is then promoted:
``acc += partial_c · fl(xs[:, c] · ws[c, n])`` in float32, the report's "Increasing Accumulation
Precision" with ``N_C = 128``. The promotion is also where
the scales apply, which is why the chunk must equal the scale tile.

TPU (Mosaic): a grid (row tile, column block, K chunk), the K axis sequential into a float32 VMEM
accumulator; a chunk's activation scales are picked out of the row tile's ``[bm, K/128]`` scales
by a mask (exact), the weight block's scale read from SMEM. GPU (Triton): a grid (row tile, column
block) over whole arrays, each program loading its power-of-two tiles by offset as it loops over
the K chunks; the weight scales arrive expanded to one per column.

The column block is 128 (one weight scale per tile); rows are zero-padded to the row tile. The
within-chunk float32 summation order is the MMA's, so results match ``fp8_blockwise_matmul_reference``
(and ``llmarch.quant.fp8_blockwise``'s bit-exact model) to float32 rounding, not bit for bit.
Forward only: no VJP yet (the training recipe quantizes gradients too; see the module above).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import _common as common

__all__ = ["CHUNK", "BlockSizes", "fp8_blockwise_matmul", "fp8_blockwise_matmul_reference"]

CHUNK = 128  # K elements per promotion = the activation tile and the weight block


def fp8_blockwise_matmul_reference(xq, xs, wq, ws, *, out_dtype=jnp.float32) -> jax.Array:
    """``[M, N]``: per chunk of K a float32 product of the e4m3 values, times ``xs·ws``, summed over
    chunks in order (pure jnp: the specification; summation order within a chunk is XLA's)."""
    M, K = xq.shape
    N = wq.shape[1]
    C = K // CHUNK
    x = xq.astype(jnp.float32).reshape(M, C, CHUNK)  # [M, C, 128]
    w = wq.astype(jnp.float32).reshape(C, CHUNK, N)  # [C, 128, N]
    partial = jnp.einsum("MCk,CkN->CMN", x, w, precision=lax.Precision.HIGHEST)  # [C, M, N]
    scale = xs.astype(jnp.float32).T[:, :, None] * jnp.repeat(ws.astype(jnp.float32), CHUNK, axis=1)[:, None]
    acc = jnp.zeros((M, N), jnp.float32)
    for c in range(C):
        acc = acc + partial[c] * scale[c]
    return acc.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """``block_m``: rows of x per program (TPU: a multiple of 8; GPU: a power of two >= 16)."""

    block_m: int = 64

    def __post_init__(self):
        common.check_positive("BlockSizes", block_m=self.block_m)

    @classmethod
    def default(cls, target: str) -> BlockSizes:
        """128 rows on TPU (the MXU's edge), 64 on GPU (a 64×128 float32 accumulator per program)."""
        return cls(128 if target == "tpu" else 64)


def _tpu_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref):
    n, c = pl.program_id(1), pl.program_id(2)

    @pl.when(c == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    part = jnp.dot(
        x_ref[...].astype(jnp.bfloat16), w_ref[...].astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )  # [bm, 128]: exact products, float32 sums
    xs = xs_ref[...]  # [bm, C]
    sx = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, xs.shape, 1) == c, xs, 0.0), axis=1, keepdims=True)
    acc_ref[...] += part * (sx * ws_ref[c, n])

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _gpu_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, bm: int, chunks: int):
    i, n = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * bm, bm), pl.ds(n * CHUNK, CHUNK)

    def body(c, acc):
        ks = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        x = x_ref[rows, ks].astype(jnp.bfloat16)  # [bm, 128]
        w = w_ref[ks, cols].astype(jnp.bfloat16)  # [128, 128]
        part = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return acc + part * (xs_ref[rows, pl.ds(c, 1)] * ws_ref[pl.ds(c, 1), cols])  # [bm,1]·[1,128]

    acc = lax.fori_loop(0, chunks, body, jnp.zeros((bm, CHUNK), jnp.float32))
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("target", "interpret", "bm", "out_dtype"))
def _call(xq, xs, wq, ws, *, target: str, interpret: bool, bm: int, out_dtype):
    M, K = xq.shape
    N = wq.shape[1]
    C = K // CHUNK
    Mp = common.round_up(M, bm)
    xq, xs = common.pad_axis(xq, 0, Mp), common.pad_axis(xs.astype(jnp.float32), 0, Mp)
    ws = ws.astype(jnp.float32)
    out_shape = jax.ShapeDtypeStruct((Mp, N), out_dtype)
    if target == "tpu":
        out = pl.pallas_call(
            _tpu_kernel,
            grid=(Mp // bm, N // CHUNK, C),
            in_specs=[
                pl.BlockSpec((bm, CHUNK), lambda i, n, c: (i, c)),
                pl.BlockSpec((bm, C), lambda i, n, c: (i, 0)),
                pl.BlockSpec((CHUNK, CHUNK), lambda i, n, c: (c, n)),
                pl.BlockSpec(memory_space=pltpu.SMEM),
            ],
            out_specs=pl.BlockSpec((bm, CHUNK), lambda i, n, c: (i, n)),
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((bm, CHUNK), jnp.float32)],
            compiler_params=common.compiler_params(
                target, interpret, semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=interpret,
        )(xq, xs, wq, ws)
    else:
        ws_cols = jnp.repeat(ws, CHUNK, axis=1)  # [C, N]: a scale per column
        operands = (xq, xs, wq, ws_cols)
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, bm=bm, chunks=C),
            grid=(Mp // bm, N // CHUNK),
            in_specs=[pl.BlockSpec(a.shape, lambda i, n: (0, 0)) for a in operands],  # whole arrays
            out_specs=pl.BlockSpec((Mp, N), lambda i, n: (0, 0)),
            out_shape=out_shape,
            compiler_params=common.compiler_params(target, interpret),
            interpret=interpret,
        )(*operands)
    return out[:M]


def fp8_blockwise_matmul(
    xq,
    xs,
    wq,
    ws,
    *,
    out_dtype=jnp.float32,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    target: str | None = None,
) -> jax.Array:
    """``[M, N]`` in ``out_dtype``: the blockwise-scaled product of ``xq [M, K]`` (scales
    ``xs [M, K/128]``) and ``wq [K, N]`` (scales ``ws [K/128, N/128]``), K and N multiples of 128.

    ``target``: with ``interpret=True``, which build the interpreter runs ("tpu" default, "gpu").
    """
    _check(xq, xs, wq, ws)
    M = xq.shape[0]

    def build(tgt, interp):
        if interp and target is not None:
            tgt = target
        bs = block_sizes or BlockSizes.default(tgt)
        bm = common.fit_block("BlockSizes", "block_m", bs.block_m, M, tgt, interp, min_gpu=16)
        return functools.partial(_call, target=tgt, interpret=interp, bm=bm, out_dtype=out_dtype)

    return common.dispatch(build, xq, xs, wq, ws, interpret=interpret)


def _check(xq, xs, wq, ws) -> None:
    if xq.ndim != 2 or wq.ndim != 2 or xq.shape[1] != wq.shape[0]:
        raise ValueError(f"xq {xq.shape} and wq {wq.shape} must be [M, K] and [K, N] with the same K")
    (M, K), N = xq.shape, wq.shape[1]
    if K % CHUNK or N % CHUNK or K == 0 or N == 0:
        raise ValueError(f"wq {wq.shape}: K and N must be positive multiples of {CHUNK} (pad them)")
    if xs.shape != (M, K // CHUNK) or ws.shape != (K // CHUNK, N // CHUNK):
        raise ValueError(
            f"xs {xs.shape} and ws {ws.shape} must be {(M, K // CHUNK)} and {(K // CHUNK, N // CHUNK)}: "
            f"one scale per 1×{CHUNK} tile and per {CHUNK}×{CHUNK} block"
        )
    for name, a in (("xq", xq), ("wq", wq)):
        if a.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name} has dtype {a.dtype}: must be float8_e4m3fn")
