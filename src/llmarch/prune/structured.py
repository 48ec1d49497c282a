"""Structured pruning: whole attention heads, FFN channels or MoE experts removed, shapes shrunk.

``prune_structured(model, cfg, target, fraction)`` returns ``(Transformer(new_cfg), new_cfg)``: an
ordinary, smaller model of a smaller config (it saves, loads and serves like any other), filled
from the kept slices of ``model``. ``structured_mask`` applies the same choice as zeros to a model
of the original shape, so the two can be compared output for output.

Targets (``fraction`` of the units removed in every pruned layer, rounded to the nearest count,
halves up; the same count in every layer, since the layers of a scanned run share shapes; which
ones, per layer, by importance):

- ``"heads"``: attention heads. MHA/GQA blocks lose whole KV groups (a KV head with its G query
  heads), so N = K·G holds with G unchanged; MQA blocks (K=1) lose query heads and keep their one
  KV head; MLA blocks lose heads (their latent and RoPE key are shared by all heads, so nothing
  else changes). ``head_dim`` is kept.
- ``"channels"``: hidden channels F of the SwiGLU FFNs (``ffn_dim``: the "swiglu" blocks and
  "swiglu" skip modules), gate and up columns with the down row. MoE experts, shared experts and
  memory layers are left as they are.
- ``"experts"``: routed MoE experts, with their router columns and bias ``b_i``. With
  ``n_group > 1`` each group loses the same number (``fraction`` of a group), so groups stay equal.

Importance (``criterion``; higher is kept):

- ``"magnitude"`` (no data). A head's output is a convex combination of its values mapped by
  ``W_o``, so its size is bounded by the value path, while q and k only decide where it looks:
  head n scores ``‖W_v[:,k(n)]‖·‖W_o[n]‖`` (Frobenius; MLA ``‖W_UV[:,n]‖·‖W_o[n]‖``), a GQA group the
  sum of its heads. Channel f scores ``‖W_gate[:,f]‖·‖W_up[:,f]‖·‖W_down[f]‖``; expert e the product
  of its three weights' norms (a weak proxy: the router decides how much an expert is used).
- ``"activation"`` (calibration rows): head n scores ``Σ_t ‖o_tn W_o[n]‖₂``, its contribution to
  the attention output over the calibration tokens (a group: the sum of its heads); channel f
  ``Σ_t |silu(g_tf)·u_tf|·‖W_down[f]‖``; expert e ``Σ_t g_te·‖FFN_e(x_t)‖₂``, its gated output over
  the tokens routed to it.
- ``"load"`` (experts, calibration rows): how many (token, choice) assignments an expert receives.
- ``"auto"``: with calibration ``"load"`` for experts and ``"activation"`` otherwise; without it
  ``"magnitude"``.

Calibration runs the original model once over the rows (no block sees an earlier block pruned:
the units are removed, not reconstructed). Removing experts renormalizes a softmax router over
the experts left: with ``norm_topk`` (or a sigmoid router) the gates of a token whose chosen
experts all survive are unchanged. With ``strategy="capacity"`` an expert's capacity
``capacity_factor·n·k/E`` grows as E shrinks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import sharding
from llmarch.checks import check_choice, check_number
from llmarch.config import ModelConfig
from llmarch.layers import moe_routing as routing
from llmarch.layers.einsum import Einsum
from llmarch.layers.ffn import SwiGLU
from llmarch.layers.moe import MoE
from llmarch.model import Transformer, run_layout, with_unstacked_layers
from llmarch.quant import calibrate
from llmarch.quant.targets import is_quantized

TARGETS = ("heads", "channels", "experts")
CRITERIA = ("auto", "magnitude", "activation", "load")

# What each pruned module kind cuts: weight name -> (axis of one layer's weight, role). "unit"
# indexes the pruned units themselves (KV groups, heads, channels, experts); "head" the query
# heads of the kept KV groups (G per group); "router" and "bias" are the MoE router's column and
# b_i, which masking treats apart (see _mask_value).
_CUTS: dict[str, dict[str, tuple[int, str]]] = {
    "mha": {"w_q_dnh": (1, "head"), "w_k_dkh": (1, "unit"), "w_v_dkh": (1, "unit"), "w_o_nhd": (0, "head")},
    "mqa": {"w_q_dnh": (1, "unit"), "w_o_nhd": (0, "unit")},  # the one KV head stays
    "mla": {
        **{
            name: (1, "unit")
            for name in ("w_q_dnh", "w_qr_dnr", "w_uq_qnh", "w_qr_qnr", "w_uk_anh", "w_uv_anh")
        },
        "w_o_nhd": (0, "unit"),
    },
    "swiglu": {"w_gate_df": (1, "unit"), "w_up_df": (1, "unit"), "w_down_fd": (0, "unit")},
    "moe": {
        "w_router_de": (1, "router"),
        "w_gate_edf": (0, "unit"),
        "w_up_edf": (0, "unit"),
        "w_down_efd": (0, "unit"),
        "bias_e": (0, "bias"),
    },
}
_UNIT_NAMES = {
    "mha": "KV groups",
    "mqa": "query heads",
    "mla": "heads",
    "swiglu": "channels",
    "moe": "experts",
}


@dataclasses.dataclass(frozen=True)
class Site:
    """One pruned module: a run's stacked layers, or a skip module.

    Attributes:
      key: ``"runs/<i>"`` or ``"skips/<k>"`` (its path in the model).
      prefix: the module's path in ``nnx.state(model)``'s flat paths.
      kind: the cut it takes: ``"mha"``, ``"mqa"``, ``"mla"``, ``"swiglu"`` or ``"moe"``.
      layers: the layers it holds (1 for a skip module, whose weights have no layers axis).
      stacked: whether its weights carry a leading layers axis.
      units: KV groups, heads, channels or experts per layer.
      groups: units are chosen within this many equal contiguous groups (MoE ``n_group``), else 1.
      per_unit: query heads per unit (G of a GQA group; 1 otherwise).
    """

    key: str
    prefix: tuple
    kind: str
    layers: int
    stacked: bool
    units: int
    groups: int = 1
    per_unit: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class StructuredPlan:
    """Which units every pruned module keeps, and the config of the pruned model.

    Attributes:
      target: ``"heads"``, ``"channels"`` or ``"experts"``.
      criterion: the importance used (``"auto"`` resolved).
      sites: the pruned modules.
      keep: site key -> kept unit indices ``[layers, kept]``, ascending in each row (so GQA query
        heads stay with their KV head and MoE groups stay contiguous).
      scores: site key -> importance ``[layers, units]`` (the lowest were removed).
      cfg: the pruned model's config.
    """

    target: str
    criterion: str
    sites: tuple[Site, ...]
    keep: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    cfg: ModelConfig


def prune_structured(
    model: nnx.Module,
    cfg: ModelConfig,
    target: str,
    fraction: float,
    *,
    calibration: Any = None,
    criterion: str = "auto",
) -> tuple[Transformer, ModelConfig]:
    """``(Transformer(new_cfg), new_cfg)`` with ``fraction`` of the ``target`` units removed.

    Args:
      model: a float ``Transformer`` of ``cfg`` (left unchanged).
      target: ``"heads"``, ``"channels"`` or ``"experts"`` (see the module doc).
      fraction: the share of units removed in every pruned layer, in (0, 1).
      calibration: int token rows ``[samples, seq_len]`` (at least 8) for the data criteria
        (``"magnitude"`` does not read them).
      criterion: ``"auto"``, ``"magnitude"``, ``"activation"`` or ``"load"`` (experts).

    Raises:
      ValueError: a bad target, fraction or criterion; a fraction that removes no unit or all of
        them; a model with nothing to prune; a pruned config its layers cannot take (e.g. MoE
        ``top_k`` above the experts left); a quantized model; bad calibration rows.
    """
    plan = plan_structured(model, cfg, target, fraction, calibration=calibration, criterion=criterion)
    return apply_structured(model, cfg, plan)


def structured_mask(
    model: nnx.Module,
    cfg: ModelConfig,
    target: str,
    fraction: float,
    *,
    calibration: Any = None,
    criterion: str = "auto",
) -> tuple[Transformer, ModelConfig]:
    """The pruning ``prune_structured`` makes with the same arguments, as zeros in a model of the
    original shape: ``(masked_model, masked_cfg)``; see ``apply_structured(..., mask=True)``."""
    _check_maskable(cfg, target)  # before any calibration pass
    plan = plan_structured(model, cfg, target, fraction, calibration=calibration, criterion=criterion)
    return apply_structured(model, cfg, plan, mask=True)


def plan_structured(
    model: nnx.Module,
    cfg: ModelConfig,
    target: str,
    fraction: float,
    *,
    calibration: Any = None,
    criterion: str = "auto",
    batch: int = 8,
) -> StructuredPlan:
    """Chooses the units to remove (``prune_structured``'s arguments; ``batch``: calibration rows
    per forward pass). Ties are broken by position (a stable sort), so a plan is deterministic."""
    check_choice("", "target", target, TARGETS)
    check_number("", "fraction", fraction, "must be in (0, 1)", lambda v: 0 < v < 1)
    check_choice("", "criterion", criterion, CRITERIA)
    if is_quantized(model):
        raise ValueError("the model is quantized: prune its float checkpoint instead")
    if criterion == "auto":
        criterion = "magnitude" if calibration is None else ("load" if target == "experts" else "activation")
    if criterion == "load" and target != "experts":
        raise ValueError(f"criterion='load' applies to target='experts' only, not target={target!r}")
    sites = _sites(cfg, target)
    removed = {s.kind: _removed(s, fraction) for s in sites}
    new_cfg = _pruned_config(cfg, target, fraction, removed)
    if criterion == "magnitude":
        flat = _flat_values(model)
        scores = {s.key: _magnitude(s, flat) for s in sites}
    else:
        rows = calibrate.check_rows(calibration, cfg, f"structured pruning by {criterion}")
        scores = _calibrated(model, cfg, sites, criterion, rows, batch)
    keep = {s.key: _choose(scores[s.key], removed[s.kind], s.groups) for s in sites}
    return StructuredPlan(target, criterion, tuple(sites), keep, scores, new_cfg)


def apply_structured(
    model: nnx.Module, cfg: ModelConfig, plan: StructuredPlan, *, mask: bool = False
) -> tuple[Transformer, ModelConfig]:
    """``plan`` applied to ``model``: ``(Transformer(plan.cfg), plan.cfg)`` filled from the kept
    slices, or with ``mask`` a model of the original shape whose removed units are zeroed.

    A masked MoE cannot zero an expert out of the routing (a zero router column still scores), so
    its removed experts get the bias ``b_i = -inf`` instead: never chosen, as if gone. Its config
    then has ``router_bias=True`` (the only difference from ``cfg``), and its outputs equal the
    pruned model's when the gates do not depend on the removed experts' scores: a sigmoid router,
    or a softmax one with ``norm_topk`` (and dropless or dense compute).

    Raises:
      ValueError: masking experts of a softmax router without ``norm_topk``, whose gates are
        normalized over every expert; a variable of a pruned module that the pruning cannot cut.
    """
    flat = _flat_values(model)
    if not mask:
        values = {p: _cut_value(plan, p, v, _shrink_value) for p, v in flat.items()}
        return _build(plan.cfg, values), plan.cfg
    _check_maskable(cfg, plan.target)
    out_cfg = cfg
    if plan.target == "experts":
        m = cfg.moe
        if not m.router_bias:  # a bias to exclude the removed experts with
            out_cfg = cfg.replace(moe=dataclasses.replace(m, router_bias=True))
            for s in plan.sites:
                flat[(*s.prefix, "bias_e")] = np.zeros((s.layers, s.units), np.float32)
    values = {p: _cut_value(plan, p, v, _mask_value) for p, v in flat.items()}
    return _build(out_cfg, values), out_cfg


def _check_maskable(cfg: ModelConfig, target: str) -> None:
    if target == "experts" and cfg.moe is not None and cfg.moe.router == "softmax" and not cfg.moe.norm_topk:
        raise ValueError(
            "structured_mask cannot mask experts of a softmax router with norm_topk=False: its "
            "gates are normalized over every expert, so no masked model equals the pruned one"
        )


# -- which modules, how many units -----------------------------------------------------------------


def _sites(cfg: ModelConfig, target: str) -> list[Site]:
    a, found = cfg.attention, []
    for i, (block, _, count) in enumerate(run_layout(cfg)):
        key, prefix = f"runs/{i}", ("runs", i, "layers")
        if target == "heads":
            if block.attention == "mha" and a.num_kv_heads == 1:
                found.append(Site(key, (*prefix, "attention"), "mqa", count, True, a.num_heads))
            elif block.attention == "mha":
                site = Site(
                    key, (*prefix, "attention"), "mha", count, True, a.num_kv_heads, per_unit=a.groups
                )
                found.append(site)
            elif block.attention == "mla":
                found.append(Site(key, (*prefix, "attention"), "mla", count, True, cfg.mla.num_heads))
            else:
                raise ValueError(
                    f"target='heads' supports attention kinds 'mha' (MHA/GQA/MQA) and 'mla'; "
                    f"run {i} uses attention {block.attention!r}"
                )
        elif target == "channels" and block.ffn == "swiglu":
            found.append(Site(key, (*prefix, "ffn"), "swiglu", count, True, cfg.ffn_dim))
        elif target == "experts" and block.ffn == "moe":
            m = cfg.moe
            found.append(Site(key, (*prefix, "ffn"), "moe", count, True, m.num_experts, groups=m.n_group))
    if target == "channels" and cfg.skip_kind == "swiglu":  # skip SwiGLUs are ffn_dim wide too
        found += [
            Site(f"skips/{k}", ("skips", k), "swiglu", 1, False, cfg.ffn_dim)
            for k in range(len(cfg.skip_layers))
        ]
    if not found:
        what = {"channels": "SwiGLU FFN (ffn 'swiglu' blocks or skip_kind 'swiglu')", "experts": "MoE block"}
        raise ValueError(f"target={target!r} has nothing to prune: model {cfg.name!r} has no {what[target]}")
    return found


def _removed(site: Site, fraction: float) -> int:
    """Units removed per group of ``site`` (nearest, halves up), leaving at least one."""
    units = site.units // site.groups
    count = math.floor(fraction * units + 0.5)
    what = _UNIT_NAMES[site.kind] + (f" per expert group (n_group={site.groups})" if site.groups > 1 else "")
    if count == 0:
        raise ValueError(f"fraction={fraction} of {units} {what} removes none: nothing would be pruned")
    if count >= units:
        raise ValueError(
            f"fraction={fraction} of {units} {what} removes {count}, leaving none: at least one must stay"
        )
    return count


def _pruned_config(cfg: ModelConfig, target: str, fraction: float, removed: dict[str, int]) -> ModelConfig:
    a, changes = cfg.attention, {}
    if "mha" in removed:  # whole groups: G stays, N = K·G
        K = a.num_kv_heads - removed["mha"]
        changes["attention"] = dataclasses.replace(a, num_heads=K * a.groups, num_kv_heads=K)
    if "mqa" in removed:
        changes["attention"] = dataclasses.replace(a, num_heads=a.num_heads - removed["mqa"])
    if "mla" in removed:
        mla = dataclasses.replace(cfg.mla, num_heads=cfg.mla.num_heads - removed["mla"])
        changes["mla"] = mla
        uses_mha = any(b.attention == "mha" for b in cfg.layer_blocks)
        if not uses_mha and a == cfg.mla.mha_baseline():  # the MLA model's MHA baseline follows it
            changes["attention"] = mla.mha_baseline()
    if "swiglu" in removed:
        changes["ffn_dim"] = cfg.ffn_dim - removed["swiglu"]
    if "moe" in removed:
        m = cfg.moe
        E = m.num_experts - removed["moe"] * m.n_group
        if m.top_k > E:
            raise ValueError(
                f"fraction={fraction} leaves {E} of {m.num_experts} experts, fewer than "
                f"MoEConfig.top_k={m.top_k}: top_k must stay <= the remaining experts"
            )
        try:
            changes["moe"] = dataclasses.replace(m, num_experts=E)
        except ValueError as e:  # e.g. group-limited routing that can no longer reach top_k experts
            raise ValueError(f"fraction={fraction} leaves {E} of {m.num_experts} experts: {e}") from None
    return cfg.replace(**changes)


def _choose(scores: np.ndarray, removed: int, groups: int) -> np.ndarray:
    """Kept indices ``[layers, kept]``: in each row (and group), all but the ``removed`` lowest."""
    layers, units = scores.shape
    per = units // groups
    grouped = scores.reshape(layers, groups, per)
    order = np.argsort(grouped, axis=-1, kind="stable")[..., removed:]  # the kept, by score
    kept = np.sort(order, axis=-1) + (np.arange(groups) * per)[None, :, None]
    return kept.reshape(layers, groups * (per - removed))


# -- importance ------------------------------------------------------------------------------------


def _flat_values(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _weight(site: Site, flat: dict[tuple, np.ndarray], name: str) -> np.ndarray:
    """The site's weight ``name`` with a layers axis, as float32."""
    w = np.asarray(flat[(*site.prefix, name, "w")], np.float32)
    return w if site.stacked else w[None]


