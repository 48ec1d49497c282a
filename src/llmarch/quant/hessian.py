"""The layer-Hessian steps GPTQ and SparseGPT share (both from the optimal brain surgeon).

``H = Σ x xᵀ`` over calibration inputs of a linear ``W [K, N]``. Inputs never seen (``H_kk = 0``)
carry no information: their weights are zeroed and their diagonal set to 1, as the reference
implementations do. The row-by-row updates then read the upper Cholesky factor of the dampened
inverse, ``(H + λ·mean(diag H)·I)⁻¹ = Uᵀ U``.
"""

from __future__ import annotations

import numpy as np


def zero_dead_inputs(w: np.ndarray, hessian: np.ndarray) -> None:
    """In place: rows of ``w [K, N]`` whose input was never seen zeroed, ``hessian``'s diagonal 1 there."""
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[dead] = 0.0


def inverse_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor U of the dampened inverse (float32); dampens ``hessian`` in place."""
    hessian[np.diag_indices(len(hessian))] += damp * np.mean(np.diag(hessian))
    return np.linalg.cholesky(np.linalg.inv(hessian)).T.astype(np.float32)
