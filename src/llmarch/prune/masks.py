"""Which weights to zero: magnitude, Wanda and N:M masks, and SparseGPT's reconstruction.

A weight is the matrix ``W [K, N]`` of ``llmarch.quant.targets`` (K inputs, N outputs; leading
axes such as MoE experts are pruned one matrix at a time). A mask is boolean, True where a weight
is kept. Ties are broken by position (a stable sort), so a mask is deterministic.

- magnitude: the ``sparsity·K·N`` smallest ``|W|`` of the matrix are zeroed;
- Wanda (Sun et al., ICLR 2024): score ``|W_kn|·‖X_k‖₂`` (the input's norm over calibration
  tokens), the ``sparsity·K`` lowest zeroed in each output column n — its comparison group;
- N:M: in every m consecutive inputs of an output, only the n highest scores are kept;
- SparseGPT (Frantar & Alistarh, ICML 2023): inputs processed in blocks of ``block`` rows; each
  block's mask chosen by the OBS saliency ``w² / [U]_kk²`` (U the upper Cholesky factor of
  ``H⁻¹``, as in GPTQ), then row by row the pruned weights' error is fed back onto the rows
  not yet visited, so the layer output moves as little as it can.
"""

from __future__ import annotations

import numpy as np

from llmarch.quant.hessian import inverse_factor, zero_dead_inputs


def _lowest(scores: np.ndarray, count: int, axis: int | None) -> np.ndarray:
    """True where a score is not among the ``count`` lowest (along ``axis``; None: all)."""
    keep = np.ones(scores.shape, bool)
    if count <= 0:
        return keep
    if axis is None:
        order = np.argsort(scores, axis=None, kind="stable")[:count]
        keep.reshape(-1)[order] = False
        return keep
    order = np.argsort(scores, axis=axis, kind="stable")
    np.put_along_axis(keep, np.take(order, np.arange(count), axis=axis), False, axis=axis)
    return keep


def n_m(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """The N:M mask of ``scores [..., K, N]``: in each run of m rows of K, the n highest kept."""
    *lead, K, N = scores.shape
    if K % m:
        raise ValueError(f"pattern {n}:{m} needs the input dimension K={K} to be a multiple of {m}")
    grouped = scores.reshape(*lead, K // m, m, N)
    return _lowest(grouped, m - n, axis=-2).reshape(scores.shape)


def magnitude(w: np.ndarray, sparsity: float, pattern: tuple[int, int] | None = None) -> np.ndarray:
    """The mask keeping ``w [..., K, N]``'s largest magnitudes (per matrix, or N:M)."""
    scores = np.abs(w)
    if pattern is not None:
        return n_m(scores, *pattern)
    *lead, K, N = w.shape
    flat = scores.reshape(*lead, K * N)
    keep = np.stack([_lowest(f, int(sparsity * K * N), None) for f in flat.reshape(-1, K * N)])
    return keep.reshape(w.shape)


def wanda(
    w: np.ndarray, input_norm: np.ndarray, sparsity: float, pattern: tuple[int, int] | None = None
) -> np.ndarray:
    """Wanda's mask of ``w [..., K, N]`` from ``input_norm [..., K]`` (``‖X_k‖₂``): per output."""
    scores = np.abs(w) * input_norm[..., :, None]
    if pattern is not None:
        return n_m(scores, *pattern)
    return _lowest(scores, int(sparsity * w.shape[-2]), axis=-2)


def sparsegpt(
    w: np.ndarray,
    hessian: np.ndarray,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    *,
    damp: float = 0.01,
    block: int = 128,
) -> np.ndarray:
    """SparseGPT of ``w [..., K, N]`` under ``hessian [..., K, K]``: the pruned weights (zeros
    where pruned, the kept weights updated to make up for them), float32."""
    w = np.asarray(w, np.float32)
    hessian = np.asarray(hessian, np.float64)
    if hessian.shape != (*w.shape[:-1], w.shape[-2]):
        raise ValueError(f"hessian {hessian.shape} does not match weight {w.shape}: need [..., K, K]")
    if pattern is not None and block % pattern[1]:
        raise ValueError(f"block={block} must be a multiple of the pattern's m={pattern[1]}")
    if w.ndim > 2:
        flat = zip(w.reshape(-1, *w.shape[-2:]), hessian.reshape(-1, *hessian.shape[-2:]), strict=True)
        out = [sparsegpt(wi, hi, sparsity, pattern, damp=damp, block=block) for wi, hi in flat]
        return np.stack(out).reshape(w.shape)
    if pattern is not None and w.shape[0] % pattern[1]:
        raise ValueError(
            f"pattern {pattern[0]}:{pattern[1]} needs the input dimension K={w.shape[0]} "
            f"to be a multiple of {pattern[1]}"
        )
    W, H = w.copy(), hessian.copy()
    K, N = W.shape
    zero_dead_inputs(W, H)
    U = inverse_factor(H, damp)  # upper: H⁻¹ = Uᵀ U
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[i1:i2], U[i1:i2, i1:i2]
        saliency = W1**2 / np.diag(U1)[:, None] ** 2  # [rows, N]
        if pattern is None:
            keep = _lowest(saliency, int(sparsity * saliency.size), None)
        else:
            keep = n_m(saliency, *pattern)
        err = np.zeros_like(W1)
        for i in range(i2 - i1):
            pruned = np.where(keep[i], W1[i], 0.0)
            err[i] = (W1[i] - pruned) / U1[i, i]
            W1[i] = pruned
            W1[i + 1 :] -= np.outer(U1[i, i + 1 :], err[i])
        W[i2:] -= U[i1:i2, i2:].T @ err
    return W
