"""Implementation choice per op: the XLA reference, a Pallas kernel, or a CPU kernel.

Layers call the functions here, never a kernel directly. ``impl`` is resolved per call:
an explicit argument wins, then the model config's ``impl``; ``"auto"`` takes the Pallas
kernel on TPU/GPU when one is registered for the op and the XLA reference otherwise. Asking
for Pallas where no kernel exists is an error, not a silent fallback. Pallas on a backend
without a kernel compiler (CPU) runs the kernel in the Pallas interpreter, so ``impl="pallas"``
is how CPU tests exercise the kernels end to end.

A few ops also have a C++ kernel for the CPU backend (``kernels_cpu``, called through XLA's FFI,
``Impl.CPU``) where XLA:CPU's own code is far from the roofline; ``"auto"`` takes it on CPU
for the shapes it serves, and the XLA path where it is not built (no compiler) or the shape is
outside them.

Ops and their layouts (axis letters as in ``llmarch.axes``):

- ``attention(q [B,T,N,H], k, v [B,S,K,H], *, q_positions, kv_positions, ...)`` -> ``[B,T,N,H]``:
  causal-by-position softmax attention with GQA, window and segment ids (training, prefill,
  decoding against a contiguous cache). Pallas: flash attention, forward and backward. XLA:
  ``attention_xla``, the reference's function with a hand-written backward pass. Under a mesh
  whose rules split the sequence over ``context`` (``llmarch.ring_attention.context_size() > 1``)
  it runs as op ``ring_attention`` instead: the same function, K/V chunks passed around a ring.
- ``grouped_matmul(lhs [rows,in], rhs [E,in,out], group_sizes [E], *, transpose_rhs=False)`` ->
  ``[rows,out]``: rows sorted by expert, row of group e times ``rhs[e]``; rows past
  ``sum(group_sizes)`` are zero. Dropless MoE: the rows are the ``n·k`` routed token copies,
  in/out = D/F or F/D. Differentiable.
- ``memory_lookup(table [M,D], indices [B,J], weights [B,J])`` -> ``[B,D]``: ``Σ_j w·table[idx]``
  for PKM/UltraMem (J = heads × top-m). Differentiable in table (touched rows) and weights.
  ``memory_lookup_grouped(table, indices, weights, blocks [B,J], num_blocks)`` -> ``[B,W,D]``
  (UltraMem's value expansion) has its Pallas kernel here and its XLA version in
  ``llmarch.layers.memory_lookup``, whose ``read_values`` takes ``kernels_cpu.memory_read`` on
  CPU (a float32 table, unsharded: ``memory_read_kernel_serves``).
- ``paged_attention(q [B,T,N,H], k_pages, v_pages [pages,page_size,K,H], block_tables [B,max_pages],
  lengths [B], q_positions [B,T], *, sliding_window=None, scale=None, k_scales=None,
  v_scales=None)`` -> ``[B,T,N,H]``: decode
  steps and chunked-prefill chunks in one batch (position -1 pads a row's queries). Its XLA
  entry (and ``mla_decode``'s) is a blocked online-softmax loop over the pages, not the
  reference, which gathers whole tables. CPU (a float32 cache, at most
  ``kernels_cpu.paged_attention.MAX_T`` query positions per row, unsharded; not differentiable):
  ``kernels_cpu.paged_attention``, each row's visible positions read once, page by page.
- ``mla_decode(q_latent [B,T,N,A], q_rope [B,T,N,R], c_kv_pages [pages,page_size,A],
  k_rope_pages [pages,page_size,R], block_tables, lengths, q_positions, *, scale)`` -> ``[B,T,N,A]``:
  absorbed MLA over the paged latent cache, output in the latent space; CPU as
  ``paged_attention`` (the same kernel, keys in two parts).
- ``cross_entropy(x [B,D], w [V,D] (or [D,V] with transpose_w), labels [B], *, chunk)`` ->
  ``(nll [B], lse [B])``: the LM head's loss terms without the ``[B,V]`` logits, differentiable in
  x and w. XLA: ``chunk`` vocabulary entries per step of a loop; Pallas: tiles of its own.
- ``quantized_matmul(x [..., K], qt: QuantizedTensor [K, N])`` -> ``[..., N]`` in x's dtype: a
  weight-only quantized linear (``llmarch.quant``), reading the stored (packed) weights at every
  call. XLA: ``llmarch.quant.matmul``, tiles of K dequantized into cache; Pallas (int weights):
  ``kernels_pallas.quantized_matmul``, dequantizing inside the kernel; CPU (int weights, at most
  ``kernels_cpu.quantized_matmul.MAX_ROWS`` rows of x: decoding, unsharded; FP8 too):
  ``kernels_cpu.quantized_matmul``, dequantizing in registers. Otherwise FP8 weights take the
  XLA path.
- ``weight_matmul(x [M, K], w [K, N])`` -> ``[M, N]``: a layer's plain weight product
  (``llmarch.layers.einsum.contract`` reaches it). XLA: ``jnp.dot``; CPU (float32, unsharded;
  1 to ``kernels_cpu.dense_matmul.STREAM_ROWS`` rows: a small batch's decode step, the weight
  streamed in contiguous row bands; up to ``MAX_ROWS`` rows of a weight of at most
  ``TILED_MAX_BYTES``: a speculative verification or a larger batch's step, in register tiles):
  ``kernels_cpu.dense_matmul``. No Pallas kernel: on TPU/GPU XLA's own GEMM is the fast path.
- ``weight_matmuls(x [M, K], (w_1 [K, N_1], ...))`` -> ``(y_1, ...)``: weight products sharing
  their input (``llmarch.layers.einsum.apply_shared``: q, k and v; gate and up); the CPU kernel
  reads every weight in one call.
- ``top_k(x [..., n], k)`` -> ``(values [..., k], indices [..., k] int32)``: ``jax.lax.top_k``, which
  is also its XLA entry and specification. CPU (float32, unsharded): ``kernels_cpu.top_k``, the
  same bits (ties, NaNs) from one pass per row; no Pallas kernel (XLA's TopK on accelerators).
- ``fp8_blockwise_matmul(xq [..., K], xs [..., K/128], wq [K, N], ws [K/128, N/128])`` -> ``[..., N]``:
  DeepSeek-V3's FP8 GEMM (e4m3 operands, 1×128 activation tiles and 128×128 weight blocks, each
  chunk's sum promoted into float32). XLA: ``llmarch.quant.fp8_blockwise``'s bit-exact reference
  (a specification: it holds ``M×128×N`` products per chunk); Pallas:
  ``kernels_pallas.fp8_blockwise_matmul`` (forward only, ``promote_every=128``).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas._attention_xla import attention_xla
from kernels_pallas.cross_entropy import DEFAULT_CHUNK, cross_entropy_xla
from kernels_pallas.cross_entropy import cross_entropy as cross_entropy_kernel
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.grouped_matmul import gmm, gmm_xla
from kernels_pallas.memory_lookup import memory_lookup as memory_lookup_kernel
from kernels_pallas.memory_lookup import memory_lookup_grouped, memory_lookup_reference
from kernels_pallas.mla_decode import mla_decode as mla_decode_kernel
from kernels_pallas.mla_decode import mla_decode_xla
from kernels_pallas.paged_attention import paged_attention as paged_attention_kernel
from kernels_pallas.paged_attention import paged_attention_xla
from llmarch import ring_attention as _ring


class Impl(enum.Enum):
    XLA = "xla"
    PALLAS = "pallas"
    CPU = "cpu"  # a C++ kernel in kernels_cpu (XLA FFI), CPU backend only


# op name -> {Impl: function}. Kernels register their Pallas entry as they land.
_REGISTRY: dict[str, dict[Impl, Callable]] = {
    # attention_xla: attention_reference's function with a hand-written backward pass (the
    # reference's autodiff keeps every layer's [T,S] probabilities and makes extra passes).
    "attention": {Impl.XLA: attention_xla, Impl.PALLAS: flash_attention},
    "grouped_matmul": {Impl.XLA: gmm_xla, Impl.PALLAS: gmm},
    "memory_lookup": {Impl.XLA: memory_lookup_reference, Impl.PALLAS: memory_lookup_kernel},
    # The paged ops' XLA entries are the blocked loop that serving runs on CPU, not their
    # *_reference (the specification, which gathers every row's whole table).
    "paged_attention": {Impl.XLA: paged_attention_xla, Impl.PALLAS: paged_attention_kernel},
    "mla_decode": {Impl.XLA: mla_decode_xla, Impl.PALLAS: mla_decode_kernel},
    # The fused LM-head loss; its XLA entry is the chunked loop, not the reference (which
    # materializes the logits it exists to avoid).
    "cross_entropy": {Impl.XLA: cross_entropy_xla, Impl.PALLAS: cross_entropy_kernel},
    # UltraMem's grouped read; its XLA entry is registered by llmarch.layers.memory_lookup.
    "memory_lookup_grouped": {Impl.PALLAS: memory_lookup_grouped},
    # Context parallelism (llmarch.ring_attention): a shard_map ring whose blocks are jnp, with its
    # own custom_vjp; ops.attention takes it when the ambient mesh splits the sequence.
    "ring_attention": {Impl.XLA: _ring.ring_attention},
}

_KERNEL_BACKENDS = ("tpu", "gpu", "cuda", "rocm")


def register(op: str, impl: Impl, fn: Callable) -> None:
    _REGISTRY.setdefault(op, {})[impl] = fn


def available(op: str) -> tuple[Impl, ...]:
    return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, impl: Impl | str | None = None) -> tuple[Impl, Callable]:
    """The implementation ``op`` runs with under the request ``impl`` (None or "auto": default).

    A Pallas kernel resolved on a backend that cannot compile it (CPU) comes back bound to
    ``interpret=True``.
    """
    if op not in _REGISTRY:
        raise ValueError(f"op={op!r} is unknown; known ops: {sorted(_REGISTRY)}")
    impls = _REGISTRY[op]
    on_accelerator = jax.default_backend() in _KERNEL_BACKENDS
    if impl is None or impl == "auto":
        chosen = Impl.PALLAS if on_accelerator and Impl.PALLAS in impls else Impl.XLA
        if chosen not in impls:
            raise ValueError(
                f"op={op!r} has no {chosen.value!r} implementation registered; "
                f"available: {[i.value for i in impls]}"
            )
    else:
        try:
            chosen = Impl(impl)
        except ValueError:
            raise ValueError(
                f"impl={impl!r} is invalid: must be one of 'auto', 'xla', 'pallas', 'cpu'"
            ) from None
        if chosen not in impls:
            raise ValueError(
                f"impl={chosen.value!r} is not available for op={op!r}; available: {[i.value for i in impls]}"
            )
    fn = impls[chosen]
    if chosen is Impl.PALLAS and not on_accelerator:
        fn = functools.partial(fn, interpret=True)
    return chosen, fn


def _resolve_cpu(op: str, impl: Impl | str | None, serves: bool, refusal: str) -> tuple[Impl, Callable]:
    """``resolve`` for an op whose CPU kernel takes only some calls (``serves``: this one):
    ``"auto"`` takes the kernel where it serves and ``resolve``'s default otherwise; an explicit
    ``"cpu"`` where it does not serve is refused with ``refusal``, before anything is traced."""
    if (impl is None or impl == "auto") and serves:
        impl = Impl.CPU
    chosen, fn = resolve(op, impl)
    if chosen is Impl.CPU and not serves:
        raise ValueError(refusal)
    return chosen, fn


def attention(q, k, v, *, impl: Impl | str | None = None, **kwargs) -> jax.Array:
    """Attention of ``q [B,T,N,H]`` over ``k, v [B,S,K,H]``; see
    ``kernels_pallas.flash_attention.attention_reference``. Ring attention when the ambient mesh
    and rules split the sequence over ``context`` (then ``impl`` resolves op ``ring_attention``)."""
    _, fn = resolve("ring_attention" if _ring.context_size() > 1 else "attention", impl)
    return fn(q, k, v, **kwargs)


def grouped_matmul(
    lhs, rhs, group_sizes, *, transpose_rhs: bool = False, impl: Impl | str | None = None
) -> jax.Array:
    """``[rows,out]``: each group of rows of ``lhs [rows,in]`` times its ``rhs [E,in,out]`` (or
    ``[E,out,in]`` transposed); see ``kernels_pallas.grouped_matmul.gmm_reference``."""
    _, fn = resolve("grouped_matmul", impl)
    return fn(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)


def memory_lookup(table, indices, weights, *, impl: Impl | str | None = None) -> jax.Array:
    """``[B,D]``: ``Σ_j weights[b,j]·table[indices[b,j]]``; see ``memory_lookup_reference``."""
    _, fn = resolve("memory_lookup", impl)
    return fn(table, indices, weights)


def _dequantized(pages, scales, dtype):
    """A quantized pool as the floats the Pallas kernels read (``llmarch.layers.kv_quant``)."""
    return (pages.astype(jnp.float32) * scales).astype(dtype)


def paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    q_positions,
    *,
    impl: Impl | str | None = None,
    k_scales=None,
    v_scales=None,
    **kwargs,
) -> jax.Array:
    """Attention over a paged KV cache; see ``paged_attention_reference`` (XLA: ``paged_attention_xla``).

    ``k_scales, v_scales [pages,page_size,K,1]``: the pools are a quantized (int8/float8) cache's.
    The XLA loop reads them as stored; the Pallas kernels read float pages, so they get the
    pools dequantized first (correct, without the bandwidth saving).
    """
    static = dict(  # the kernel's compile-time attributes (None: the default scale)
        scale=1.0 if kwargs.get("scale") is None else kwargs["scale"],
        sliding_window=kwargs.get("sliding_window"),
    )
    serves = _paged_kernel_serves(q.shape[1], k_scales, q, k_pages, v_pages, **static)
    refusal = _paged_refusal("paged_attention", q.shape[1], k_scales, q, k_pages, v_pages)
    chosen, fn = _resolve_cpu("paged_attention", impl, serves, refusal)
    if k_scales is not None and chosen is Impl.XLA:
        kwargs.update(k_scales=k_scales, v_scales=v_scales)
    elif k_scales is not None:
        k_pages, v_pages = _dequantized(k_pages, k_scales, q.dtype), _dequantized(v_pages, v_scales, q.dtype)
    return fn(q, k_pages, v_pages, block_tables, lengths, q_positions, **kwargs)


def cpu_unsharded() -> bool:
    """The CPU backend with no mesh of several devices: where the ``kernels_cpu`` FFI calls may
    run (opaque to the SPMD partitioner) and a weight product may be flattened to 2-D."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() == "cpu" and (mesh.empty or mesh.size == 1)


