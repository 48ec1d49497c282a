"""FP8 training GEMMs: a linear layer's Fprop, Dgrad and Wgrad computed from e4m3 operands.

``fp8_linear(x [M, K], w [K, N])`` is a ``jax.custom_vjp`` whose forward and backward passes each
quantize their two operands and multiply them in FP8 (``llmarch.quant.fp8_blockwise``'s numerics);
``fp8_einsum`` flattens an ``Einsum`` layer's equation onto it. Master weights stay float32: the
weight is quantized from its float32 value at every call and its gradient comes back float32.

Recipes (the ``recipe`` argument):

- ``"blockwise"``: DeepSeek-V3 (technical report §3.3), every operand in E4M3 with online scales
  (from the values being quantized), every 128 products of a K chunk promoted into a float32
  accumulator (``llmarch.ops.fp8_blockwise_matmul``):

  - Fprop ``y = x·w``: ``x`` in 1×128 tiles along K (per token per 128 channels), ``w`` in
    128×128 blocks.
  - Dgrad ``dx = dy·wᵀ``: ``dy`` in 1×128 tiles along N (its contracted axis, per token), ``wᵀ``
    the forward's quantized weight transposed (a 128×128 block's amax does not change under
    transposition, so this *is* the block quantization of ``wᵀ``, bit for bit).
  - Wgrad ``dw = xᵀ·dy``: contracted over the tokens M, so both operands are quantized along the
    token axis, ``xᵀ`` and ``dyᵀ`` in 1×128 tiles of M (i.e. 128×1 tiles of ``x`` and ``dy``: per
    channel per 128 tokens), the "1D×1D" Wgrad of DeepGEMM/TransformerEngine's block recipe. The
    right operand's scales are then ``[M/128, N]`` (blocks 128×1), which the Pallas kernel does not
    take (128×128 weight blocks only): Wgrad runs ``promoted_matmul``, a scan over the K chunks
    equal to the reference GEMM to float32 rounding (Fprop and Dgrad run ``llmarch.ops``: the
    bit-exact reference on CPU, the Pallas kernel on TPU/GPU).
    V3 keeps the FP8 activation of Fprop and re-tiles it for Wgrad; here ``x`` is saved in the
    compute dtype and quantized afresh along M (one rounding, not two).
    ``chunked_promotion()`` runs Fprop and Dgrad through ``promoted_matmul`` as well (equal to the
    reference to float32 rounding, ~50x faster on a CPU, where ``llmarch.ops`` runs the bit-exact
    reference whose ``[M, 128, N]`` products dominate a step): for long CPU experiments.

  Sizes that are not multiples of 128 (K and N for Fprop/Dgrad, M for Wgrad) are zero-padded to
  the next multiple and the result sliced back. Zeros change no tile's amax, so this equals
  quantizing the ragged last tile on its own: exact, it costs only the padded FLOPs.

- ``"tensor"``: per-tensor *current* scaling for comparison: one E4M3 scale per operand from its
  own amax at this step, dequantized products summed in float32 (TransformerEngine's *delayed*
  scaling, from an amax history carried as state, is ``llmarch.quant.fp8_delayed``). Gradients
  use E4M3 too (TE's default uses E5M2), so the only difference from ``"blockwise"`` is the scale
  granularity.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp

from llmarch import ops
from llmarch.quant import fp8_blockwise as fb

RECIPES = ("blockwise", "tensor")
_F32 = jnp.float32


def _pad(a: jax.Array, axis: int, multiple: int = fb.TILE) -> jax.Array:
    """``a`` zero-padded along ``axis`` to a multiple of ``multiple``."""
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


# --- blockwise (DeepSeek-V3) ---------------------------------------------------------------------


_CHUNKED = [False]  # set by chunked_promotion(); read while tracing


@contextlib.contextmanager
def chunked_promotion():
    """Within it (while a step is traced), the blockwise recipe's Fprop and Dgrad run
    ``promoted_matmul`` instead of ``llmarch.ops.fp8_blockwise_matmul`` (module docstring)."""
    before, _CHUNKED[0] = _CHUNKED[0], True
    try:
        yield
    finally:
        _CHUNKED[0] = before


def _block_matmul(aq, a_s, bq, b_s):
    """float32 ``aq · bq``: ``a_s`` per 1×128 tile, ``b_s`` per 128×128 block."""
    if _CHUNKED[0]:  # one scale per block column, repeated over its 128 columns
        return promoted_matmul(aq, a_s, bq, jnp.repeat(b_s, fb.TILE, axis=1))
    return ops.fp8_blockwise_matmul(aq, a_s, bq, b_s)


def _blockwise_fprop(x, w):
    """``(y float32 [M, N], (wq, ws))``: the weight's quantization is kept for Dgrad."""
    N = w.shape[1]
    xq, xs = fb.quantize_activation_tiles(_pad(x, 1))  # [M, Kp], [M, Kp/128]
    wq, ws = fb.quantize_weight_blocks(_pad(_pad(w, 0), 1))  # [Kp, Np], [Kp/128, Np/128]
    return _block_matmul(xq, xs, wq, ws)[:, :N], (wq, ws)


def _blockwise_dgrad(g, wq, ws, K):
    """float32 ``dx [M, K] = dy · wᵀ``, ``dy`` in 1×128 tiles along N."""
    gq, gs = fb.quantize_activation_tiles(_pad(g, 1))  # [M, Np], [M, Np/128]
    return _block_matmul(gq, gs, wq.T, ws.T)[:, :K]


