"""MoE compute on one device: three ways to run the routed experts, one set of weights.

Tokens are flattened to ``x [N,D]`` with routing ``experts, gates [N,k]``; the experts are SwiGLU
FFNs ``W_gate, W_up [E,D,F]``, ``W_down [E,F,D]``; every path returns ``Σ_k g·FFN_{e_k}(x) [N,D]``.

- ``dense_all_experts``: every expert on every token, then a ``[N,E]`` combine. ``E/k`` times the
  FLOPs; the reference the others are tested against.
- ``dropless`` (MegaBlocks, Gale et al. 2022): the ``N·k`` token copies are sorted by expert and
  each expert's contiguous group is multiplied by its weights with a grouped matmul
  (``llmarch.ops.grouped_matmul``: ``jax.lax.ragged_dot`` in XLA, a Pallas kernel on TPU/GPU). No
  token is dropped and no padding is computed.
- ``capacity`` (GShard, Switch): each expert has ``C`` slots, ``[E,C,D]`` buffers are filled in
  priority order (every token's first choice before any second choice, then token order), the
  assignments past ``C`` are dropped (their gate contributes nothing) and counted. The buffers
  are also what expert parallelism sends through all-to-all (``moe_parallel``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmarch import ops


class ExpertWeights(NamedTuple):
    gate: jax.Array  # [E,D,F]
    up: jax.Array  # [E,D,F]
    down: jax.Array  # [E,F,D]


def expert_ffn(x: jax.Array, w: ExpertWeights) -> jax.Array:
    """``[..., E, C, D] -> [..., E, C, D]``: expert e's SwiGLU on its C slots (a batched einsum)."""
    gate = jnp.einsum("...ECD,EDF->...ECF", x, w.gate.astype(x.dtype))
    up = jnp.einsum("...ECD,EDF->...ECF", x, w.up.astype(x.dtype))
    return jnp.einsum("...ECF,EFD->...ECD", jax.nn.silu(gate) * up, w.down.astype(x.dtype))


def dense_all_experts(x: jax.Array, experts: jax.Array, gates: jax.Array, w: ExpertWeights) -> jax.Array:
    """``[N,D]``: every expert on every token, combined by the gates (tests only)."""
    E = w.gate.shape[0]
    y = expert_ffn(jnp.broadcast_to(x, (E, *x.shape)), w)  # [E,N,D]
    combine = jnp.einsum("NK,NKE->NE", gates, jax.nn.one_hot(experts, E, dtype=gates.dtype))
    return jnp.einsum("NE,END->ND", combine.astype(jnp.float32), y.astype(jnp.float32)).astype(x.dtype)


def dropless(x: jax.Array, experts: jax.Array, gates: jax.Array, w: ExpertWeights, *,
             impl: str | None = None) -> jax.Array:
    """``[N,D]``: sort the ``N·k`` token copies by expert, grouped matmuls, unsort, combine."""
    N, k = experts.shape
    E = w.gate.shape[0]
    flat = experts.reshape(-1)  # [N·k], token-major
    order = jnp.argsort(flat, stable=True)  # copies grouped by expert
    xs = x[order // k]  # [N·k, D]
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)  # tokens per expert
    gmm = lambda lhs, rhs: ops.grouped_matmul(lhs, rhs.astype(x.dtype), sizes, impl=impl)  # noqa: E731
    h = jax.nn.silu(gmm(xs, w.gate)) * gmm(xs, w.up)  # [N·k, F]
    ys = gmm(h, w.down)  # [N·k, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(N, k, -1)  # back to token-major
    return jnp.einsum("NK,NKD->ND", gates.astype(jnp.float32), y.astype(jnp.float32)).astype(x.dtype)


def capacity_of(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """``C = ceil(factor·N·k/E)``, at least 1 and at most N (a token visits an expert once)."""
    return max(1, min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts)))


def slots(experts: jax.Array, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each assignment's slot in its expert's buffer, in priority order (choice, then token).

    Returns:
      ``(slot, keep)``, both ``[N,k]``: ``keep`` is ``slot < capacity``.
    """
    by_choice = experts.T.reshape(-1)  # [k·N]: all first choices, then all second choices, ...
    one_hot = jax.nn.one_hot(by_choice, num_experts, dtype=jnp.int32)  # [k·N, E]
    position = jnp.cumsum(one_hot, axis=0) - one_hot  # how many went before, per expert
    slot = jnp.take_along_axis(position, by_choice[:, None], axis=1)[:, 0]
    slot = slot.reshape(experts.shape[1], experts.shape[0]).T  # [N,k]
    return slot, slot < capacity


def to_buffers(x: jax.Array, experts: jax.Array, slot: jax.Array, num_experts: int,
               capacity: int) -> jax.Array:
    """``[E,C,D]``: token copies placed in their expert's slots; dropped ones (slot ≥ C) vanish."""
    copies = jnp.broadcast_to(x[:, None, :], (*experts.shape, x.shape[-1]))  # [N,k,D]
    buffers = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    return buffers.at[experts, slot].add(copies, mode="drop")  # slots are unique: add == set


def from_buffers(y: jax.Array, experts: jax.Array, slot: jax.Array, keep: jax.Array,
                 gates: jax.Array) -> jax.Array:
    """``[N,D]``: ``Σ_k g·y[e_k, slot_k]`` over the kept assignments of ``y [E,C,D]``."""
    picked = y.at[experts, slot].get(mode="fill", fill_value=0)  # [N,k,D]
    weights = jnp.where(keep, gates, 0).astype(jnp.float32)
    return jnp.einsum("NK,NKD->ND", weights, picked.astype(jnp.float32)).astype(y.dtype)


def capacity_compute(x: jax.Array, experts: jax.Array, gates: jax.Array, w: ExpertWeights,
                     capacity: int) -> tuple[jax.Array, jax.Array]:
    """``([N,D], dropped)``: the capacity path with ``capacity`` slots per expert; ``dropped`` is
    the int32 number of (token, choice) assignments over capacity."""
    E = w.gate.shape[0]
    slot, keep = slots(experts, E, capacity)
    y = expert_ffn(to_buffers(x, experts, slot, E, capacity), w)  # [E,C,D]
    return from_buffers(y, experts, slot, keep, gates), jnp.sum(~keep, dtype=jnp.int32)