def _paged_kernel_serves(T: int, scales, *operands, scale=1.0, sliding_window=None) -> bool:
    """Whether the CPU paged-attention kernel takes this call: the CPU backend, an unsharded
    program, float32 queries and pools (a quantized cache stays on the XLA loop, which applies
    its scales), few query positions per row, and the kernel built on this machine."""
    from kernels_cpu.paged_attention import supports

    cpu = cpu_unsharded() and scales is None
    return cpu and supports(T, *(a.dtype for a in operands), scale=scale, sliding_window=sliding_window)


def contiguous_attention_cpu(q, k, v, positions, *, sliding_window=None) -> jax.Array | None:
    """Causal attention of ``q [B,T,N,H]`` at ``positions [B,T]`` over a contiguous cache ``k, v
    [B,S,K,H]`` (slot ``s`` holds position ``s``) by the CPU paged-attention kernel, or None where
    that kernel does not serve (``_paged_kernel_serves``).

    The cache is a pool of B pages of S slots, row ``b``'s page being page ``b``, so the kernel
    reads it in place; each row's length is its last query position + 1 (causality hides every
    slot after it anyway). XLA's attention instead copies every layer's whole cache into a
    transposed layout at each step: 40% of a batch-8 decode step of experiment 10's target.
    """
    if not _paged_kernel_serves(q.shape[1], None, q, k, v, sliding_window=sliding_window):
        return None
    B, S = k.shape[:2]
    tables = jnp.arange(B, dtype=jnp.int32)[:, None]
    lengths = jnp.clip(jnp.max(positions, axis=1) + 1, 0, S).astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    return _paged_attention_cpu(q, k, v, tables, lengths, positions, sliding_window=sliding_window)


