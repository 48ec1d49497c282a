"""Dropless expert parallelism by ragged all-to-all: exchange buffers sized by the tokens routed.

The padded exchange (``moe_parallel``) sends every device's token copies in ``[E,C,D]`` buffers with
``C = n`` slots per expert: ``E·n`` rows sent and ``E·n`` received per device, ``E/k`` times the ``n·k``
copies it routes (32x at DeepSeek-V3's E=256, k=8). Here, per device (``n`` tokens, ``ep`` shards of
``E_l = E/ep`` experts, ``axes.ALPHABET``):

1. sort the ``n·k`` copies by expert, hence by destination shard: ``xs [n·k,D]`` (exactly the
   copies routed, a static shape: no padding on the send side);
2. an ``all_to_all`` of the count matrix ``[ep,E_l]`` tells every device how many rows each source
   sends each of its experts; each receiver lays its sources out one after the other, and a second
   ``all_to_all`` of those offsets tells each sender where its rows land;
3. ``jax.lax.ragged_all_to_all`` moves exactly those rows into a receive buffer ``[R,D]``;
4. the received rows, ordered (source, local expert), are regrouped by local expert and run
   through the grouped matmuls (``llmarch.ops.grouped_matmul``, ``jax.lax.ragged_dot`` in XLA);
5. the reverse ragged exchange sends every result back to the slot its copy left from; un-sort and
   combine with the gates.

The receive buffer needs a static row count ``R``. Dropless for every routing needs the worst case a
device can receive: each of the ``ep`` sources may send it up to ``min(k,E_l)`` copies of each of its
``n`` tokens (a token picks distinct experts), ``R = ep·n·min(k,E_l)``, which is ``min(k,E_l)/E_l``
of the padded buffer: no smaller once ``E_l ≤ k`` (V3 at EP=32 or 64). ``recv_rows`` sets a smaller
bound (the balanced load is ``n·k``): rows that would overflow it are not sent, their (token, choice)
assignments contribute nothing and are counted as dropped, as the capacity strategy counts its own.
What the ragged path always saves is the send side (``n·k`` rows instead of ``E·n``) and, on the wire,
the padding: only routed rows travel. ``llmarch.accounting.ep_exchange_bytes`` tabulates both.

XLA:CPU does not implement ``ragged-all-to-all`` ("UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is
not supported by XLA:CPU ThunkEmitter"), so the padded exchange is the CPU default and the ragged one
is exported for tpu/cuda in the tests. ``emulated_ragged_all_to_all`` implements the collective's
semantics from ``all_gather`` (``ep`` times the memory; tests only), so the offset bookkeeping above
runs, with values and gradients, on CPU. jax differentiates ``ragged_all_to_all`` itself: its
transpose is the reverse ragged exchange (``jax/_src/lax/parallel.py``), no custom_vjp is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmarch import ops
from llmarch.layers.moe_dispatch import ExpertWeights

EXCHANGES = ("padded", "ring", "ragged", "emulated")  # the first two: moe_parallel's
_RAGGED_BACKENDS = ("tpu", "gpu", "cuda", "rocm")  # where XLA implements ragged-all-to-all


def default_exchange(chunks: int = 1) -> str:
    """``"ragged"`` on TPU/GPU, ``"padded"`` elsewhere (XLA:CPU lacks ragged-all-to-all) and whenever
    ``chunks`` > 1 (``MoEConfig.ep_chunks``: the pipelined overlap is built on the padded buffers)."""
    return "ragged" if chunks == 1 and jax.default_backend() in _RAGGED_BACKENDS else "padded"


def check_exchange(exchange: str) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is invalid: allowed: {', '.join(EXCHANGES)}")


def worst_case_recv_rows(tokens: int, top_k: int, num_experts: int, ep: int) -> int:
    """``ep·n·min(k,E_l)``: the most rows one device can receive from ``ep`` sources of ``n`` tokens."""
    return ep * tokens * min(top_k, num_experts // ep)


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name: str, ep: int
):
    """``jax.lax.ragged_all_to_all``'s semantics from ``all_gather`` (for CPU tests; ``ep`` times the
    memory): source s's rows ``operand_s[input_offsets_s[i] : +send_sizes_s[i]]`` are written to
    device i's ``output`` at ``output_offsets_s[i]``. ``recv_sizes`` must equal what the sources send
    (as the real collective requires); it is not read."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    every = jax.lax.all_gather(operand, axis_name)  # [ep,N,...]
    starts, sizes, dests = (
        jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes, output_offsets)
    )  # [ep]: what each source sends me
    rows = jnp.arange(output.shape[0])
    for s in range(ep):
        inside = (rows >= dests[s]) & (rows < dests[s] + sizes[s])
        src = jnp.clip(starts[s] + rows - dests[s], 0, operand.shape[0] - 1)
        output = jnp.where(inside.reshape(-1, *[1] * (output.ndim - 1)), every[s, src], output)
    return output


