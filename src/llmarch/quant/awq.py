"""AWQ (Lin et al., MLSys 2024): activation-aware scales, then round to nearest.

A few input channels of a linear carry much larger activations than the rest; their weights
matter most to the output. AWQ multiplies each input row ``k`` of ``W [K, N]`` by
``s_k = mean|x_k|^α`` before rounding and divides the input by ``s`` (``x W = (x/s)(s W)``), which
shrinks the relative rounding error of the salient rows. Per group of linears that read the same
input (a block's q/k/v after its attention norm, gate/up after its FFN norm, down after up):

- ``s = s_x^α / sqrt(max·min)`` with ``s_x`` the mean input magnitude per channel on calibration
  data and α from a grid of ``awq_grid`` points in [0, 1), the one whose quantized group gives
  the smallest mean squared error of the *block's* output (the other linears left in float);
- the scales are folded where the math allows, so the quantized model has no extra operation:
  into the RMSNorm before the group (its scale divided by ``s``; a MoE router reading the same
  input gets ``s`` in its rows, staying in float), or into the columns of the up projection
  before a down projection (``silu(g)·(u/s) = (silu(g)·u)/s``, per expert for MoE). A linear
  whose input comes from anywhere else (the attention output projection: with GQA a value
  head feeds several query heads, so per-channel scales do not commute) is left unscaled;
- with ``awq_clip``, each group-column of the scaled weight is clipped to the ratio (1.0 down to
  0.55) that minimises its output error ``Δwᵀ H Δw`` before rounding (the paper's clipping search).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from llmarch.config import ModelConfig
from llmarch.layers.einsum import Einsum
from llmarch.layers.moe import MoE
from llmarch.quant import calibrate
from llmarch.quant.config import QuantConfig
from llmarch.quant.targets import Linear
from llmarch.quant.tensor import QuantizedTensor, dequantize, rtn

CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))  # the paper's grid: 1.0, 0.95, .., 0.55
# Calibration tokens the α search runs the block on, 20 times per group: enough to rank the
# grid points (the statistics themselves come from every calibration row).
SEARCH_TOKENS = 2048


def search_rows(unit: calibrate.Unit) -> int:
    """How many of the unit's calibration rows the search uses (at least one)."""
    return max(1, SEARCH_TOKENS // unit.x.shape[1])


def grid(points: int) -> np.ndarray:
    """The α grid: ``points`` values ``0, 1/points, .., (points-1)/points``."""
    return np.arange(points) / points


def scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s = s_x^α`` normalized by ``sqrt(max·min)`` (per leading index), float32, ≥ 1e-4."""
    s = np.maximum(mean_abs.astype(np.float64), 1e-4) ** alpha
    s = s / np.sqrt(s.max(axis=-1, keepdims=True) * s.min(axis=-1, keepdims=True))
    return np.maximum(s, 1e-4).astype(np.float32)


def fake_quantize(m: np.ndarray, qcfg: QuantConfig) -> np.ndarray:
    """``m [..., K, N]`` rounded by RTN and dequantized (float32, on the host: the α and clipping
    searches call it hundreds of times)."""
    q, s, z = rtn(np.asarray(m, np.float32), qcfg.bits, qcfg.group_size, qcfg.symmetric)
    *batch, K, N = m.shape
    g = K if qcfg.group_size is None else qcfg.group_size
    q = q.reshape(*batch, K // g, g, N).astype(np.float32)
    if z is not None:
        q = q - z.reshape(*batch, K // g, 1, N).astype(np.float32)
    return (q * s.reshape(*batch, K // g, 1, N)).reshape(m.shape)


class Group:
    """Linears of a unit that read one input, and where their scales fold.

    Attributes:
      members: the quantized linears' paths in the unit (their K is the shared input's channels).
      mean_abs: the input's mean magnitude per channel ``[*batch, K]``.
      fold: how the scales are folded: ``("norm", norm_module, also)`` with ``also`` the float
        weights reading the same input that take ``s`` in their rows (a MoE router, linears not
        quantized); ``("up", up_einsum)`` for a down projection; None: not folded (α = 0).
    """

    def __init__(self, members: list[str], mean_abs: np.ndarray, fold):
        self.members, self.mean_abs, self.fold = members, mean_abs, fold


def groups(unit: calibrate.Unit, stats: dict[str, calibrate.Stats]) -> list[Group]:
    """The unit's linears grouped by input, each with its fold (see ``Group``)."""
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(unit.module) if p}
    by_source: dict[str, list[str]] = {}
    found = []
    for path in unit.sites:
        source = stats[path].source if path in stats else None
        if source and source.startswith("norm:"):
            by_source.setdefault(source[len("norm:") :], []).append(path)
        elif path.endswith("w_down_fd") and path[: -len("w_down_fd")] + "w_up_df" in unit.sites:
            up = modules[path[: -len("w_down_fd")] + "w_up_df"]
            found.append(Group([path], stats[path].mean_abs, ("up", up)))
        elif source and source.startswith("up:"):
            found.append(Group([path], stats[path].mean_abs, ("up", modules[source[len("up:") :]])))
        else:
            found.append(Group([path], np.ones(unit.sites[path].layout.matrix_shape[:-1], np.float32), None))
    for norm, members in by_source.items():
        also = [
            ("einsum", modules[p])
            for p, st in stats.items()
            if st.source == f"norm:{norm}" and p not in unit.sites
        ]
        also += [
            ("router", m) for p, m in modules.items() if isinstance(m, MoE) and f"{p}/w_gate_edf" in members
        ]
        dense = [p for p in members if unit.sites[p].layout.batch == 0]
        if dense:
            mean_abs = stats[dense[0]].mean_abs
        else:  # only MoE experts read it: their routed statistics, pooled
            st = stats[members[0]]
            mean_abs = st.abs_sum.sum(0) / max(st.count.sum(), 1)
        found.insert(0, Group(members, mean_abs, ("norm", modules[norm], also)))
    return found


