"""MoE routing: which k of the E experts each token goes to, with which gates, and how balanced.

Names follow the papers. A token ``u_t`` has router logits ``l = u_t W_r`` [E] and affinities

- Mixtral (Jiang et al. 2024), ``router="softmax"``: ``s_i = softmax(l)_i``; the k largest are chosen
  and, with ``norm_topk``, renormalized: ``g_i = s_i / Σ_{j∈TopK} s_j = softmax over the k selected
  logits``. (DeepSeek-V2 uses the same scores without renormalization.)
- DeepSeek-V3 (arXiv 2412.19437, eqs. 12-16), ``router="sigmoid"``: ``s_i = σ(l_i)``; the k experts
  are the top-k of ``s_i + b_i`` with ``b_i`` the load-balancing bias, the gates come from the
  unbiased ``s_i``, ``g_i = s_i / Σ_{j∈TopK} s_j``, times ``route_scale`` (routed_scaling_factor).
  Group-limited routing: the E experts form ``n_group`` groups of E/n_group; a group scores by the
  sum of its two largest ``s_i + b_i`` and only the ``topk_group`` best groups may be chosen from.

Balancing (all in float32, shapes in the alphabet of ``llmarch.axes``, T' = tokens of a batch):

- ``balance_loss``: ``Σ_i f_i·P_i`` with ``f_i = E/(k·T')·#{t: i∈TopK(t)}`` and ``P_i = mean_t s'_{i,t}``,
  ``s'`` the affinities normalized to sum 1 per token. Over the whole batch it is the Switch/GShard
  auxiliary loss (``α·E·Σ f_i P_i`` in Switch's normalization, where ``f`` sums to 1); per sequence
  and averaged it is DeepSeek-V3's sequence-wise loss (eqs. 17-20). Both equal 1 when balanced.
- ``router_z_loss``: ``mean_t (logsumexp_i l_{t,i})²`` (ST-MoE, Zoph et al. 2022).
- ``updated_bias``: the auxiliary-loss-free update ``b_i ← b_i + γ·sign(c̄ − c_i)`` from the batch's
  per-expert load ``c_i`` (DeepSeek-V3 §2.1.2; Wang et al. 2024, arXiv 2408.15664).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llmarch import ops
from llmarch.layers.configs import MoEConfig


class Routing(NamedTuple):
    """One routing decision for tokens of any leading shape ``[...]``."""

    experts: jax.Array  # [..., k] int32: the chosen experts, best first
    gates: jax.Array  # [..., k] float32: their combine weights g
    scores: jax.Array  # [..., E] float32: the unbiased affinities s
    logits: jax.Array  # [..., E] float32: the router logits l


def route(logits: jax.Array, bias: jax.Array | None, cfg: MoEConfig, *, impl: str | None = None) -> Routing:
    """Routes tokens from their router ``logits [..., E]`` (float32) and bias ``b [E]`` (or None);
    ``impl``: ``llmarch.ops.top_k``'s request for the selections (None: auto).

    Returns:
      ``Routing`` with experts and gates ``[..., k]``.
    """
    logits = logits.astype(jnp.float32)
    if cfg.router == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)  # s_i
    else:
        scores = jax.nn.sigmoid(logits)  # s_i = σ(u_t·e_i)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)  # s_i + b_i
    if cfg.n_group > 1:
        choice = _limit_to_groups(choice, cfg.n_group, cfg.topk_group, impl)
    _, experts = ops.top_k(choice, cfg.top_k, impl=impl)  # [..., k]
    gates = jnp.take_along_axis(scores, experts, axis=-1)  # from the unbiased s_i
    if cfg.norm_topk:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), gates * cfg.route_scale, scores, logits)


def _limit_to_groups(choice: jax.Array, n_group: int, topk_group: int, impl: str | None) -> jax.Array:
    """``choice [..., E]`` with every expert outside the ``topk_group`` best groups set to -inf."""
    *lead, E = choice.shape
    grouped = choice.reshape(*lead, n_group, E // n_group)
    group_scores = ops.top_k(grouped, 2, impl=impl)[0].sum(-1)  # [..., n_group]: sum of the top-2
    _, keep = ops.top_k(group_scores, topk_group, impl=impl)
    allowed = jnp.any(keep[..., :, None] == jnp.arange(n_group), axis=-2)  # [..., n_group]
    return jnp.where(allowed[..., None], grouped, -jnp.inf).reshape(*lead, E)


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """``[E]`` float32: how many (token, choice) assignments each expert received."""
    one_hot = jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32)
    return one_hot.sum(0)


def balance_loss(experts: jax.Array, scores: jax.Array, num_experts: int) -> jax.Array:
    """``Σ_i f_i·P_i`` over all tokens of ``experts [..., k]`` and ``scores [..., E]``; 1 when
    balanced. ``f`` counts argmax-like choices, so only ``P`` carries a gradient."""
    top_k = experts.shape[-1]
    counts = expert_counts(experts, num_experts)  # [E]
    f = counts * num_experts / (top_k * (experts.size // top_k))  # f_i
    s = scores.reshape(-1, num_experts)
    p = (s / (s.sum(-1, keepdims=True) + 1e-20)).mean(0)  # P_i from s'_{i,t}
    return jnp.sum(f * p)


def sequence_balance_loss(experts: jax.Array, scores: jax.Array, num_experts: int) -> jax.Array:
    """DeepSeek-V3's sequence-wise loss: ``balance_loss`` of each row of ``[B,T,...]``, averaged."""
    return jax.vmap(lambda e, s: balance_loss(e, s, num_experts))(experts, scores).mean()


def router_z_loss(logits: jax.Array) -> jax.Array:
    """``mean_t (logsumexp_i l_{t,i})²`` (ST-MoE's router z-loss)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def updated_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """``b + γ·sign(mean(c) − c)``: raise the bias of underloaded experts, lower the overloaded.

    ``bias`` and ``load`` may carry leading axes (a scanned run's layers): the mean is per row.
    """
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


def load_ratio(load: jax.Array) -> jax.Array:
    """``max_i c_i / mean_i c_i`` of per-expert loads ``[..., E]`` (1: perfectly balanced)."""
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)


def distinct_experts(experts: jax.Array | np.ndarray) -> int:
    """``U``: how many different experts a batch's routing ``[..., k]`` activates (measured; the
    decode-traffic model's expectation is ``llmarch.accounting.expected_distinct_experts``)."""
    return int(np.unique(np.asarray(experts)).size)
