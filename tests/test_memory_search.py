"""Product-key and TDQKR search (llmarch.layers.memory_search) against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmarch.layers import memory_search as ms

SHAPES = [((3,), 8, 1), ((2, 2), 16, 4), ((5,), 32, 8), ((1,), 12, 12)]  # (leading, P, k)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([0.1, 1.0, 30.0])
)
def test_product_key_search_is_brute_force_top_m(shape, seed, spread):
    lead, P, k = shape
    rng = np.random.default_rng(seed)
    s_row = jnp.asarray(rng.normal(size=(*lead, P)) * spread, jnp.float32)
    s_col = jnp.asarray(rng.normal(size=(*lead, P)) * spread, jnp.float32)
    scores, slots = ms.product_key_search(s_row, s_col, k)
    want_scores, want_slots = ms.brute_force_search(s_row, s_col, k)
    np.testing.assert_array_equal(scores, want_scores)  # the same float sums, so bitwise equal
    # The score a slot is reported with is its grid score.
    grid = np.asarray(s_row)[..., :, None] + np.asarray(s_col)[..., None, :]
    np.testing.assert_array_equal(
        np.take_along_axis(grid.reshape(*lead, P * P), np.asarray(slots), -1), scores
    )
    # The slots are the brute-force ones, as sets (order within equal scores may differ).
    full = np.sort(grid.reshape(-1, P * P), axis=-1)[:, ::-1]
    for row, (got, want) in enumerate(
        zip(np.asarray(slots).reshape(-1, k), np.asarray(want_slots).reshape(-1, k), strict=True)
    ):
        if k < P * P and full[row, k - 1] == full[row, k]:
            continue  # a tie at the boundary: either slot is a correct top-k
        assert set(got.tolist()) == set(want.tolist())


def _cores(rng, X, N, Z):
    return jnp.asarray(rng.uniform(size=(X, N, Z, Z)), jnp.float32)


def test_tdqkr_rank_one_is_product_key_scoring():
    """r = 1: the grid is c·s_row[i]·s_col[j]; with positive scores that is PKM's additive search
    on log-scores (the same slots; scores c·exp(PKM score))."""
    rng = np.random.default_rng(0)
    N, P, k = 3, 16, 5
    s_row = jnp.asarray(rng.uniform(0.1, 2.0, size=(4, N, P, 1)), jnp.float32)
    s_col = jnp.asarray(rng.uniform(0.1, 2.0, size=(4, N, P, 1)), jnp.float32)
    cores = _cores(rng, 1, N, 1) + 0.5
    ref = ms.initial_reference(cores)
    np.testing.assert_array_equal(ref, np.ones((N, 2, 1)))  # rank 1: u = v = +1
    u, v = ms.leading_singular_vectors(cores, ref)
    scores, core_scores, slots = ms.tucker_search(s_row, s_col, cores, u, v, k)
    pkm_scores, pkm_slots = ms.product_key_search(jnp.log(s_row[..., 0]), jnp.log(s_col[..., 0]), k)
    np.testing.assert_array_equal(slots, pkm_slots)
    np.testing.assert_allclose(scores, cores[0, :, 0, 0][:, None] * jnp.exp(pkm_scores), rtol=1e-5)
    np.testing.assert_allclose(core_scores[..., 0], scores, rtol=1e-6)


def test_tdqkr_is_exact_for_rank_one_cores():
    """When ΣC_c = σ·u vᵀ with u, v >= 0 and non-negative scores, the candidates of the leading
    singular vectors contain the brute-force top-m of the full P² grid."""
    rng = np.random.default_rng(1)
    N, P, Z, k = 2, 24, 3, 6
    a, b = rng.uniform(size=(N, Z)), rng.uniform(size=(N, Z))
    cores = jnp.asarray(np.stack([np.einsum("nz,ny->nzy", a, b) * w for w in (0.3, 0.7)]), jnp.float32)
    s_row = jnp.asarray(rng.uniform(size=(5, N, P, Z)), jnp.float32)
    s_col = jnp.asarray(rng.uniform(size=(5, N, P, Z)), jnp.float32)
    u, v = ms.leading_singular_vectors(cores, ms.initial_reference(cores))
    assert (u >= 0).all() and (v >= 0).all()
    scores, core_scores, slots = ms.tucker_search(s_row, s_col, cores, u, v, k)
    want_scores, want_slots = ms.brute_force_tucker(s_row, s_col, cores, k)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    np.testing.assert_array_equal(np.sort(slots, -1), np.sort(want_slots, -1))
    np.testing.assert_allclose(core_scores.sum(-1), scores, rtol=1e-5)  # MCS parts add up


def test_tdqkr_core_scores_are_each_cores_grid():
    rng = np.random.default_rng(2)
    X, N, P, Z, k = 3, 2, 10, 2, 4
    cores = _cores(rng, X, N, Z)
    s_row = jnp.asarray(rng.normal(size=(N, P, Z)), jnp.float32)
    s_col = jnp.asarray(rng.normal(size=(N, P, Z)), jnp.float32)
    u, v = ms.leading_singular_vectors(cores, ms.initial_reference(cores))
    _, core_scores, slots = ms.tucker_search(s_row, s_col, cores, u, v, k)
    i, j = np.asarray(slots) // P, np.asarray(slots) % P
    for n in range(N):
        for c in range(X):
            grid = np.asarray(s_row[n]) @ np.asarray(cores[c, n]) @ np.asarray(s_col[n]).T
            np.testing.assert_allclose(core_scores[n, :, c], grid[i[n], j[n]], rtol=1e-5, atol=1e-6)


def test_singular_vectors_sign_follows_the_reference_and_has_no_gradient():
    rng = np.random.default_rng(3)
    cores = _cores(rng, 2, 3, 4)
    ref = ms.initial_reference(cores)
    u, v = ms.leading_singular_vectors(cores, ref)
    np.testing.assert_allclose(jnp.stack([u, v], 1), ref, atol=1e-6)  # stable under its own reference
    flipped = ref.at[1].multiply(-1.0)  # head 1's previous vectors had the other sign
    u2, v2 = ms.leading_singular_vectors(cores, flipped)
    np.testing.assert_allclose(u2, u * jnp.array([1.0, -1.0, 1.0])[:, None], atol=1e-6)
    np.testing.assert_allclose(v2, v * jnp.array([1.0, -1.0, 1.0])[:, None], atol=1e-6)
    total = np.asarray(cores).sum(0)
    for n in range(3):  # they are the leading singular pair: u_nᵀ (ΣC) v_n = σ_1
        np.testing.assert_allclose(u[n] @ total[n] @ v[n], np.linalg.svd(total[n])[1][0], rtol=1e-5)
    grad = jax.grad(lambda c: jnp.sum(ms.leading_singular_vectors(c, ref)[0]))(cores)
    np.testing.assert_array_equal(grad, 0.0)


def test_tucker_aux_loss_formula():
    rng = np.random.default_rng(4)
    cores = _cores(rng, 2, 3, 4)
    sigma = np.linalg.svd(np.asarray(cores).sum(0), compute_uv=False)
    want = 0.001 * np.mean(np.maximum(sigma[:, 1:] - 0.15, 0.0) ** 2)
    got = ms.tucker_aux_loss(cores, 0.001, 0.15)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got > 0
    assert float(jnp.abs(jax.grad(ms.tucker_aux_loss)(cores, 0.001, 0.15)).sum()) > 0
    assert float(ms.tucker_aux_loss(cores[..., :1, :1], 0.001, 0.15)) == 0.0  # rank 1: no σ_2
    assert float(ms.tucker_aux_loss(cores, 0.001, 100.0)) == 0.0  # all below τ


@pytest.mark.parametrize("k", [1, 7])
def test_search_under_jit_and_vmap(k):
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.normal(size=(3, 4, 9)), jnp.float32)
    got = jax.jit(jax.vmap(lambda a, b: ms.product_key_search(a, b, k)))(s, s[::-1])
    want = ms.brute_force_search(s, s[::-1], k)
    np.testing.assert_array_equal(got[0], want[0])