def row_scales(path: str, s: np.ndarray, unit: calibrate.Unit) -> np.ndarray:
    """``s`` broadcast over the K rows of member ``path``'s matrix ``[*batch, K, 1]``."""
    batch = unit.sites[path].layout.matrix_shape[:-2]
    return np.broadcast_to(s, (*batch, s.shape[-1]))[..., None]


def search(unit: calibrate.Unit, group: Group, qcfg: QuantConfig, reference) -> tuple[float, np.ndarray]:
    """``(α, losses)``: the block output's mean squared error for each α of the grid with the
    group's members quantized at ``s(α)`` (the rest of the unit in float), and its argmin."""
    alphas = grid(qcfg.awq_grid)
    saved = {p: unit.sites[p].matrix() for p in group.members}
    losses = np.zeros(len(alphas))
    try:
        for i, alpha in enumerate(alphas):
            s = scales(group.mean_abs, alpha)
            for p, m in saved.items():
                rs = row_scales(p, s, unit)
                unit.sites[p].set(fake_quantize(m * rs, qcfg) / rs)
            out = unit(rows=search_rows(unit))
            losses[i] = float(np.mean(np.square(np.asarray(out, np.float64) - reference)))
    finally:
        for p, m in saved.items():
            unit.sites[p].set(m)
    return float(alphas[int(np.argmin(losses))]), losses


