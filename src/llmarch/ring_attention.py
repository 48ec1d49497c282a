"""Context parallelism: ring attention over a sequence-sharded mesh axis (``context``).

The sequence of every activation is split into ``C`` contiguous chunks, one per device of the
``context`` axis (rules ``cp``/``fsdp_cp`` in ``llmarch.sharding`` map the logical ``seq`` axis to
it). Attention is the one place where a token needs the other chunks: in a ``shard_map`` over
``context`` each device keeps its query chunk and, for ``C`` steps, attends to the key/value chunk
it holds, then passes that chunk (with its positions and segment ids, from which the mask is
built) to the next device with ``ppermute`` (Liu et al., "Ring Attention with Blockwise
Transformers", arXiv 2310.01889). Device ``d`` holds chunk ``(d - i) mod C`` at step ``i``.
Blocks are merged with the online softmax (running max, denominator and output in float32), so
the result is attention over the whole sequence, not an approximation; every device holds one
``[T/C, S/C]`` score block at a time.

Gradients: a ``custom_vjp`` whose backward pass is a second ring. Autodiff through the forward
scan would keep every step's ``[T/C, S/C]`` probabilities, i.e. the whole ``[T/C, S]`` row block
per device and layer, which is the memory that context parallelism exists to split. The backward
keeps only ``q, k, v``, the output and the row log-sum-exp (as FlashAttention does), recomputes
each block's probabilities, accumulates ``dq`` locally, and sends the ``dk, dv`` accumulators
(float32) around the ring with their key/value chunk; one last ``ppermute`` brings them home.

Masking uses global positions, so causal, sliding-window and packed (segment-id) attention are
exact. A block that no query of the local chunk may see (causal future, another document) is
skipped with ``lax.cond`` (``skip_masked_blocks``). With contiguous chunks causal work is
unbalanced: device ``d`` has ``d + 1`` visible blocks of ``C``, so the step time is set by the
last device and skipping saves energy, not wall-clock. Load balancing (zig-zag or striped chunk
order, which permutes the tokens of the whole model) is not done here. Each block is jnp einsums
on every backend (op ``ring_attention`` has only an XLA entry in ``llmarch.ops``); the flash
kernel's forward, which also yields the block's log-sum-exp, could compute them on TPU/GPU.

Axis letters as in ``llmarch.axes``: ``q [B,T,N,H]``, ``k, v [B,S,K,H]``, ``N = K·G``; inside the
ring ``Tc = T/C`` and ``Sc = S/C`` are the local chunks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from kernels_pallas.flash_attention import attention_mask
from llmarch import axes, sharding

CONTEXT = sharding.CONTEXT


class _Static(NamedTuple):
    """The ring's static arguments (hashable: a ``custom_vjp`` non-differentiable argument)."""

    axis: str
    size: int
    scale: float
    causal: bool
    window: int | None
    skip: bool
    manual: tuple[str, ...]  # the shard_map's manual axes: the ring's and the batch's


def context_size() -> int:
    """The number of sequence chunks the ambient mesh and rules ask for: the size of the
    ``context`` axis when the rules map the logical ``seq`` axis to it, else 1 (no ring)."""
    targets = sharding.logical_axes_on_mesh(axes.SEQ)
    if CONTEXT not in targets:
        return 1
    if targets != (CONTEXT,):
        raise ValueError(
            f"rules map logical axis 'seq' to mesh axes {targets}: context parallelism allows "
            f"only {CONTEXT!r} on the sequence"
        )
    return jax.sharding.get_abstract_mesh().shape[CONTEXT]


