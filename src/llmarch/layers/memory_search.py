"""Which memory slots a query reads: product-key search (PKM) and Tucker-decomposed search (TDQKR).

A memory of ``P²`` slots is a ``P × P`` grid: slot ``i·P + j`` sits on row ``i`` and column ``j``.
A query scores the P rows and the P columns (``s_row, s_col``) and never the ``P²`` slots:

- PKM (Lample et al. 2019, arXiv 1907.05242) scores slot ``(i, j)`` by ``s_row[i] + s_col[j]``. The
  ``m`` best slots lie among the ``m × m`` pairs of the ``m`` best rows and ``m`` best columns (a
  slot on a row outside the best m is beaten by the m slots of those rows in the same column), so
  ``product_key_search`` is exact at ``O(P + m²)`` per query instead of ``O(P²)``.
- TDQKR (UltraMem, Huang et al. 2024, arXiv 2411.12364, section 3.2) scores with rank-r row and
  column scores ``S_row, S_col [P, r]`` and ``h`` Tucker cores: ``S_grid = Σ_c S_row C_c S_colᵀ``.
  The candidates are the m best rows by ``S_row u`` and columns by ``S_col v``, where ``u, v`` are
  the leading singular vectors of ``ΣC_c`` (exact when ``ΣC_c`` is rank 1 and the projected scores
  are non-negative); an auxiliary loss keeps ``ΣC_c`` close to rank 1.

Shapes: leading axes ``...`` (tokens), ``N`` memory heads, ``P`` keys per side, ``Z``/``Y`` rank,
``X`` cores, ``I``/``J`` row/column candidates. Scores and top-k are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmarch import ops


def product_key_search(
    s_row: jax.Array, s_col: jax.Array, k: int, *, impl: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` best slots of the additive grid ``s_row[i] + s_col[j]``, exactly.

    Args:
      s_row, s_col: ``[..., P]`` row and column scores.
      k: slots to return, ``k <= P``.
      impl: ``llmarch.ops.top_k``'s request for the selections (None: auto).
    Returns:
      ``(scores [..., k], slots [..., k])``, best first; ``slot = i·P + j``.
    """
    P = s_row.shape[-1]
    top_row, i_row = ops.top_k(s_row.astype(jnp.float32), k, impl=impl)  # [..., I]
    top_col, i_col = ops.top_k(s_col.astype(jnp.float32), k, impl=impl)  # [..., J]
    grid = top_row[..., :, None] + top_col[..., None, :]  # [..., I, J]
    scores, flat = ops.top_k(grid.reshape(*grid.shape[:-2], k * k), k, impl=impl)  # [..., k]
    return scores, _slots(i_row, i_col, flat, k, P)