def fold(unit: calibrate.Unit, group: Group, s: np.ndarray) -> None:
    """Applies the scales ``s`` to the unit's float weights without changing its function."""
    for p in group.members:
        site = unit.sites[p]
        site.set(site.matrix() * row_scales(p, s, unit))
    kind = group.fold[0]
    if kind == "norm":
        _, norm, also = group.fold
        norm.scale[...] = (norm.scale[...] / s).astype(norm.scale[...].dtype)
        for what, m in also:
            w = m.w_router_de.w if what == "router" else m.w
            w[...] = (w[...] * s.reshape(-1, *([1] * (w[...].ndim - 1)))).astype(w[...].dtype)
    elif kind == "up":
        up: Einsum = group.fold[1]
        w = up.w[...]  # [D, F] or [E, D, F]: the down projection's K is up's last axis
        scale = s if w.ndim == 2 else s[:, None, :]
        up.w[...] = (w / scale).astype(w.dtype)


def clipped(m: np.ndarray, hessian: np.ndarray, qcfg: QuantConfig) -> np.ndarray:
    """``m [..., K, N]`` with each (group, column) clipped to the ratio of ``CLIP_RATIOS`` whose
    rounding error ``Δwᵀ H_gg Δw`` is smallest (``hessian [..., K, K]`` of its input)."""
    *batch, K, N = m.shape
    g = K if qcfg.group_size is None else qcfg.group_size
    G = K // g
    mg = m.reshape(*batch, G, g, N)
    idx = np.arange(G)
    hg = hessian.reshape(*batch, G, g, G, g)[..., idx, :, idx, :]  # [G, ..., g, g] (fancy axes first)
    hg = np.moveaxis(hg, 0, -3)  # [..., G, g, g]
    if qcfg.symmetric:
        amax = np.max(np.abs(mg), axis=-2, keepdims=True)
        bounds = lambda r: (-r * amax, r * amax)  # noqa: E731
    else:
        lo, hi = np.min(mg, axis=-2, keepdims=True), np.max(mg, axis=-2, keepdims=True)
        bounds = lambda r: (r * lo, r * hi)  # noqa: E731
    best_err = np.full((*batch, G, N), np.inf)
    best = mg.copy()
    for r in CLIP_RATIOS:
        lo_r, hi_r = bounds(r)
        c = np.clip(mg, lo_r, hi_r)
        d = (c.reshape(m.shape) - fake_quantize(c.reshape(m.shape), qcfg)).reshape(mg.shape)
        d = (mg - c) + d  # the error against the unclipped weight
        err = np.sum(d * (hg @ d), axis=-2)  # Δwᵀ H_gg Δw per (group, column)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better[..., None, :], c, best)
    return best.reshape(m.shape)


def quantize_model(
    model: nnx.Module,
    cfg: ModelConfig,
    qcfg: QuantConfig,
    targets: list[Linear],
    calibration: np.ndarray,
    *,
    progress: bool = True,
) -> None:
    """Installs AWQ-quantized weights for ``targets`` in ``model`` (and the folded norms, routers
    and up projections), walking its blocks in order on the calibration token rows."""

    def quantize_unit(unit: calibrate.Unit) -> dict[str, QuantizedTensor]:
        stats = unit.stats()
        reference = np.asarray(unit(rows=search_rows(unit)), np.float64)
        chosen = []
        for group in groups(unit, stats):
            alpha = search(unit, group, qcfg, reference)[0] if group.fold else 0.0
            chosen.append((group, scales(group.mean_abs, alpha)))
        for group, s in chosen:
            if group.fold:
                fold(unit, group, s)
        out = {}
        for group, s in chosen:
            for p in group.members:
                site = unit.sites[p]
                m = site.matrix()
                if qcfg.awq_clip and p in stats:
                    rs = row_scales(p, 1.0 / s, unit)  # the folded input is x / s
                    h = stats[p].hessian * rs * np.swapaxes(rs, -1, -2)
                    m = clipped(m, h, qcfg)
                qt = QuantizedTensor.from_unpacked(
                    *rtn(m, qcfg.bits, qcfg.group_size, qcfg.symmetric), qcfg.bits, qcfg.group_size
                )
                site.set(dequantize(qt))
                out[p] = qt
        return out

    calibrate.walk_quantized(model, cfg, qcfg, targets, calibration, quantize_unit, progress=progress)