def check_no_cache(cache, layer: str) -> None:
    """Decoding with a KV cache is not context-parallel: a clear error, not a silent gather."""
    if cache is not None and context_size() > 1:
        raise ValueError(
            f"{layer} with a KV cache under a mesh whose context axis (size {context_size()}) shards "
            "the sequence: decoding is not context-parallel; serve with rules that do not map 'seq' "
            "to 'context' (e.g. 'serve') or a mesh without a context axis"
        )


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    axis: str = CONTEXT,
    skip_masked_blocks: bool = True,
    batch_axes: tuple[str, ...] | None = None,
) -> jax.Array:
    """``attention_reference``'s function, with the sequence split over the mesh axis ``axis``.

    Global arrays in, global array out, under the ambient mesh (``jax.set_mesh`` /
    ``llmarch.sharding.use``). The ``shard_map`` is manual over ``axis`` and the batch's mesh axes
    (so each device's test for a fully masked block is local, not an all-reduce over the batch);
    heads keep whatever sharding the other (Auto) axes give them.

    Args:
      q: ``[B,T,N,H]``; k, v: ``[B,S,K,H]`` with ``N = K*G``; ``T`` and ``S`` divisible by the
        size of ``axis``.
      q_positions ``[B,T]``, kv_positions ``[B,S]``: global positions (the mask compares them).
      q_segment_ids ``[B,T]``, kv_segment_ids ``[B,S]``: both or neither.
      causal, sliding_window, scale: as in ``attention_reference``.
      axis: the mesh axis the sequence is split over.
      skip_masked_blocks: skip blocks that the mask hides entirely (``lax.cond``).
      batch_axes: the mesh axes the batch is split over; default: the ambient rules' ``batch``
        (none if they do not divide ``B``).
    Returns:
      ``[B,T,N,H]`` in v's dtype; a query with no visible key gets zeros.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"ring_attention(axis={axis!r}) needs a mesh with that axis; mesh: {mesh}")
    size = mesh.shape[axis]
    T, S = q.shape[1], k.shape[1]
    if T % size or S % size:
        raise ValueError(
            f"ring attention splits the sequence over mesh axis {axis!r} of size {size}: query length "
            f"{T} and key length {S} must be multiples of it"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids: give both or neither")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads N={q.shape[2]} must be a multiple of KV heads K={k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if batch_axes is None:
        batch_axes = sharding.batch_axes(q.shape[0], axis)
    batch_axes = tuple(batch_axes)
    manual = (axis, *batch_axes)
    static = _Static(axis, size, float(scale), bool(causal), sliding_window, bool(skip_masked_blocks), manual)
    masks = (q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    seq = PartitionSpec(batch_axes or None, axis)  # [B, T, ...]: T split over the ring
    in_specs = (seq, seq, seq, jax.tree.map(lambda _: seq, masks))
    body = functools.partial(_ring, static)
    run = jax.shard_map(body, in_specs=in_specs, out_specs=seq, axis_names=set(manual))
    return run(q, k, v, masks)


# The ring, per device (inside the shard_map) ------------------------------------------------------


def _heads_major(x: jax.Array, K: int) -> jax.Array:
    """``[B,T,N,H] -> [B,K,G,T,H]``."""
    B, T, N, H = x.shape
    return x.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)


def _tokens_major(x: jax.Array) -> jax.Array:
    """``[B,K,G,T,H] -> [B,T,N,H]``."""
    B, K, G, T, H = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def _send(st: _Static, x):
    """Every device's ``x`` (a pytree) to the next device of the ring."""
    return lax.ppermute(x, st.axis, [(i, (i + 1) % st.size) for i in range(st.size)])


def _block_mask(st: _Static, q_pos, q_seg, kv_pos, kv_seg) -> jax.Array:
    """``[B,Tc,Sc]``: may a local query see a key of the chunk held now (global positions)."""
    return attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal=st.causal, sliding_window=st.window)


def _scores(st: _Static, qh, kh, mask) -> jax.Array:
    """``[B,K,G,Tc,Sc]`` float32 scaled scores, ``-inf`` where masked."""
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qh, kh, preferred_element_type=jnp.float32) * st.scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def _maybe(st: _Static, mask, update, carry):
    """``update(carry)``, or ``carry`` unchanged when the block is fully masked and skipping is on."""
    if not st.skip:
        return update(carry)
    return lax.cond(jnp.any(mask), update, lambda c: c, carry)