def _paged_refusal(op: str, T: int, scales, *operands) -> str:
    return (
        f"impl='cpu' cannot take this {op} (T={T}, {[str(a.dtype) for a in operands]}, "
        f"{'quantized' if scales is not None else 'float'} cache, backend {jax.default_backend()}): "
        "the CPU kernel takes float32 queries and pools, 1 to kernels_cpu.paged_attention.MAX_T "
        "query positions, a concrete scale and no window or an int one >= 1, unsharded, on the CPU "
        "backend, when built"
    )


def _paged_attention_cpu(
    q, k_pages, v_pages, block_tables, lengths, q_positions, *, sliding_window=None, scale=None
):
    from kernels_cpu.paged_attention import paged_attention as kernel

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return kernel(
        (q,),
        (k_pages,),
        v_pages,
        block_tables,
        lengths,
        q_positions,
        scale=scale,
        sliding_window=sliding_window,
    )


def _mla_decode_cpu(q_latent, q_rope, c_kv_pages, k_rope_pages, block_tables, lengths, q_positions, *, scale):
    from kernels_cpu.paged_attention import paged_attention as kernel

    c, r = c_kv_pages[:, :, None], k_rope_pages[:, :, None]  # [P,ps,1,A], [P,ps,1,R]: one KV head
    return kernel((q_latent, q_rope), (c, r), c, block_tables, lengths, q_positions, scale=scale)


