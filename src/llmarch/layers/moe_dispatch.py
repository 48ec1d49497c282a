"""MoE compute on one device: three ways to run the routed experts, one set of weights.

Tokens are flattened to ``x [n,D]`` (``n = B·T``; ``...`` in the einsums) with routing ``experts, gates
[n,k]`` (k: top-k, ``axes.ALPHABET``); the experts are SwiGLU FFNs ``W_gate, W_up [E,D,F]``,
``W_down [E,F,D]``; every path returns ``Σ_k g·FFN_{e_k}(x) [n,D]``.

- ``dense_all_experts``: every expert on every token, then a ``[n,E]`` combine. ``E/k`` times the
  FLOPs; the reference the others are tested against.
- ``dropless`` (MegaBlocks, Gale et al. 2022): the ``n·k`` token copies are sorted by expert and
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
    """``[n,D]``: every expert on every token, combined by the gates (tests only)."""
    E = w.gate.shape[0]
    y = expert_ffn(jnp.broadcast_to(x, (E, *x.shape)), w)  # [E,n,D]
    combine = jnp.einsum("...k,...kE->...E", gates, jax.nn.one_hot(experts, E, dtype=gates.dtype))
    return jnp.einsum("...E,E...D->...D", combine.astype(jnp.float32), y.astype(jnp.float32)).astype(x.dtype)


def dropless(
    x: jax.Array, experts: jax.Array, gates: jax.Array, w: ExpertWeights, *, impl: str | None = None
) -> jax.Array:
    """``[n,D]``: sort the ``n·k`` token copies by expert, grouped matmuls, unsort, combine."""
    n, k = experts.shape
    E = w.gate.shape[0]
    flat = experts.reshape(-1)  # [n·k], token-major
    order = jnp.argsort(flat, stable=True)  # copies grouped by expert
    xs = x[order // k]  # [n·k, D]
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)  # tokens per expert
    gmm = lambda lhs, rhs: ops.grouped_matmul(lhs, rhs.astype(x.dtype), sizes, impl=impl)  # noqa: E731
    h = jax.nn.silu(gmm(xs, w.gate)) * gmm(xs, w.up)  # [n·k, F]
    ys = gmm(h, w.down)  # [n·k, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to token-major
    return jnp.einsum("...k,...kD->...D", gates.astype(jnp.float32), y.astype(jnp.float32)).astype(x.dtype)


def capacity_of(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """``C = ceil(factor·n·k/E)``, at least 1 and at most n (a token visits an expert once)."""
    return max(1, min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts)))


def slots(experts: jax.Array, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each assignment's slot in its expert's buffer, in priority order (choice, then token).

    Returns:
      ``(slot, keep)``, both ``[n,k]``: ``keep`` is ``slot < capacity``.
    """
    by_choice = experts.T.reshape(-1)  # [k·n]: all first choices, then all second choices, ...
    one_hot = jax.nn.one_hot(by_choice, num_experts, dtype=jnp.int32)  # [k·n, E]
    position = jnp.cumsum(one_hot, axis=0) - one_hot  # how many went before, per expert
    slot = jnp.take_along_axis(position, by_choice[:, None], axis=1)[:, 0]
    slot = slot.reshape(experts.shape[1], experts.shape[0]).T  # [n,k]
    return slot, slot < capacity


def to_buffers(
    x: jax.Array, experts: jax.Array, slot: jax.Array, num_experts: int, capacity: int
) -> jax.Array:
    """``[E,C,D]``: token copies placed in their expert's slots; dropped ones (slot ≥ C) vanish."""
    copies = jnp.broadcast_to(x[:, None, :], (*experts.shape, x.shape[-1]))  # [n,k,D]
    buffers = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    return buffers.at[experts, slot].add(copies, mode="drop")  # slots are unique: add == set


def from_buffers(
    y: jax.Array, experts: jax.Array, slot: jax.Array, keep: jax.Array, gates: jax.Array
) -> jax.Array:
    """``[n,D]``: ``Σ_k g·y[e_k, slot_k]`` over the kept assignments of ``y [E,C,D]``."""
    picked = y.at[experts, slot].get(mode="fill", fill_value=0)  # [n,k,D]
    weights = jnp.where(keep, gates, 0).astype(jnp.float32)
    return jnp.einsum("...k,...kD->...D", weights, picked.astype(jnp.float32)).astype(y.dtype)


def capacity_compute(
    x: jax.Array, experts: jax.Array, gates: jax.Array, w: ExpertWeights, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """``([n,D], dropped)``: the capacity path with ``capacity`` slots per expert; ``dropped`` is
    the int32 number of (token, choice) assignments over capacity."""
    E = w.gate.shape[0]
    slot, keep = slots(experts, E, capacity)
    y = expert_ffn(to_buffers(x, experts, slot, E, capacity), w)  # [E,C,D]
    return from_buffers(y, experts, slot, keep, gates), jnp.sum(~keep, dtype=jnp.int32)
