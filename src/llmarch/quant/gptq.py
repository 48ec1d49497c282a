"""GPTQ (Frantar et al., ICLR 2023): rounding with second-order error feedback.

A linear ``y = x W`` with ``W [K, N]`` is quantized one input row ``k`` at a time; the rounding
error of row k, divided by the k-th diagonal of the Cholesky factor of ``H⁻¹`` (``H = Σ x xᵀ`` over
calibration inputs), is pushed onto the rows not yet quantized in proportion to that factor's row
(the optimal brain surgeon update), so the layer output ``x W`` moves as little as the remaining
freedom allows. As in the paper:

- dampening: ``H + λ·mean(diag H)·I`` keeps ``H`` invertible (λ = ``gptq_damp``);
- lazy batches: updates inside a block of ``gptq_block`` rows are applied row by row, the rest of
  the matrix gets the block's accumulated update at once (one matmul instead of B rank-1 updates);
- act-order: rows in order of decreasing ``diag H`` (the inputs with the most energy go first,
  while the most freedom is left); with groups, their scales are then fixed up front from the
  unquantized weight ("static groups"), since a group's rows no longer come together;
- groups: otherwise each group's scale (and zero point) is taken, as RTN would, from the
  already-updated weights when its first row comes up.

Inputs never seen (``diag H = 0``) have their weights zeroed, as the reference implementation
does. With ``H = I`` no error is fed back and GPTQ is exactly RTN (tested bit for bit).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from llmarch.config import ModelConfig
from llmarch.quant import calibrate
from llmarch.quant.config import QuantConfig
from llmarch.quant.hessian import inverse_factor, zero_dead_inputs
from llmarch.quant.targets import Linear
from llmarch.quant.tensor import QuantizedTensor, dequantize, rtn


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of ``w [..., K, N]`` under ``hessian [..., K, K]``: ``(q, scale, zero)`` as ``rtn``
    returns them (leading axes, e.g. MoE experts, are quantized one matrix at a time)."""
    w = np.asarray(w, np.float32)
    hessian = np.asarray(hessian, np.float64)
    if hessian.shape != (*w.shape[:-1], w.shape[-2]):
        raise ValueError(f"hessian {hessian.shape} does not match weight {w.shape}: need [..., K, K]")
    if w.ndim > 2:
        parts = [
            gptq(
                wi,
                hi,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                damp=damp,
                block=block,
                act_order=act_order,
            )
            for wi, hi in zip(
                w.reshape(-1, *w.shape[-2:]), hessian.reshape(-1, *hessian.shape[-2:]), strict=True
            )
        ]

        def stack(i: int) -> np.ndarray | None:
            if parts[0][i] is None:
                return None
            return np.stack([p[i] for p in parts]).reshape(*w.shape[:-2], *parts[0][i].shape)

        return stack(0), stack(1), stack(2)
    return _gptq_matrix(w.copy(), hessian.copy(), bits, group_size, symmetric, damp, block, act_order)


def _gptq_matrix(W, H, bits, group_size, symmetric, damp, block, act_order):
    K, N = W.shape
    g = K if group_size is None else group_size
    zero_dead_inputs(W, H)
    n_groups = K // g
    scales = np.ones((n_groups, N), np.float32)
    zeros = None if symmetric else np.zeros((n_groups, N), np.float32)
    if act_order:  # static groups: every group's parameters from the weight before any update
        perm = np.argsort(-np.diag(H), kind="stable")
        _, s, z = rtn(W, bits, group_size, symmetric)
        scales[:] = s
        if zeros is not None:
            zeros[:] = z
    else:
        perm = np.arange(K)
    W, H = W[perm], H[perm][:, perm]
    U = inverse_factor(H, damp)  # upper: H⁻¹ = Uᵀ U
    Q = np.zeros((K, N), np.float32)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[i1:i2], U[i1:i2, i1:i2]
        err = np.zeros((i2 - i1, N), np.float32)
        for i in range(i2 - i1):
            k = perm[i1 + i]
            if not act_order and k % g == 0:  # a group starts: its parameters from the rows as they are now
                rows = np.concatenate([W1[i:], W[i2:]])[:g]
                _, s, z = rtn(rows, bits, None, symmetric)
                scales[k // g] = s[0]
                if zeros is not None:
                    zeros[k // g] = z[0]
            s = scales[k // g]
            z = None if zeros is None else zeros[k // g]
            Q[i1 + i] = _round(W1[i], s, z, bits)
            deq = Q[i1 + i] * s if z is None else (Q[i1 + i] - z) * s
            err[i] = (W1[i] - deq) / U1[i, i]
            W1[i + 1 :] -= np.outer(U1[i, i + 1 :], err[i])
        W[i2:] -= U[i1:i2, i2:].T @ err
    Q = Q[np.argsort(perm)]
    if zeros is None:
        return Q.astype(np.int8), scales, None
    dtype = np.uint8 if bits == 8 else np.int8
    return Q.astype(dtype), scales, zeros.astype(dtype)


def _round(w: np.ndarray, s: np.ndarray, z: np.ndarray | None, bits: int) -> np.ndarray:
    """RTN's rounding of one row under given scales (and zero points), as float32 integers."""
    if z is None:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(np.round(w / s), -qmax - 1, qmax)
    return np.clip(np.round(w / s) + z, 0, 2**bits - 1)


def quantize_model(
    model: nnx.Module,
    cfg: ModelConfig,
    qcfg: QuantConfig,
    targets: list[Linear],
    calibration: np.ndarray,
    *,
    progress: bool = True,
) -> None:
    """Installs GPTQ-quantized weights for ``targets`` in ``model``, walking its blocks in order
    on the calibration token rows (``llmarch.quant.calibrate.walk``)."""

    def quantize_unit(unit: calibrate.Unit) -> dict[str, QuantizedTensor]:
        stats = unit.stats()
        out = {}
        for path, site in unit.sites.items():
            m = site.matrix()
            h = (
                stats[path].hessian
                if path in stats
                else np.broadcast_to(np.eye(m.shape[-2]), (*m.shape[:-1], m.shape[-2]))
            )
            q, scale, zero = gptq(
                m,
                h,
                bits=qcfg.bits,
                group_size=qcfg.group_size,
                symmetric=qcfg.symmetric,
                damp=qcfg.gptq_damp,
                block=qcfg.gptq_block,
                act_order=qcfg.gptq_act_order,
            )
            qt = QuantizedTensor.from_unpacked(q, scale, zero, qcfg.bits, qcfg.group_size)
            site.set(dequantize(qt))
            out[path] = qt
        return out

    calibrate.walk_quantized(model, cfg, qcfg, targets, calibration, quantize_unit, progress=progress)