def brute_force_search(s_row: jax.Array, s_col: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The specification of ``product_key_search``: top-k over all ``P²`` grid scores."""
    P = s_row.shape[-1]
    grid = s_row.astype(jnp.float32)[..., :, None] + s_col.astype(jnp.float32)[..., None, :]
    return jax.lax.top_k(grid.reshape(*grid.shape[:-2], P * P), k)


def tucker_search(
    s_row: jax.Array,
    s_col: jax.Array,
    cores: jax.Array,
    u: jax.Array,
    v: jax.Array,
    k: int,
    *,
    impl: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TDQKR: the ``k`` best of ``Σ_c S_row C_c S_colᵀ`` among the candidates that ``u, v`` pick.

    Args:
      s_row, s_col: ``[..., N, P, Z]`` rank-r row and column scores of each head.
      cores: ``[X, N, Z, Y]`` the Tucker cores ``C_c`` of each head.
      u, v: ``[N, Z]`` leading left/right singular vectors of ``Σ_c C_c`` (no gradient).
      k: slots per head (m), ``k <= P``.
      impl: ``llmarch.ops.top_k``'s request for the selections (None: auto).
    Returns:
      ``(scores [..., N, k], core_scores [..., N, k, X], slots [..., N, k])``: the summed grid
      score of each chosen slot (best first), its per-core parts (multi-core scoring), its slot.
    """
    P = s_row.shape[-2]
    s_row, s_col = s_row.astype(jnp.float32), s_col.astype(jnp.float32)
    u, v = jax.lax.stop_gradient(u).astype(jnp.float32), jax.lax.stop_gradient(v).astype(jnp.float32)
    _, i_row = ops.top_k(jnp.einsum("...NPZ,NZ->...NP", s_row, u), k, impl=impl)  # [..., N, I]
    _, i_col = ops.top_k(jnp.einsum("...NPZ,NZ->...NP", s_col, v), k, impl=impl)  # [..., N, J]
    rows = jnp.take_along_axis(s_row, i_row[..., None], axis=-2)  # [..., N, I, Z]
    cols = jnp.take_along_axis(s_col, i_col[..., None], axis=-2)  # [..., N, J, Y]
    cores = cores.astype(jnp.float32)
    # The candidates are ranked by the summed grid, Σ_c C_c taken first (the specification's
    # form, and X times less work); the per-core scores are then needed for the k winners only.
    grid = jnp.einsum("...NIZ,NZY,...NJY->...NIJ", rows, cores.sum(0), cols)
    scores, flat = ops.top_k(grid.reshape(*grid.shape[:-2], k * k), k, impl=impl)  # [..., N, k]
    row_won = jnp.take_along_axis(rows, (flat // k)[..., None], axis=-2)  # [..., N, k, Z]
    col_won = jnp.take_along_axis(cols, (flat % k)[..., None], axis=-2)  # [..., N, k, Y]
    core_scores = jnp.einsum("...NIZ,XNZY,...NIY->...NIX", row_won, cores, col_won)  # [..., N, k, X]
    return scores, core_scores, _slots(i_row, i_col, flat, k, P)


def brute_force_tucker(
    s_row: jax.Array, s_col: jax.Array, cores: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Top-k of the full TDQKR grid ``Σ_c S_row C_c S_colᵀ`` over all ``P²`` slots: ``[..., N, k]``."""
    P = s_row.shape[-2]
    # every row and column is a candidate: I = J = P (Q would be the query LoRA rank)
    grid = jnp.einsum(
        "...NIZ,NZY,...NJY->...NIJ",
        s_row.astype(jnp.float32),
        cores.astype(jnp.float32).sum(0),
        s_col.astype(jnp.float32),
    )
    return jax.lax.top_k(grid.reshape(*grid.shape[:-2], P * P), k)


def _slots(i_row: jax.Array, i_col: jax.Array, flat: jax.Array, k: int, P: int) -> jax.Array:
    """Grid slot ``i·P + j`` of each flat index into the ``[I, J]`` candidate pairs."""
    row = jnp.take_along_axis(i_row, flat // k, axis=-1)
    col = jnp.take_along_axis(i_col, flat % k, axis=-1)
    return (row * P + col).astype(jnp.int32)


# -- the Tucker cores' leading singular vectors --------------------------------------------------


def leading_singular_vectors(cores: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``u, v [N, Z]``: the leading singular vectors of ``Σ_c C_c``, sign-aligned, without gradient.

    Singular vectors are defined up to a joint sign (``u σ vᵀ = (−u) σ (−v)ᵀ``), but the candidates
    that ``S_row u`` picks are not: ``reference [N, 2, Z]`` (the previous ``(u, v)``) fixes it, as the
    official implementation does: of ``±(u, v)`` the one nearer the reference in L1 distance wins
    (``+`` on a tie).
    """
    total = jax.lax.stop_gradient(cores.astype(jnp.float32).sum(0))  # [N, Z, Y]
    left, _, right_t = jnp.linalg.svd(total)
    u, v = left[..., :, 0], right_t[..., 0, :]  # [N, Z], [N, Y]
    ref_u, ref_v = reference[:, 0].astype(jnp.float32), reference[:, 1].astype(jnp.float32)
    plus = jnp.abs(u - ref_u).sum(-1) + jnp.abs(v - ref_v).sum(-1)
    minus = jnp.abs(u + ref_u).sum(-1) + jnp.abs(v + ref_v).sum(-1)
    sign = jnp.where(minus < plus, -1.0, 1.0)[:, None]  # [N, 1]
    return u * sign, v * sign


def initial_reference(cores: jax.Array) -> jax.Array:
    """``[N, 2, Z]`` the first ``(u, v)``: signed so that ``Σu + Σv >= 0`` (cores start positive, so
    their leading singular vectors are the non-negative Perron vectors)."""
    u, v = leading_singular_vectors(cores, jnp.zeros((cores.shape[1], 2, cores.shape[2])))
    sign = jnp.where(u.sum(-1) + v.sum(-1) < 0, -1.0, 1.0)[:, None]
    return jnp.stack([u * sign, v * sign], axis=1)


def tucker_aux_loss(cores: jax.Array, alpha: float, tau: float) -> jax.Array:
    """``α·mean(relu(σ_{2..r} − τ)²)`` over heads: the non-leading singular values of ``Σ_c C_c``
    pushed below ``τ`` so that the rank-1 candidate selection stays faithful. 0 for rank 1."""
    if cores.shape[-1] < 2:
        return jnp.zeros((), jnp.float32)
    sigma = jnp.linalg.svd(cores.astype(jnp.float32).sum(0), compute_uv=False)  # [N, r], descending
    return alpha * jnp.mean(jnp.square(jax.nn.relu(sigma[..., 1:] - tau)))