def _forward(st: _Static, q, k, v, masks):
    q_pos, kv_pos, q_seg, kv_seg = masks
    K = k.shape[2]
    qh = _heads_major(q, K)  # [B,K,G,Tc,H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,Sc,H]
    B, _, G, Tc, H = qh.shape

    def step(acc, chunk):
        kh, vh, kv_pos, kv_seg = chunk
        mask = _block_mask(st, q_pos, q_seg, kv_pos, kv_seg)

        def update(acc):
            o, m, l = acc  # [B,K,G,Tc,H], [B,K,G,Tc,1] x2, float32
            s = _scores(st, qh, kh, mask)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
            p = jnp.exp(s - m_safe)  # 0 where masked
            correction = jnp.exp(m - m_safe)  # 0 while m is -inf
            l = l * correction + jnp.sum(p, axis=-1, keepdims=True)
            pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
            return o * correction + pv, m_new, l

        return _maybe(st, mask, update, acc)

    acc = (
        jnp.zeros((B, K, G, Tc, H), jnp.float32),
        jnp.full((B, K, G, Tc, 1), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G, Tc, 1), jnp.float32),
    )
    acc = _varying(st, acc)

    def ring_step(carry, _):
        acc, chunk = carry
        nxt = _send(st, chunk)  # issued before the compute that does not depend on it
        return (step(acc, chunk), nxt), None

    chunk = (kh, vh, kv_pos, kv_seg)
    (acc, chunk), _ = lax.scan(ring_step, (acc, chunk), length=st.size - 1)
    o, m, l = step(acc, chunk)  # the last chunk: nothing left to send
    empty = l == 0  # a query with no visible key anywhere
    out = _tokens_major(o / jnp.where(empty, 1.0, l)).astype(v.dtype)  # [B,Tc,N,H]
    # P = exp(S - lse) in the backward pass; an empty row keeps P = 0 through the mask.
    lse = jnp.where(empty, 0.0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def _varying(st: _Static, tree):
    """Fresh constants marked as varying over the manual axes, as the scan carries they join are."""
    return jax.tree.map(lambda x: lax.pcast(x, st.manual, to="varying"), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: _Static, q, k, v, masks):
    return _forward(st, q, k, v, masks)[0]


def _ring_fwd(st: _Static, q, k, v, masks):
    out, lse = _forward(st, q, k, v, masks)
    return out, (q, k, v, masks, out, lse)


def _ring_bwd(st: _Static, residuals, d_out):
    q, k, v, masks, out, lse = residuals
    q_pos, kv_pos, q_seg, kv_seg = masks
    K = k.shape[2]
    qh, doh = _heads_major(q, K), _heads_major(d_out, K)  # [B,K,G,Tc,H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,Sc,H]
    # rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax Jacobian's correction term.
    delta = jnp.sum(doh.astype(jnp.float32) * _heads_major(out, K).astype(jnp.float32), -1, keepdims=True)

    def step(dq, chunk):
        kh, vh, kv_pos, kv_seg, dk, dv = chunk
        mask = _block_mask(st, q_pos, q_seg, kv_pos, kv_seg)

        def update(acc):
            dq, dk, dv = acc
            p = jnp.exp(_scores(st, qh, kh, mask) - lse)  # [B,K,G,Tc,Sc], 0 where masked
            dv = dv + jnp.einsum(
                "BKGTS,BKGTH->BKSH", p.astype(vh.dtype), doh, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", doh, vh, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta) * st.scale).astype(qh.dtype)
            dq = dq + jnp.einsum("BKGTS,BKSH->BKGTH", ds, kh, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("BKGTS,BKGTH->BKSH", ds, qh, preferred_element_type=jnp.float32)
            return dq, dk, dv

        dq, dk, dv = _maybe(st, mask, update, (dq, dk, dv))
        return dq, (kh, vh, kv_pos, kv_seg, dk, dv)

    def ring_step(carry, _):
        dq, (kh, vh, kv_pos, kv_seg, dk, dv) = carry
        nxt = _send(st, (kh, vh, kv_pos, kv_seg))  # the chunk moves on while its block computes
        dq, (*_, dk, dv) = step(dq, (kh, vh, kv_pos, kv_seg, dk, dv))
        dk, dv = _send(st, (dk, dv))  # its gradient follows it
        return (dq, (*nxt, dk, dv)), None

    zeros = _varying(st, (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(kh.shape, jnp.float32)))
    dq0, dkv0 = zeros
    chunk = (kh, vh, kv_pos, kv_seg, dkv0, dkv0)
    (dq, chunk), _ = lax.scan(ring_step, (dq0, chunk), length=st.size - 1)
    dq, (*_, dk, dv) = step(dq, chunk)
    dk, dv = _send(st, (dk, dv))  # after C-1 moves the chunk of device d sits on d-1: one more home
    dq = _tokens_major(dq).astype(q.dtype)
    dk, dv = dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_ring.defvjp(_ring_fwd, _ring_bwd)