def _norms(w: np.ndarray, axis: int) -> np.ndarray:
    """Frobenius norms of ``w [L, ...]`` over every axis but the layers and ``axis`` (of one layer)."""
    moved = np.moveaxis(w, axis + 1, 1)
    return np.sqrt(np.sum(np.square(moved.reshape(*moved.shape[:2], -1)), axis=-1))


def _magnitude(site: Site, flat: dict[tuple, np.ndarray]) -> np.ndarray:
    """``[layers, units]`` weight-magnitude importance (module doc)."""

    def w(name):
        return _weight(site, flat, name)

    if site.kind in ("mha", "mqa"):
        v = _norms(w("w_v_dkh"), 1)  # [L,K]
        o = _norms(w("w_o_nhd"), 0)  # [L,N]
        per_head = o * np.repeat(v, o.shape[1] // v.shape[1], axis=1)  # head n reads KV head n // G
        return _per_unit(site, per_head)
    if site.kind == "mla":
        return _norms(w("w_uv_anh"), 1) * _norms(w("w_o_nhd"), 0)
    if site.kind == "swiglu":
        return _norms(w("w_gate_df"), 1) * _norms(w("w_up_df"), 1) * _norms(w("w_down_fd"), 0)
    return _norms(w("w_gate_edf"), 0) * _norms(w("w_up_edf"), 0) * _norms(w("w_down_efd"), 0)


def _per_unit(site: Site, per_head: np.ndarray) -> np.ndarray:
    """Heads' scores ``[L,N]`` summed over each unit's query heads: ``[L, units]``."""
    return per_head.reshape(per_head.shape[0], site.units, site.per_unit).sum(-1)


class _Seen(nnx.Variable):
    """A probe's running sum over the calibration tokens (not a parameter)."""


class _HeadProbe(nnx.Module):
    """Stands in for an attention layer's ``w_o_nhd``: sums each head's ``‖o_n W_o[n]‖₂``."""

    def __init__(self, inner: Einsum):
        self.inner = inner
        self.seen = _Seen(jnp.zeros((inner.w[...].shape[0],), jnp.float32))  # [N]

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.inner.w[...].astype(jnp.float32)  # [N,H,D]
        # ‖o_n W_n‖² = o_n (W_n W_nᵀ) o_nᵀ: the [N,H,H] Gram matrices spare the [B,T,N,D] outputs.
        gram = jnp.matmul(w, jnp.swapaxes(w, -1, -2))  # [N,H,H]
        o = x.astype(jnp.float32)  # [B,T,N,H]
        sq = jnp.sum(jnp.matmul(o[..., None, :], gram)[..., 0, :] * o, axis=-1)  # [B,T,N]
        self.seen[...] = self.seen[...] + jnp.sqrt(jnp.maximum(sq, 0.0)).sum((0, 1))
        return self.inner(eqn, x)


class _ChannelProbe(nnx.Module):
    """Stands in for a SwiGLU: sums each channel's ``|silu(g)·u|``."""

    def __init__(self, inner: SwiGLU):
        self.inner = inner
        self.seen = _Seen(jnp.zeros((inner.w_down_fd.w[...].shape[0],), jnp.float32))  # [F]

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.inner.w_gate_df("BTD,DF->BTF", x)
        up = self.inner.w_up_df("BTD,DF->BTF", x)
        h = jnp.abs(jax.nn.silu(gate) * up).astype(jnp.float32)  # [B,T,F]
        self.seen[...] = self.seen[...] + h.sum((0, 1))
        return self.inner(x)


class _ExpertProbe(nnx.Module):
    """Stands in for a MoE: sums each expert's assignments (``"load"``) or gated output norms."""

    def __init__(self, inner: MoE, criterion: str):
        self.inner, self.criterion = inner, criterion  # criterion: static
        self.seen = _Seen(jnp.zeros((inner.moe.num_experts,), jnp.float32))  # [E]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        E = self.inner.moe.num_experts
        r = self.inner.route(x)  # experts, gates [B,T,k]
        if self.criterion == "load":
            found = routing.expert_counts(r.experts, E)
        else:
            w = self.inner.weights()

            def output_norm(expert):  # ‖FFN_e(x)‖₂ of every token: [B,T]
                g, u, d = (a.astype(x.dtype) for a in expert)
                h = jax.nn.silu(jnp.einsum("BTD,DF->BTF", x, g)) * jnp.einsum("BTD,DF->BTF", x, u)
                y = jnp.einsum("BTF,FD->BTD", h, d).astype(jnp.float32)
                return jnp.sqrt(jnp.sum(jnp.square(y), -1))

            norms = jax.lax.map(output_norm, (w.gate, w.up, w.down))  # [E,B,T], one expert at a time
            routed = jnp.sum(jax.nn.one_hot(r.experts, E) * r.gates[..., None], axis=-2)  # g_te [B,T,E]
            found = jnp.einsum("BTE,EBT->E", routed, norms)
        self.seen[...] = self.seen[...] + found
        return self.inner(x)


def _calibrated(
    model: nnx.Module, cfg: ModelConfig, sites: list[Site], criterion: str, rows: np.ndarray, batch: int
) -> dict[str, np.ndarray]:
    """``[layers, units]`` importance of every site from one pass of the original model over
    ``rows``: a copy with its layers unstacked, probes in place of the modules measured."""
    work = with_unstacked_layers(model)  # separate Blocks (copies): each layer gets its own probe
    probes: dict[str, list[nnx.Module]] = {}
    for s in sites:
        if s.key.startswith("skips/"):
            k = int(s.key.split("/")[1])
            work.skips[k] = _ChannelProbe(work.skips[k])
            probes[s.key] = [work.skips[k]]
            continue
        blocks = list(work.runs[int(s.key.split("/")[1])].layers)
        for b in blocks:
            if s.kind in ("mha", "mqa", "mla"):
                b.attention.w_o_nhd = _HeadProbe(b.attention.w_o_nhd)
            elif s.kind == "swiglu":
                b.ffn = _ChannelProbe(b.ffn)
            else:
                b.ffn = _ExpertProbe(b.ffn, criterion)
        probes[s.key] = [b.attention.w_o_nhd if s.kind in ("mha", "mqa", "mla") else b.ffn for b in blocks]
    graphdef, state = nnx.split(work)

    @jax.jit
    def seen(state, tokens):
        m = nnx.merge(graphdef, state)
        m(tokens, return_hidden=True)  # the hidden states are enough: skip the [B,T,V] logits
        return nnx.state(m, _Seen)

    total = None
    for i in range(0, len(rows), batch):  # summed on the host, in float64
        found = jax.tree.map(
            lambda a: np.asarray(a, np.float64), seen(state, jnp.asarray(rows[i : i + batch]))
        )
        total = found if total is None else jax.tree.map(np.add, total, found)
    nnx.update(work, total)
    flat = _flat_values(model)
    scores = {}
    for s in sites:
        got = np.stack([np.asarray(p.seen[...], np.float64) for p in probes[s.key]])  # [L, N|F|E]
        if s.kind in ("mha", "mqa"):
            got = _per_unit(s, got)
        elif s.kind == "swiglu":
            got = got * _norms(_weight(s, flat, "w_down_fd"), 0)
        scores[s.key] = got
    return scores


# -- cutting and building --------------------------------------------------------------------------


def _cut_value(plan: StructuredPlan, path: tuple, value: np.ndarray, how) -> np.ndarray:
    """``value`` of the variable at ``path`` cut by ``how`` if a pruned module owns it."""
    for s in plan.sites:
        rest = path[len(s.prefix) :]
        if path[: len(s.prefix)] != s.prefix or rest[1:] not in ((), ("w",)):
            continue
        cut = _CUTS[s.kind].get(rest[0])
        if cut is None:
            continue  # not cut by this pruning (a norm, a shared expert, ...)
        axis, role = cut
        keep = [_indices(s, role, row) for row in plan.keep[s.key]]  # per layer
        stacked = value if s.stacked else value[None]
        out = np.stack([how(layer, axis, idx, role) for layer, idx in zip(stacked, keep, strict=True)])
        return out if s.stacked else out[0]
    return value


def _indices(site: Site, role: str, kept_units: np.ndarray) -> np.ndarray:
    """Indices along a weight's axis kept for ``kept_units``: its query heads for ``"head"``."""
    if role == "head":
        G = site.per_unit
        return (kept_units[:, None] * G + np.arange(G)).reshape(-1)
    return kept_units


def _shrink_value(w: np.ndarray, axis: int, idx: np.ndarray, role: str) -> np.ndarray:
    return np.take(w, idx, axis=axis)


def _mask_value(w: np.ndarray, axis: int, idx: np.ndarray, role: str) -> np.ndarray:
    """Zeros at the removed indices; the router column stays (a zero column still scores) and
    the removed experts' bias becomes -inf, so routing never chooses them."""
    if role == "router":
        return w
    kept = np.zeros(w.shape[axis], bool)
    kept[idx] = True
    shape = [1] * w.ndim
    shape[axis] = -1
    kept = kept.reshape(shape)
    if role == "bias":
        return np.where(kept, w, -np.inf).astype(w.dtype)
    return np.where(kept, w, 0).astype(w.dtype)


def _build(cfg: ModelConfig, values: dict[tuple, np.ndarray]) -> Transformer:
    """A ``Transformer(cfg)`` whose variables are ``values`` (checked against its shapes), placed
    as a loaded model is: sharded under an ambient mesh, else on the default device."""
    with nnx.use_eager_sharding(False):  # shapes only; placed below
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    missing, extra = sorted(set(variables) - set(values)), sorted(set(values) - set(variables))
    if missing or extra:
        raise ValueError(
            f"pruned variables do not match a model of the pruned config: missing {missing}, extra {extra}"
        )
    filled = []
    for p, var in variables.items():
        want, got = var.get_value(), values[p]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"variable {'/'.join(map(str, p))} is {list(got.shape)} after pruning, but the pruned "
                f"config needs {list(want.shape)}: structured pruning does not know how to cut it"
            )
        filled.append((p, var.replace(jnp.asarray(got, want.dtype))))
    state = nnx.from_flat_state(filled)
    mesh, rules = sharding.ambient()
    if mesh.empty or not rules:
        state = jax.device_put(state)
    else:
        state = sharding.shard_state(state, jax.sharding.get_mesh(), rules)
    return nnx.merge(graphdef, state)