register("paged_attention", Impl.CPU, _paged_attention_cpu)
register("mla_decode", Impl.CPU, _mla_decode_cpu)


def mla_decode(
    q_latent,
    q_rope,
    c_kv_pages,
    k_rope_pages,
    block_tables,
    lengths,
    q_positions,
    *,
    scale: float,
    impl: Impl | str | None = None,
    c_kv_scales=None,
    k_rope_scales=None,
) -> jax.Array:
    """Absorbed-MLA attention over a paged latent cache; see ``mla_decode_reference`` (XLA:
    ``mla_decode_xla``). ``c_kv_scales, k_rope_scales [pages,page_size,1]``: a quantized latent
    cache, handled as ``paged_attention``'s scales are."""
    operands = (q_latent, q_rope, c_kv_pages, k_rope_pages)
    T = q_latent.shape[1]
    serves = _paged_kernel_serves(T, c_kv_scales, *operands, scale=scale)
    refusal = _paged_refusal("mla_decode", T, c_kv_scales, *operands)
    chosen, fn = _resolve_cpu("mla_decode", impl, serves, refusal)
    kwargs = {}
    if c_kv_scales is not None and chosen is Impl.XLA:
        kwargs = dict(c_kv_scales=c_kv_scales, k_rope_scales=k_rope_scales)
    elif c_kv_scales is not None:
        c_kv_pages = _dequantized(c_kv_pages, c_kv_scales, q_latent.dtype)
        k_rope_pages = _dequantized(k_rope_pages, k_rope_scales, q_latent.dtype)
    return fn(
        q_latent, q_rope, c_kv_pages, k_rope_pages, block_tables, lengths, q_positions, scale=scale, **kwargs
    )


