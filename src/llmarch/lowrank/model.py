"""``factorize_model(model, cfg, lcfg)``: a ``Transformer`` whose linear weights are low-rank factors.

The weights are those quantization and pruning see (``llmarch.quant.targets``: attention, MLA and
FFN projections, memory-layer projections, the shared experts; the untied LM head with
``include_lm_head``), each viewed as the matrix ``[K, N]`` of its contracted and output axes.

Left dense, with the reason ``plan`` reports:

- weights with batch axes, i.e. MoE's routed experts ``[E, K, N]``: the dispatch code multiplies
  them as whole arrays (grouped matmuls over ``[E, D, F]``), so factors would be multiplied back
  into the full weight every step — fewer parameters but more FLOPs, not what factorization is
  for. The router (it picks the experts), embeddings and lookup tables are not linears here.
- with ``only_if_smaller``, weights whose factors at the stored rank would not be smaller.

A scanned run stacks its layers' weights in one array, so every layer of a run must have one
shape: each weight is stored at the largest of its layers' ranks, the other layers' extra columns
of A and rows of B zero (their product is exactly the layer's truncation, and gradients leave
zero columns zero), and ``ModelConfig.low_rank`` records each layer's own rank.
``llmarch.accounting`` counts the stored rank, which is what the arrays hold and the matmuls do.

Plain SVD needs no data. Activation-aware SVD (``activation_aware``) walks the model block by
block on calibration rows (``llmarch.quant.calibrate``, shared with GPTQ and SparseGPT): each block
is factorized from its linears' input moments with the blocks before it already factorized.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch.config import LowRankWeight, ModelConfig
from llmarch.layers import kinds
from llmarch.lowrank.config import LowRankConfig
from llmarch.lowrank.layer import LowRankEinsum, install
from llmarch.lowrank.svd import (
    Decomposition,
    asvd_scaling,
    decompose,
    rank_for_energy,
    rank_for_params,
    whitening_from_hessian,
)
from llmarch.model import run_layout
from llmarch.quant import calibrate
from llmarch.quant.config import QuantConfig
from llmarch.quant.targets import Linear, is_quantized, linears


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``factorize_model`` would factorize: the targets, and the weights left dense with why.

    Attributes:
      targets: the linear weights to factorize, in module order.
      counted_as: each target's ``accounting.ParamCounts`` field, by path.
      skipped: path -> why that linear weight stays dense (the size check at the stored rank is
        known only after the SVD, and is made by ``factorize_model``).
    """

    targets: list[Linear]
    counted_as: dict[str, str]
    skipped: dict[str, str]


def plan(model: nnx.Module, cfg: ModelConfig, lcfg: LowRankConfig) -> Plan:
    """The linear weights of ``model`` that ``lcfg`` factorizes, and those it cannot."""
    targets, counted, skipped = [], {}, {}
    for t in linears(model, cfg, QuantConfig(include_lm_head=lcfg.include_lm_head)):
        if t.layout.batch:
            skipped[t.path] = (
                "batch axes (MoE experts): multiplied as whole [E, K, N] arrays, factors would "
                "be expanded every step"
            )
            continue
        where = _counted_as(cfg, t.path)
        if where is None:
            skipped[t.path] = "not a weight of a block, a skip module or the LM head"
            continue
        targets.append(t)
        counted[t.path] = where
    return Plan(targets, counted, skipped)


