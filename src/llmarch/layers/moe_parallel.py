"""Expert parallelism: experts sharded over the ``expert`` mesh axis, tokens moved by all-to-all.

Inside one ``shard_map`` over the whole mesh every device holds its tokens ``x [n,D]`` (the batch
is split over the data axes and ``expert``) and ``E_l = E/ep`` experts (ep = size of the ``expert``
axis). A step (GShard, Lepikhin et al. 2020):

1. dispatch: each device packs its token copies into capacity buffers ``[E,C,D] = [ep,E_l,C,D]``
   (``moe_dispatch.to_buffers``) and an ``all_to_all`` over ``expert`` sends block ``j`` to device
   ``j``: each device receives ``[ep,E_l,C,D]``, slot for slot the tokens every source sent to its
   experts;
2. the local experts run on what arrived (a batched einsum over ``E_l``);
3. combine: the reverse ``all_to_all`` returns every result to the device its token came from,
   which weights it by the gate (``moe_dispatch.from_buffers``).

``C = ceil(capacity_factor·n·k/E)`` per (source device, expert) for ``strategy="capacity"`` (a
per-device capacity, so what is dropped differs from the single-device path once anything is),
and ``C = n`` for ``"dropless"``, the most one device can send one expert: exact, at ``E/k`` times
the memory of the routed copies. Dropless EP's ``exchange="ragged"`` (``moe_ragged``, the default on
TPU/GPU) sends exactly the routed rows with ``jax.lax.ragged_all_to_all``; XLA:CPU does not implement
that collective, so there the padded exchange is the default (and ``"emulated"`` runs the ragged
bookkeeping over an ``all_gather`` stand-in, for tests).

Overlap (COMET, Zhang et al., MLSys 2025, expressed with JAX collectives): with ``ep_chunks = c > 1``
the capacity dimension is split into c chunks, each dispatched, computed and combined on its
own. The chunks are independent, so the compiler may run chunk i's expert GEMMs while chunk i+1's
dispatch and chunk i−1's combine are in flight; XLA's latency-hiding scheduler does this on GPU
and TPU, where all-to-all is an async start/done pair. The result is identical to ``c = 1``.
``llmarch.hlo.collective_schedule`` reads the compiled program to show what the compiler actually did.

``exchange="ring"`` (``MoEConfig.ep_exchange``) decomposes the all-to-all itself, per peer, as COMET
does at tile granularity: at step ``s = 0..ep-1`` device ``d`` sends its block for expert owner
``(d+s) mod ep`` with a ``ppermute`` by ``s``, runs its experts on the block that arrived from
``(d-s) mod ep``, and returns the results by a ``ppermute`` by ``-s`` (step 0 is local and moves
nothing). Step ``s``'s GEMMs depend on step ``s``'s dispatch only, and step ``s+1``'s dispatch on
nothing computed, so every one of the ``2(ep-1)`` transfers has expert GEMMs beside it that neither
feed it nor wait for it: the overlap is in the program's data flow, for any scheduler to take
(``tests/test_moe_parallel.py`` checks it in the compiled HLO). Same buffers, same results as the
padded exchange, for both strategies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kernels_pallas.intmath import round_up
from llmarch import axes, sharding
from llmarch.layers import moe_dispatch as dispatch
from llmarch.layers import moe_ragged
from llmarch.layers.configs import MoEConfig
from llmarch.layers.moe_dispatch import ExpertWeights


def layout(mesh, table: sharding.Rules) -> tuple[tuple[str, ...], str | None, int, int]:
    """``(token axes, expert axis, its size ep, token shards)`` of ``mesh`` under ``table``."""
    token_axes = sharding.logical_axes_on_mesh(axes.BATCH, mesh, table)
    expert = sharding.logical_axes_on_mesh(axes.EXPERT, mesh, table)
    if len(expert) > 1:
        raise ValueError(f"rules map logical axis 'expert' to {expert}: allowed: one mesh axis or none")
    ep_axis = expert[0] if expert and mesh.shape[expert[0]] > 1 else None
    ep = mesh.shape[ep_axis] if ep_axis else 1
    return token_axes, ep_axis, ep, math.prod(mesh.shape[a] for a in token_axes)


def check_experts_divide(cfg: MoEConfig, mesh, table: sharding.Rules) -> None:
    """Raises ValueError unless the expert mesh axis divides ``cfg.num_experts``."""
    _, ep_axis, ep, _ = layout(mesh, table)
    if cfg.num_experts % ep:
        raise ValueError(
            f"MoEConfig.num_experts={cfg.num_experts} is invalid for this mesh: must be "
            f"divisible by the '{ep_axis}' mesh axis size {ep} (experts are split evenly)"
        )


def padded_exchange(buffers: jax.Array, w: ExpertWeights, axis: str, chunks: int) -> jax.Array:
    """``[ep,E_l,C,D] -> [ep,E_l,C,D]``: dispatch, the local experts, combine; in ``chunks`` chunks of
    the C slots (chunk i's GEMMs independent of chunk i+1's all-to-all, so they may overlap)."""
    size = buffers.shape[2] // chunks
    out = []
    for c in range(chunks):  # unrolled: the scheduler sees every chunk's ops at once
        part = buffers[:, :, c * size : (c + 1) * size]  # [ep,E_l,C/c,D]
        with jax.named_scope(f"ep_chunk{c}"):
            arrived = jax.lax.all_to_all(part, axis, 0, 0, tiled=True)  # [s] = sent by source s
            y = dispatch.expert_ffn(arrived, w)  # [ep,E_l,C/c,D]
            out.append(jax.lax.all_to_all(y, axis, 0, 0, tiled=True))  # [j] = from expert owner j
    return out[0] if chunks == 1 else jnp.concatenate(out, axis=2)


def ring_exchange(buffers: jax.Array, w: ExpertWeights, axis: str) -> jax.Array:
    """``[ep,E_l,C,D] -> [ep,E_l,C,D]`` as ``padded_exchange``, the all-to-all decomposed into ``ep``
    per-peer steps of ``ppermute`` (see the module docstring): ``[j]`` in, the block for expert
    owner ``j``; ``[j]`` out, what owner ``j``'s experts returned for it."""
    ep = buffers.shape[0]
    d = jax.lax.axis_index(axis)
    blocks = jnp.roll(buffers, -d, axis=0)  # [s] = the block for owner (d+s) mod ep
    out = []
    for s in range(ep):  # unrolled: every step's ops visible at once
        with jax.named_scope(f"ep_peer{s}"):
            block = blocks[s]  # [E_l,C,D]
            if s:  # to owner d+s; what arrives came from d-s, for this device's experts
                block = jax.lax.ppermute(block, axis, [(i, (i + s) % ep) for i in range(ep)])
            y = dispatch.expert_ffn(block, w)
            if s:  # back to the device the tokens came from
                y = jax.lax.ppermute(y, axis, [(i, (i - s) % ep) for i in range(ep)])
            out.append(y)
    return jnp.roll(jnp.stack(out), d, axis=0)  # [(d+s) mod ep] = step s's results


