"""Truncated SVD of one weight matrix ``W [K, N]`` (host numpy, float64), plain or activation-aware.

Plain: ``W = U Σ Vᵀ``, kept to rank r, ``A = U_r √Σ_r [K, r]`` and ``B = √Σ_r V_rᵀ [r, N]`` (the
singular values split evenly, so A and B have the same scale for fine-tuning). By Eckart–Young
``‖W − A·B‖²_F = Σ_{i>r} σ_i²``.

Activation-aware: the error that matters is the layer's output ``‖X W − X A·B‖_F`` on calibration
inputs ``X [n, K]``, not the weights'. With a transform S whose ``Sᵀ`` is undone afterwards, the SVD
is taken of ``Sᵀ W`` and ``A = S⁻ᵀ U_r √Σ_r``:

- SVD-LLM (Wang et al. 2024, "truncation-aware data whitening"): S the Cholesky factor of
  ``XᵀX = S Sᵀ``. Then ``X S⁻ᵀ`` has orthonormal columns, so the output error is exactly
  ``Σ_{i>r} σ_i(Sᵀ W)²``: truncating the smallest singular values of the whitened matrix is the
  optimal rank-r choice for these inputs. ``XᵀX`` is dampened (``+ λ·mean(diag)·I``) because
  calibration rarely spans every input direction (fewer tokens than K, dead channels): undamped,
  ``S⁻ᵀ`` would blow up along the directions never seen.
- ASVD (Yuan et al. 2023): S diagonal, ``S_kk = mean|x_k|^α``: channels with large activations
  keep more of their weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """``Sᵀ W = U diag(s) Vt`` for a ``[K, N]`` weight (S = I when plain); ``factors`` truncates it.

    Attributes:
      u, s, vt: the SVD of the (transformed) matrix, float64, s descending.
      whitening: S ``[K, K]``, or None.
      name: the weight's name in errors.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    whitening: np.ndarray | None
    name: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.vt.shape[1]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A [K, r], B [r, N])`` float32 of the rank-``rank`` truncation."""
        K, N = self.shape
        check_rank(rank, K, N, self.name)
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root  # [K, r]
        b = root[:, None] * self.vt[:rank]  # [r, N]
        if self.whitening is not None:
            a = np.linalg.solve(self.whitening.T, a)  # S⁻ᵀ U_r √Σ_r
        return a.astype(np.float32), b.astype(np.float32)


def check_rank(rank: int, K: int, N: int, name: str = "weight") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 1 <= rank <= min(K, N):
        raise ValueError(
            f"rank={rank!r} is invalid for {name} [K={K}, N={N}]: must be in [1, min(K, N)={min(K, N)}]"
        )


def decompose(
    matrix: np.ndarray, whitening: np.ndarray | None = None, *, name: str = "weight"
) -> Decomposition:
    """The SVD of ``matrix [K, N]`` (of ``Sᵀ·matrix`` with ``whitening`` S ``[K, K]``, invertible)."""
    w = np.asarray(matrix, np.float64)
    if w.ndim != 2:
        raise ValueError(f"{name} has shape {w.shape}: factorize takes one matrix [K, N]")
    if whitening is not None:
        whitening = np.asarray(whitening, np.float64)
        if whitening.shape != (w.shape[0],) * 2:
            raise ValueError(f"whitening {whitening.shape} does not match {name} {w.shape}: need [K, K]")
        w = whitening.T @ w
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return Decomposition(u, s, vt, whitening, name)


def factorize(
    matrix: np.ndarray, rank: int, whitening: np.ndarray | None = None, *, name: str = "weight"
) -> tuple[np.ndarray, np.ndarray]:
    """``(A [K, r], B [r, N])``, float32, with ``A·B`` the best rank-``rank`` approximation of
    ``matrix [K, N]`` (in the output error of the inputs ``whitening`` stands for, when given).

    Raises:
      ValueError: ``rank`` outside ``[1, min(K, N)]`` (naming ``name``), or shapes that disagree.
    """
    if np.ndim(matrix) == 2:  # before the SVD: a bad rank fails at once (decompose checks the rest)
        check_rank(rank, *np.shape(matrix), name)
    return decompose(matrix, whitening, name=name).factors(rank)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """The smallest r whose ``Σ_{i≤r} σ_i²`` is at least ``energy`` of ``Σ σ_i²`` (at least 1)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} is invalid: must be in (0, 1]")
    cumulative = np.cumsum(np.square(np.asarray(s, np.float64)))
    if cumulative[-1] <= 0:  # an all-zero weight: one (zero) column stands for it
        return 1
    # energy = 1 keeps every nonzero σ: compared against the cumsum's own total, never a sum
    # computed in another order that could end a rounding error above it
    return int(np.searchsorted(cumulative, energy * cumulative[-1], side="left")) + 1


def rank_for_params(K: int, N: int, param_ratio: float, *, name: str = "weight") -> int:
    """The largest r with ``r·(K+N) ≤ param_ratio·K·N``: A and B within the budget.

    Raises:
      ValueError: when even rank 1 exceeds the budget (naming ``name``).
    """
    if not 0 < param_ratio <= 1:
        raise ValueError(f"param_ratio={param_ratio!r} is invalid: must be in (0, 1]")
    rank = int(np.floor(param_ratio * K * N / (K + N) + 1e-9))  # 1e-9: ratios that land on an integer
    if rank < 1:
        raise ValueError(
            f"param_ratio={param_ratio} leaves {name} [K={K}, N={N}] no rank: rank 1 needs "
            f"param_ratio >= (K+N)/(K·N) = {(K + N) / (K * N):.4g}"
        )
    return min(rank, K, N)


def whitening_from_hessian(hessian: np.ndarray, damp: float) -> np.ndarray:
    """SVD-LLM's S: the lower Cholesky factor of ``XᵀX + λ·mean(diag)·I`` (``λ = damp``), ``[K, K]``.

    Inputs never seen (a zero diagonal) get a unit diagonal, as GPTQ does, so S stays invertible;
    if rounding still leaves the matrix indefinite, λ grows tenfold until Cholesky succeeds.
    """
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    lam = damp
    for _ in range(8):
        try:
            return np.linalg.cholesky(h + lam * mean * np.eye(len(h)))
        except np.linalg.LinAlgError:
            lam = max(lam * 10, 1e-8)
    raise ValueError(f"the calibration second moment is not positive definite even with damp={lam}")


def asvd_scaling(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """ASVD's S: ``diag(mean|x_k|^α)`` ``[K, K]``; unseen channels (zero mean) get 1."""
    m = np.asarray(mean_abs, np.float64)
    scale = np.where(m > 0, np.power(np.maximum(m, 1e-30), alpha), 1.0)
    return np.diag(scale)