def factorize_model(
    model: nnx.Module,
    cfg: ModelConfig,
    lcfg: LowRankConfig,
    calibration: Any = None,
    *,
    progress: bool = False,
) -> tuple[nnx.Module, ModelConfig]:
    """A copy of ``model`` whose linear weights are replaced by ``LowRankEinsum`` factors.

    Args:
      model: a float, dense ``Transformer`` of ``cfg`` (left unchanged).
      lcfg: the rank rule (``param_ratio`` or ``energy``) and the method.
      calibration: int token rows ``[samples, seq_len]`` (at least 8 rows), for ``activation_aware``.
      progress: a progress bar over the blocks (activation-aware only).

    Returns:
      ``(model, new_cfg)``: ``new_cfg.low_rank`` records every factorized weight (path, shape,
      contracted axes, per-layer ranks), so ``Transformer(new_cfg)`` builds the same structure and
      a checkpoint of the new model restores into it; ``model.cfg`` is ``new_cfg``.

    Raises:
      ValueError: a quantized or already factorized model, missing or bad calibration rows, a
        ``param_ratio`` leaving some weight no rank (naming it).
    """
    if not isinstance(lcfg, LowRankConfig):
        raise TypeError(f"lcfg must be a LowRankConfig, got {type(lcfg).__name__}")
    if cfg.low_rank is not None or any(isinstance(m, LowRankEinsum) for _, m in nnx.iter_modules(model)):
        raise ValueError("the model is already factorized: factorize its dense checkpoint instead")
    if is_quantized(model):
        raise ValueError("the model is quantized: factorize its float checkpoint instead")
    if not lcfg.activation_aware and calibration is not None:
        raise ValueError("calibration rows are used only with activation_aware=True; pass None")
    model = nnx.clone(model)
    p = plan(model, cfg, lcfg)
    if lcfg.param_ratio is not None:  # fail on a too small budget before any SVD runs
        for t in p.targets:
            rank_for_params(*t.layout.matrix_shape, lcfg.param_ratio, name=t.path)
    results: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray, int]]] = {}

    if lcfg.activation_aware:

        def factorize_unit(unit: calibrate.Unit) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
            stats = unit.stats()
            out = {}
            for path, site in unit.sites.items():
                st = stats.get(path)
                if st is None:  # never called as a linear on these inputs: the plain SVD
                    whitening = None
                elif lcfg.scaling == "whiten":
                    whitening = whitening_from_hessian(st.hessian, lcfg.damp)
                else:
                    whitening = asvd_scaling(st.mean_abs, lcfg.asvd_alpha)
                found = _truncate(decompose(site.matrix(), whitening, name=site.target.path), lcfg)
                site.set(found[0] @ found[1])  # the next blocks see this block factorized
                out[path] = found
            return out

        def collect(t: Linear, found: dict[int | None, Any] | None) -> None:
            results[t.path] = found if found is not None else _plain(t, lcfg)

        calibrate.walk(
            model,
            cfg,
            p.targets,
            calibration,
            factorize_unit,
            collect,
            method=lcfg.method,
            include_head=lcfg.include_lm_head,
            progress=progress,
        )
    else:
        for t in p.targets:
            results[t.path] = _plain(t, lcfg)

    entries = []
    for t in p.targets:
        found = results[t.path]
        layers = [found[i] for i in range(len(found))] if t.lead else [found[None]]
        entry = LowRankWeight(
            path=t.path,
            shape=t.layout.shape,
            contracted=t.layout.perm[: t.layout.contracted],
            ranks=tuple(r for _, _, r in layers),
            counted_as=p.counted_as[t.path],
        )
        if lcfg.only_if_smaller and entry.params_saved <= 0:
            continue
        install(t.parent, t.key, _layer(t, layers, entry))
        entries.append(entry)
    new_cfg = cfg.replace(low_rank=tuple(entries) or None)
    model.cfg = new_cfg
    return model, new_cfg


def _plain(t: Linear, lcfg: LowRankConfig) -> dict[int | None, tuple[np.ndarray, np.ndarray, int]]:
    """Each layer of ``t`` factorized by the plain SVD, by layer (None: not stacked)."""
    m = t.matrix()  # [*lead, K, N]
    if not t.lead:
        return {None: _truncate(decompose(m, name=t.path), lcfg)}
    return {i: _truncate(decompose(layer, name=f"{t.path}[layer {i}]"), lcfg) for i, layer in enumerate(m)}


def _truncate(d: Decomposition, lcfg: LowRankConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """``(A, B, rank)`` of ``d`` at the rank ``lcfg`` chooses."""
    if lcfg.energy is not None:
        rank = rank_for_energy(d.s, lcfg.energy)
    else:
        rank = rank_for_params(*d.shape, lcfg.param_ratio, name=d.name)
    return (*d.factors(rank), rank)


def _layer(
    t: Linear, layers: list[tuple[np.ndarray, np.ndarray, int]], entry: LowRankWeight
) -> LowRankEinsum:
    """The ``LowRankEinsum`` of ``t``'s layers, each padded with zeros to the stored rank."""
    r = entry.rank
    k_dims = tuple(entry.shape[i] for i in entry.contracted)
    n_dims = tuple(d for i, d in enumerate(entry.shape) if i not in entry.contracted)
    a = np.stack([np.pad(a, ((0, 0), (0, r - a.shape[1]))) for a, _, _ in layers])  # [L, K, r]
    b = np.stack([np.pad(b, ((0, r - b.shape[0]), (0, 0))) for _, b, _ in layers])  # [L, r, N]
    a, b = a.reshape(-1, *k_dims, r), b.reshape(-1, r, *n_dims)  # [L, *K, r], [L, r, *N]
    if not t.lead:
        a, b = a[0], b[0]
    dtype = t.value().dtype
    return LowRankEinsum(
        jnp.asarray(a, dtype),
        jnp.asarray(b, dtype),
        shape=entry.shape,
        contracted=entry.contracted,
        names=t.layout.names,
        lead=t.lead,
    )


def _counted_as(cfg: ModelConfig, path: str) -> str | None:
    """The ``accounting.ParamCounts`` field the weight at ``path`` is counted in."""
    parts = path.split("/")
    if path == "lm_head":
        return "lm_head"
    if parts[0] == "runs" and len(parts) > 3 and parts[2] == "layers":
        block = run_layout(cfg)[int(parts[1])][0]
        if parts[3] == "attention":
            return "attention"
        if parts[3] == "ffn":
            return kinds.ffn(block.ffn).counted_as
    if parts[0] == "skips" and cfg.skip_kind is not None:
        return kinds.skip(cfg.skip_kind).counted_as
    return None
