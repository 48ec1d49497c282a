"""``prune(model, cfg, pcfg)``: a copy of a ``Transformer`` with its linear weights pruned.

The weights are those quantization replaces (``llmarch.quant.targets``: attention, MLA, FFN, MoE
experts, memory-layer projections; the router, embeddings and lookup tables stay whole; the
untied LM head with ``include_lm_head``). Magnitude pruning needs no data; Wanda and SparseGPT walk
the model block by block on calibration rows (``llmarch.quant.calibrate``, shared with GPTQ),
each block seeing the blocks before it already pruned.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch.config import ModelConfig
from llmarch.prune.config import PruneConfig
from llmarch.prune.masks import magnitude, sparsegpt, wanda
from llmarch.quant import calibrate
from llmarch.quant.config import QuantConfig
from llmarch.quant.targets import Linear, is_quantized, linears


def prune(
    model: nnx.Module, cfg: ModelConfig, pcfg: PruneConfig, calibration: Any = None, *, progress: bool = True
) -> nnx.Module:
    """A copy of ``model`` whose linear weights are pruned as ``pcfg`` says.

    Args:
      model: a float ``Transformer`` of ``cfg`` (left unchanged).
      pcfg: method, sparsity and pattern.
      calibration: int token rows ``[samples, seq_len]`` for Wanda and SparseGPT.

    Raises:
      ValueError: a quantized model, missing or bad calibration rows, or a pattern whose m does
        not divide a weight's input dimension (naming the weight).
    """
    if getattr(cfg, "mtp_depth", 0):
        raise ValueError(
            f"ModelConfig.mtp_depth={cfg.mtp_depth}: prune does not cover multi-token-prediction modules "
            "(only some of their weights would change); allowed: a model without them, "
            "llmarch.model.without_mtp(model)"
        )
    if not isinstance(pcfg, PruneConfig):
        raise TypeError(f"pcfg must be a PruneConfig, got {type(pcfg).__name__}")
    if is_quantized(model):
        raise ValueError("the model is quantized: prune its float checkpoint instead")
    model = nnx.clone(model)
    targets = _targets(model, cfg, pcfg)
    if pcfg.method == "magnitude":
        matrices = [t.matrix() for t in targets]
        if pcfg.scope == "global":
            everything = np.concatenate([np.abs(m).reshape(-1) for m in matrices])
            cut = (
                np.sort(everything, kind="stable")[int(pcfg.sparsity * everything.size)]
                if everything.size
                else 0
            )
            masks = [np.abs(m) >= cut for m in matrices]
        else:
            masks = [magnitude(m, pcfg.sparsity, pcfg.n_m) for m in matrices]
        for t, m, keep in zip(targets, matrices, masks, strict=True):
            _set(t, np.where(keep, m, 0.0))
        return model

    def prune_unit(unit: calibrate.Unit) -> dict[str, np.ndarray]:
        stats = unit.stats()
        out = {}
        for path, site in unit.sites.items():
            m = site.matrix()
            st = stats.get(path)
            if st is None:  # never called as a linear in the forward pass: magnitude
                pruned = np.where(magnitude(m, pcfg.sparsity, pcfg.n_m), m, 0.0)
            elif pcfg.method == "wanda":
                norm = np.sqrt(np.maximum(np.diagonal(st.hessian, axis1=-2, axis2=-1), 0.0))
                pruned = np.where(wanda(m, norm, pcfg.sparsity, pcfg.n_m), m, 0.0)
            else:
                pruned = sparsegpt(m, st.hessian, pcfg.sparsity, pcfg.n_m, damp=pcfg.damp, block=pcfg.block)
            site.set(pruned)
            out[path] = pruned
        return out

    def install(t: Linear, found: dict[int | None, np.ndarray] | None) -> None:
        if found is None:  # no unit calls it: magnitude
            m = t.matrix()
            _set(t, np.where(magnitude(m, pcfg.sparsity, pcfg.n_m), m, 0.0))
        else:
            _set(t, np.stack([found[i] for i in range(len(found))]) if t.lead else found[None])

    calibrate.walk(
        model,
        cfg,
        targets,
        calibration,
        prune_unit,
        install,
        method=pcfg.method,
        include_head=pcfg.include_lm_head,
        progress=progress,
    )
    return model


def sparsity(model: nnx.Module, cfg: ModelConfig, *, include_lm_head: bool = False) -> dict[str, float]:
    """The fraction of zeros in each linear weight, by path (``"total"``: over all of them)."""
    found, zeros, size = {}, 0, 0
    for t in linears(model, cfg, QuantConfig(include_lm_head=include_lm_head)):
        m = t.matrix()
        found[t.path] = float(np.mean(m == 0))
        zeros, size = zeros + int(np.sum(m == 0)), size + m.size
    found["total"] = zeros / max(size, 1)
    return found


def _targets(model: nnx.Module, cfg: ModelConfig, pcfg: PruneConfig) -> list[Linear]:
    targets = linears(model, cfg, QuantConfig(include_lm_head=pcfg.include_lm_head))
    if pcfg.n_m is not None:
        m = pcfg.n_m[1]
        for t in targets:
            K = t.layout.matrix_shape[-2]
            if K % m:
                raise ValueError(
                    f"pattern {pcfg.pattern} needs the input dimension K={K} of {t.path} "
                    f"{t.layout.matrix_shape} to be a multiple of {m}"
                )
    return targets


def _set(t: Linear, m: np.ndarray) -> None:
    """Writes the matrix ``m [*lead, *batch, K, N]`` back into the target's weight."""
    w = t.module.w
    value = (
        jnp.stack([t.layout.from_matrix(jnp.asarray(layer)) for layer in m])
        if t.lead
        else t.layout.from_matrix(jnp.asarray(m))
    )
    w[...] = value.astype(w[...].dtype)