def cross_entropy(
    x, w, labels, *, transpose_w: bool = False, chunk: int = DEFAULT_CHUNK, impl: Impl | str | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-token ``(nll [B], lse [B])`` float32 of the logits ``x·Wᵀ``, never materialized whole;
    see ``kernels_pallas.cross_entropy``. ``chunk``: vocabulary entries per step of the XLA path
    (the Pallas kernels tile by their ``BlockSizes``)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk={chunk!r} is invalid: must be a positive int (vocabulary entries per step)")
    chosen, fn = resolve("cross_entropy", impl)
    kwargs = {"chunk": chunk} if chosen is Impl.XLA else {}
    return fn(x, w, labels, transpose_w=transpose_w, **kwargs)


# llmarch.quant builds on this module (its layers call the ops here), so its entries are imported
# when first called.
def _quantized_matmul_xla(x, qt) -> jax.Array:
    from llmarch.quant.matmul import quantized_matmul_xla

    return quantized_matmul_xla(x, qt)


def _quantized_matmul_pallas(x, qt, *, interpret: bool = False) -> jax.Array:
    """The Pallas kernel's entry in this op's ``(x [M,K], qt)`` signature."""
    from kernels_pallas.quantized_matmul import quantized_matmul as kernel

    return kernel(x, qt.q, qt.scale, qt.zero, bits=qt.bits, group_size=qt.group_size, interpret=interpret)


register("quantized_matmul", Impl.XLA, _quantized_matmul_xla)
register("quantized_matmul", Impl.PALLAS, _quantized_matmul_pallas)


def _quantized_matmul_cpu(x, qt) -> jax.Array:
    from kernels_cpu.quantized_matmul import quantized_matmul as kernel

    return kernel(x, qt.q, qt.scale, qt.zero, bits=qt.bits, kind=qt.kind, block=qt.group_size)


register("quantized_matmul", Impl.CPU, _quantized_matmul_cpu)


def _cpu_kernel_serves(m: int, qt) -> bool:
    """The CPU kernel takes this call: CPU backend, an unsharded program (the FFI call is opaque
    to the partitioner), integer or FP8 weights, few rows, and the kernel built on this machine."""
    from kernels_cpu.quantized_matmul import supports

    return cpu_unsharded() and supports(m, bits=qt.bits, kind=qt.kind, K=qt.K, group_size=qt.group_size)


def quantized_matmul(x, qt, *, impl: Impl | str | None = None) -> jax.Array:
    """``[..., N]`` in x's dtype: ``x [..., K]`` times the quantized weight ``qt`` ``[K, N]`` (a
    ``llmarch.quant.QuantizedTensor``), dequantized tile by tile from its stored form."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    serves = _cpu_kernel_serves(x2.shape[0], qt)
    auto = impl is None or impl == "auto"
    if qt.kind == "fp8" and impl not in (Impl.CPU, "cpu") and not (auto and serves):
        impl = Impl.XLA  # Pallas takes integer weights only
    refusal = (
        f"impl='cpu' cannot take this quantized_matmul (M={x2.shape[0]}, {qt.kind} {qt.bits}-bit, "
        f"backend {jax.default_backend()}): the CPU kernel takes integer or FP8 weights and at most "
        "kernels_cpu.quantized_matmul.MAX_ROWS rows, unsharded, on the CPU backend, when built"
    )
    chosen, fn = _resolve_cpu("quantized_matmul", impl, serves, refusal)
    return fn(x2, qt).reshape(*lead, qt.shape[-1])


def fp8_blockwise_matmul(
    xq, xs, wq, ws, *, promote_every: int = 128, out_dtype=jnp.float32, impl: Impl | str | None = None
) -> jax.Array:
    """``[..., N]``: DeepSeek-V3's blockwise-scaled FP8 product; see
    ``llmarch.quant.fp8_blockwise.fp8_blockwise_matmul_reference``."""
    _, fn = resolve("fp8_blockwise_matmul", impl)
    return fn(xq, xs, wq, ws, promote_every=promote_every, out_dtype=out_dtype)


def _weight_matmul_cpu(x, w) -> jax.Array:
    from kernels_cpu.dense_matmul import dense_matmul

    return dense_matmul(x, w)


def _weight_matmuls_cpu(x, ws) -> tuple[jax.Array, ...]:
    from kernels_cpu.dense_matmul import dense_matmuls

    return dense_matmuls(x, ws)


register("weight_matmul", Impl.XLA, jnp.dot)
register("weight_matmul", Impl.CPU, _weight_matmul_cpu)
register("weight_matmuls", Impl.XLA, lambda x, ws: tuple(jnp.dot(x, w) for w in ws))
register("weight_matmuls", Impl.CPU, _weight_matmuls_cpu)


def weight_matmul_kernel_serves(m: int, x_dtype, w_dtype, w_size: int = 0) -> bool:
    """Whether ``weight_matmul``'s CPU kernel takes ``m`` rows times a weight of ``w_size``
    elements: the CPU backend, an unsharded program (the FFI call is opaque to the partitioner),
    float32 operands, few rows (``kernels_cpu.dense_matmul.supports``), and the kernel built on
    this machine (``LLMARCH_CPU_KERNELS=0`` turns it off)."""
    from kernels_cpu.dense_matmul import supports

    return cpu_unsharded() and supports(m, x_dtype, w_dtype, w_size)


def _weight_refusal(op: str, x, ws) -> str:
    dtypes = " x ".join(str(a.dtype) for a in (x, *ws))
    return (
        f"impl='cpu' cannot take this {op} (M={x.shape[0]}, {dtypes}, backend "
        f"{jax.default_backend()}): the CPU kernel takes float32 operands and "
        "1 to kernels_cpu.dense_matmul.STREAM_ROWS rows (up to MAX_ROWS for a weight of at most "
        "TILED_MAX_BYTES), unsharded, on the CPU backend, when built"
    )


def weight_matmul(x, w, *, impl: Impl | str | None = None) -> jax.Array:
    """``[M, N]``: ``x [M, K] @ w [K, N]``, a layer's weight product. ``"auto"`` takes the CPU
    kernel where ``weight_matmul_kernel_serves`` (a decode step on CPU) and XLA's dot otherwise;
    ``"pallas"`` takes XLA's dot, which on an accelerator is already its matrix unit's kernel."""
    if impl in (Impl.PALLAS, "pallas"):
        impl = Impl.XLA
    serves = weight_matmul_kernel_serves(x.shape[0], x.dtype, w.dtype, w.size)
    _, fn = _resolve_cpu("weight_matmul", impl, serves, _weight_refusal("weight_matmul", x, (w,)))
    return fn(x, w)


def weight_matmuls(x, ws, *, impl: Impl | str | None = None) -> tuple[jax.Array, ...]:
    """``tuple(weight_matmul(x, w) for w in ws)``: weight products sharing their input ``x [M, K]``
    (q, k and v; gate and up), each ``w [K, N_i]``. The CPU kernel, where it serves, reads them all
    in one call: one hand-off to its threads instead of one per weight, the same bits."""
    ws = tuple(ws)
    if not ws:
        raise ValueError("weight_matmuls: ws is empty; give at least one weight")
    if impl in (Impl.PALLAS, "pallas"):
        impl = Impl.XLA
    serves = all(weight_matmul_kernel_serves(x.shape[0], x.dtype, w.dtype, w.size) for w in ws)
    _, fn = _resolve_cpu("weight_matmuls", impl, serves, _weight_refusal("weight_matmuls", x, ws))
    return tuple(fn(x, ws))


def _fp8_blockwise_matmul_xla(xq, xs, wq, ws, **kwargs) -> jax.Array:
    from llmarch.quant.fp8_blockwise import fp8_blockwise_matmul_reference

    return fp8_blockwise_matmul_reference(xq, xs, wq, ws, **kwargs)


def _fp8_blockwise_matmul_pallas(xq, xs, wq, ws, *, promote_every, out_dtype, interpret=False) -> jax.Array:
    from kernels_pallas.fp8_blockwise_matmul import CHUNK
    from kernels_pallas.fp8_blockwise_matmul import fp8_blockwise_matmul as kernel

    if promote_every != CHUNK:
        raise ValueError(
            f"promote_every={promote_every} is invalid for the Pallas kernel: it promotes every {CHUNK}"
        )
    lead = xq.shape[:-1]
    y = kernel(
        xq.reshape(-1, xq.shape[-1]),
        xs.reshape(-1, xs.shape[-1]),
        wq,
        ws,
        out_dtype=out_dtype,
        interpret=interpret,
    )
    return y.reshape(*lead, wq.shape[-1])


register("fp8_blockwise_matmul", Impl.XLA, _fp8_blockwise_matmul_xla)
register("fp8_blockwise_matmul", Impl.PALLAS, _fp8_blockwise_matmul_pallas)


def memory_read_kernel_serves(table_dtype, weights_dtype) -> bool:
    """Whether the memory layers' value read (``llmarch.layers.memory_lookup.read_values``) takes
    its CPU kernel: the CPU backend, unsharded, float32 table and weights, the kernel built."""
    from kernels_cpu.memory_read import supports

    return cpu_unsharded() and supports(table_dtype, weights_dtype)


def top_k_kernel_serves(x_dtype) -> bool:
    """Whether ``top_k``'s CPU kernel takes a selection: the CPU backend, an unsharded program
    (the FFI call is opaque to the partitioner), float32, and the kernel built on this machine."""
    from kernels_cpu.top_k import supports

    return cpu_unsharded() and supports(x_dtype)


def top_k(x, k: int, *, impl: Impl | str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(values [..., k], indices [..., k] int32)``: ``jax.lax.top_k`` of ``x [..., n]``, the ``k``
    largest of each row, best first (ties: the lower index first). ``"auto"`` takes the CPU kernel
    where ``top_k_kernel_serves`` and ``jax.lax.top_k`` otherwise; both give the same bits."""
    if x.ndim == 0:
        raise ValueError(f"top_k: x must have at least one axis (rows along the last), got shape {x.shape}")
    n = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= n:
        raise ValueError(f"top_k: k={k!r} must be an int in [0, {n}] (the last axis of x {x.shape})")
    k = int(k)
    if impl in (Impl.PALLAS, "pallas"):  # no Pallas selection kernel: XLA's TopK is the accelerator's
        impl = Impl.XLA
    refusal = (
        f"impl='cpu' cannot take this top_k ({x.dtype}, backend {jax.default_backend()}): the CPU "
        "kernel takes float32, unsharded, on the CPU backend, when built"
    )
    _, fn = _resolve_cpu("top_k", impl, top_k_kernel_serves(x.dtype), refusal)
    return fn(x, k)


def _top_k_cpu(x, k: int) -> tuple[jax.Array, jax.Array]:
    from kernels_cpu.top_k import top_k as kernel

    return kernel(x, k)


register("top_k", Impl.XLA, jax.lax.top_k)
register("top_k", Impl.CPU, _top_k_cpu)