def _exclusive_cumsum(a: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def _zeros_varying_like(shape: tuple[int, ...], like: jax.Array) -> jax.Array:
    """Zeros typed as varying over the mesh axes ``like`` varies over. ``ragged_all_to_all`` types its
    result as its ``output`` argument: a fresh (invariant) zeros buffer would make the exchanged rows
    look replicated, and the transpose would sum their weight gradients over the devices."""
    zeros = jnp.zeros(shape, like.dtype)
    varying = lambda a: jax.typeof(a).mat.varying  # noqa: E731  (jax 0.10's name for the vma set)
    missing = tuple(sorted(varying(like) - varying(zeros)))
    return jax.lax.pcast(zeros, missing, to="varying") if missing else zeros


def _grouped_ffn(xs: jax.Array, w: ExpertWeights, sizes: jax.Array, impl: str | None) -> jax.Array:
    """``[R,D] -> [R,D]``: the SwiGLU of expert e on its group of rows; rows in no group give 0."""
    gmm = lambda lhs, rhs: ops.grouped_matmul(lhs, rhs.astype(xs.dtype), sizes, impl=impl)  # noqa: E731
    return gmm(jax.nn.silu(gmm(xs, w.gate)) * gmm(xs, w.up), w.down)


def ragged_moe(
    x: jax.Array,
    experts: jax.Array,
    gates: jax.Array,
    w: ExpertWeights,
    *,
    axis: str,
    ep: int,
    recv_rows: int | None = None,
    emulate: bool = False,
    impl: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``([n,D], dropped)`` on one device inside a ``shard_map`` over ``axis`` (size ``ep``): its
    tokens ``x [n,D]`` and routing ``experts, gates [n,k]`` (global expert ids), its local experts
    ``w`` (``[E_l,...]``); see the module doc. ``recv_rows``: the receive buffer's rows (None: the
    worst case, dropless); ``dropped``: the int32 assignments that did not fit it."""
    n, k = experts.shape
    D, E_l = x.shape[1], w.gate.shape[0]
    R = worst_case_recv_rows(n, k, E_l * ep, ep) if recv_rows is None else recv_rows
    exchange = (
        functools.partial(emulated_ragged_all_to_all, axis_name=axis, ep=ep)
        if emulate
        else functools.partial(jax.lax.ragged_all_to_all, axis_name=axis)
    )

    flat = experts.reshape(-1)  # [n·k], token-major
    order = jnp.argsort(flat, stable=True)  # copies grouped by expert, so by destination shard
    xs = x[order // k]  # [n·k,D]
    counts = jnp.zeros((E_l * ep,), jnp.int32).at[flat].add(1).reshape(ep, E_l)  # [j,e]: to j's e
    send = counts.sum(1)  # [ep]
    send_at = _exclusive_cumsum(send)  # where the rows for shard j start in xs
    got = jax.lax.all_to_all(counts, axis, 0, 0, tiled=True)  # [s,e]: from source s to my expert e
    recv = got.sum(1)  # [ep]
    recv_at = _exclusive_cumsum(recv)  # sources laid out in order in my buffer
    lands_at = jax.lax.all_to_all(recv_at, axis, 0, 0, tiled=True)  # [j]: where my rows start on j
    # rows past R are neither sent nor received; both sides clip alike from the same offsets
    recv_kept = jnp.clip(R - recv_at, 0, recv)
    send_kept = jnp.clip(R - lands_at, 0, send)

    with jax.named_scope("ep_dispatch"):
        buf = exchange(xs, _zeros_varying_like((R, D), xs), send_at, send_kept, lands_at, recv_kept)  # [R,D]
    # Each arrived row's local expert: the segments (source, expert) start at nondecreasing rows;
    # a row belongs to the last segment starting at or before it (empty segments start there too).
    starts = (recv_at[:, None] + _exclusive_cumsum(got, axis=1)).reshape(-1)  # [ep·E_l]
    rows = jnp.arange(R)
    local = (jnp.searchsorted(starts, rows, side="right") - 1) % E_l
    local = jnp.where(rows < recv_kept.sum(), local, E_l)  # empty rows sort last, in no group
    by_expert = jnp.argsort(local, stable=True)
    sizes = jnp.zeros((E_l + 1,), jnp.int32).at[local].add(1)[:E_l]
    with jax.named_scope("ep_experts"):
        ys = _grouped_ffn(buf[by_expert], w, sizes, impl)  # [R,D], grouped by local expert
    y = jnp.zeros_like(ys).at[by_expert].set(ys)  # arrival order again
    came_from = jax.lax.all_to_all(send_at, axis, 0, 0, tiled=True)  # [s]: where s's rows sat in its xs
    with jax.named_scope("ep_combine"):
        back = exchange(y, _zeros_varying_like((n * k, D), y), recv_at, recv_kept, came_from, send_kept)
    copies = jnp.zeros_like(back).at[order].set(back).reshape(n, k, D)  # token-major again
    out = jnp.einsum("...k,...kD->...D", gates.astype(jnp.float32), copies.astype(jnp.float32))
    return out.astype(x.dtype), jnp.sum(send - send_kept, dtype=jnp.int32)