def _blockwise_wgrad(x, g):
    """float32 ``dw [K, N] = xᵀ · dy``, both operands in tiles of 128 tokens."""
    xtq, xts = fb.quantize_activation_tiles(_pad(x, 0).T)  # [K, Mp], [K, Mp/128]
    gtq, gts = fb.quantize_activation_tiles(_pad(g, 0).T)  # [N, Mp], [N, Mp/128]
    return promoted_matmul(xtq, xts, gtq.T, gts.T)  # rhs scales [Mp/128, N]


def promoted_matmul(aq: jax.Array, a_s: jax.Array, bq: jax.Array, b_s: jax.Array) -> jax.Array:
    """float32 ``[P, N]``: ``aq [P, K]`` (scales ``a_s [P, K/128]``) times ``bq [K, N]`` (scales
    ``b_s [K/128, N]``, one per chunk and column), each chunk's sum promoted into float32.

    The numerics of ``fp8_blockwise_matmul_reference`` (which takes these column scales as 128×1
    blocks) to float32 rounding: per 128-chunk one dot of exact products (e4m3 is exact in bfloat16)
    with float32 sums in the dot's own order, then ``acc + p·fl(a_s·b_s)`` in K order. A scan over
    the chunks holds one ``[P, N]`` partial at a time, where the reference holds ``P×128×N``
    products: this is the Wgrad path, whose operands (``[K, tokens]``, ``[tokens, N]``) no kernel
    here takes yet.
    """
    (P, K), N = aq.shape, bq.shape[1]
    C = K // fb.TILE
    a_c = aq.reshape(P, C, fb.TILE).transpose(1, 0, 2)  # [C, P, 128]
    b_c = bq.reshape(C, fb.TILE, N)  # [C, 128, N]

    def chunk(acc, operands):
        a, b, sa, sb = operands  # [P, 128], [128, N], [P], [N]
        p = jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=_F32)
        return acc + p * (sa[:, None] * sb[None, :]), None

    acc, _ = jax.lax.scan(chunk, jnp.zeros((P, N), _F32), (a_c, b_c, a_s.T, b_s))
    return acc


# --- per-tensor current scaling ------------------------------------------------------------------


def _tensor_fp8(a: jax.Array) -> jax.Array:
    """float32 ``a`` through E4M3 with one scale from its current amax (dequantized)."""
    scale = fb.scale_from_amax(jnp.max(jnp.abs(a.astype(_F32))))
    return fb.quantize_per_tensor(a, scale).astype(_F32) * scale


def _dot(a, b):
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)


# --- the custom VJP ------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_linear(recipe: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return _forward(recipe, x, w)[0]


def _forward(recipe, x, w):
    if recipe == "blockwise":
        y, wres = _blockwise_fprop(x, w)
    else:
        y, wres = _dot(_tensor_fp8(x), _tensor_fp8(w)), None
    return y.astype(x.dtype), (x, w, wres)


def _backward(recipe, res, g):
    x, w, wres = res
    if recipe == "blockwise":
        dx, dw = _blockwise_dgrad(g, *wres, x.shape[1]), _blockwise_wgrad(x, g)
    else:
        gd = _tensor_fp8(g)
        dx, dw = _dot(gd, _tensor_fp8(w).T), _dot(_tensor_fp8(x).T, gd)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_fp8_linear.defvjp(_forward, _backward)


def fp8_linear(x: jax.Array, w: jax.Array, *, recipe: str = "blockwise") -> jax.Array:
    """``x @ w`` in FP8 training numerics (module docstring), differentiable in both.

    Args:
      x: ``[M, K]`` activations in the compute dtype.
      w: ``[K, N]`` weight, its master dtype (float32); it is quantized from this value.
      recipe: one of ``RECIPES``.

    Returns:
      ``[M, N]`` in x's dtype; the VJP gives ``dx`` in x's dtype and ``dw`` in w's.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown; allowed: {RECIPES}")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"x {x.shape} and w {w.shape} must be [M, K] and [K, N] with the same K")
    return _fp8_linear(recipe, x, w)


def fp8_einsum(eqn: str, x: jax.Array, w: jax.Array, *, recipe: str = "blockwise") -> jax.Array:
    """``jnp.einsum(eqn, x, w)`` through ``fp8_linear``: the weight's contracted axes become K, its
    free axes N, the input's free axes M; axes shared by both and the output are batch axes
    (``jax.vmap``).

    Raises ValueError for an equation that is not a linear map of ``x`` (ellipsis, a repeated
    letter, an axis summed away without being contracted)."""
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    batch = [c for c in lhs if c in rhs and c in out]
    contracted = [c for c in lhs if c in rhs and c not in out]
    free_x, free_w = [c for c in lhs if c not in rhs], [c for c in rhs if c not in lhs]
    if (
        "." in eqn
        or len(set(lhs)) != len(lhs)
        or len(lhs) != x.ndim
        or len(set(rhs)) != len(rhs)
        or len(rhs) != w.ndim
        or sorted(out) != sorted(batch + free_x + free_w)
    ):
        raise ValueError(f"fp8_einsum cannot take eqn={eqn!r}: it must be a linear map x -> out of w's axes")
    size = dict(zip(lhs, x.shape, strict=True)) | dict(zip(rhs, w.shape, strict=True))
    nb, M, K, N = (math.prod(size[c] for c in cs) for cs in (batch, free_x, contracted, free_w))
    xt = x.transpose([lhs.index(c) for c in batch + free_x + contracted]).reshape(nb, M, K)
    wt = w.transpose([rhs.index(c) for c in batch + contracted + free_w]).reshape(nb, K, N)
    linear = functools.partial(fp8_linear, recipe=recipe)
    y = linear(xt[0], wt[0])[None] if not batch else jax.vmap(linear)(xt, wt)  # [nb, M, N]
    order = batch + free_x + free_w
    y = y.reshape([size[c] for c in order])  # [*batch, *free_x, *free_w]
    return y.transpose([order.index(c) for c in out])