def parallel_moe(
    x: jax.Array,
    experts: jax.Array,
    gates: jax.Array,
    w: ExpertWeights,
    cfg: MoEConfig,
    *,
    strategy: str,
    mesh,
    table: sharding.Rules,
    impl: str | None = None,
    exchange: str | None = None,
    recv_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``([B·T,D], dropped)``: the routed experts of ``x [B·T,D]`` under ``mesh``, tokens split over the
    batch axes; with an ``expert`` axis of size ep > 1 the experts are split ep ways (EP).

    Without EP each device runs ``strategy`` on its own tokens (a local sort for dropless).
    ``exchange`` (dropless EP only; None: ``moe_ragged.default_exchange(cfg.ep_chunks)``):
    ``"padded"`` (``[E,n,D]`` capacity buffers, chunked by ``cfg.ep_chunks``), ``"ring"`` (the same
    buffers, the all-to-all as per-peer ``ppermute`` steps; any strategy), ``"ragged"``
    (``jax.lax.ragged_all_to_all``, one exchange, a receive buffer of ``recv_rows`` rows per device,
    None: the worst case) or ``"emulated"`` (the ragged path over ``all_gather``, for CPU tests);
    the padded exchange is dropless at its own size and ignores ``recv_rows``.
    Raises ValueError when B·T is not divisible by the token shards or E by ep.
    """
    token_axes, ep_axis, ep, shards = layout(mesh, table)
    check_experts_divide(cfg, mesh, table)
    how = moe_ragged.default_exchange(cfg.ep_chunks) if exchange is None else exchange
    moe_ragged.check_exchange(how)
    if recv_rows is not None and recv_rows < 1:
        raise ValueError(f"recv_rows={recv_rows} is invalid: allowed: None (the worst case) or >= 1")
    num_tokens, D = x.shape
    if num_tokens % shards:
        raise ValueError(
            f"{num_tokens} tokens cannot be split over the batch mesh axes {token_axes} "
            f"(x{shards}); allowed: a multiple of {shards}"
        )
    E, k, chunks = cfg.num_experts, cfg.top_k, cfg.ep_chunks
    tokens = PartitionSpec(token_axes or None, None)
    expert_spec = PartitionSpec(ep_axis, None, None)

    def body(x, experts, gates, wg, wu, wd):
        w, n = ExpertWeights(wg, wu, wd), x.shape[0]
        if ep == 1:  # every expert is here: the single-device strategies on the local tokens
            if strategy == "dropless":
                return dispatch.dropless(x, experts, gates, w, impl=impl), jnp.zeros((1,), jnp.int32)
            out, dropped = dispatch.capacity_compute(
                x, experts, gates, w, dispatch.capacity_of(n, k, E, cfg.capacity_factor)
            )
            return out, dropped[None]
        if strategy == "dropless" and how not in ("padded", "ring"):
            out, dropped = moe_ragged.ragged_moe(
                x,
                experts,
                gates,
                w,
                axis=ep_axis,
                ep=ep,
                recv_rows=recv_rows,
                emulate=how == "emulated",
                impl=impl,
            )
            return out, dropped[None]
        capacity = n if strategy == "dropless" else dispatch.capacity_of(n, k, E, cfg.capacity_factor)
        padded = round_up(capacity, chunks)  # C rounded up to whole chunks; the rest stays empty
        slot, keep = dispatch.slots(experts, E, capacity)
        slot = jnp.where(keep, slot, padded)  # dropped copies go past the buffer
        buffers = dispatch.to_buffers(x, experts, slot, E, padded).reshape(ep, E // ep, padded, D)
        if how == "ring":
            y = ring_exchange(buffers, w, ep_axis)
        else:
            y = padded_exchange(buffers, w, ep_axis, chunks)
        y = y.reshape(E, padded, D)
        return dispatch.from_buffers(y, experts, slot, keep, gates), jnp.sum(~keep, dtype=jnp.int32)[None]

    out, dropped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, expert_spec, expert_spec, expert_spec),
        out_specs=(tokens, PartitionSpec(token_axes or None)),
    )(x, experts, gates, *w)
    return out, dropped.sum()
