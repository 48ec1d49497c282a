"""The paged cache and its block manager: reference counts, copy-on-write, the trash page, and
the model over paged caches (llmarch.layers.paged, through llmarch.ops) equal to its full forward
and to attention over a contiguous cache. The paged ops' XLA path itself is tested in
test_kernels_paged.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmarch import ops
from llmarch.inference import paged_cache
from llmarch.inference.block_manager import BlockManager, OutOfPages, pages_for
from llmarch.layers.paged import TRASH_PAGE, AttentionGroup, PagedKVCache, PagedLatentCache, PageMeta

# Block manager ------------------------------------------------------------------------------


def test_allocate_on_demand_and_free_on_release():
    bm = BlockManager(num_pages=6, page_size=4)
    assert bm.capacity == bm.num_free == 5
    table: list[int] = []
    assert bm.prepare_write(table, 0, 5) == [] and len(table) == 2  # 5 tokens: 2 pages
    assert 0 not in table  # the trash page is never handed out
    bm.prepare_write(table, 5, 8)  # still within page 2
    assert len(table) == 2 and bm.num_free == 3
    bm.prepare_write(table, 8, 9)
    assert len(table) == 3
    bm.check([table])
    bm.release(table)
    assert table == [] and bm.num_free == 5
    bm.check([])


def test_out_of_pages_changes_nothing():
    bm = BlockManager(num_pages=4, page_size=2)
    a: list[int] = []
    bm.prepare_write(a, 0, 4)
    b: list[int] = []
    with pytest.raises(OutOfPages):
        bm.prepare_write(b, 0, 6)  # needs 3, one is free
    assert b == [] and bm.num_free == 1
    bm.check([a, b])


def test_shared_prefix_copy_on_write():
    bm = BlockManager(num_pages=10, page_size=4)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 6)  # prompt prefix: one full page and a partial one
    children = [bm.share(parent) for _ in range(3)]
    bm.release(parent)
    assert all(c == children[0] for c in children) and bm.refcount[children[0][1]] == 3
    copies = [bm.prepare_write(c, 6, 7) for c in children]  # each writes into the shared page
    # The first two copy it; the last is then its only holder and writes in place.
    assert [len(c) for c in copies] == [1, 1, 0]
    assert copies[0][0][0] == copies[1][0][0] == children[2][1]
    assert len({c[1] for c in children}) == 3  # private last pages
    assert len({c[0] for c in children}) == 1  # the full first page stays shared
    bm.check(children)
    for c in children:
        bm.release(c)
    assert bm.num_free == bm.capacity


def test_block_manager_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_pages=1 is invalid"):
        BlockManager(1, 16)
    with pytest.raises(ValueError, match="page_size=0"):
        BlockManager(8, 0)
    assert pages_for(17, 16) == 2 and pages_for(16, 16) == 1


# The model over paged caches ---------------------------------------------------------------


def _flat_step(seqs, page_size, width):
    """PageMeta for a step that feeds each (tokens, start, table) chunk as one prefill row."""
    N = sum(len(t) for t, _, _ in seqs)
    slots, index, pos = np.zeros(N, np.int32), np.zeros((len(seqs), 8), np.int32), np.full((len(seqs), 8), -1)
    tables, lengths = np.zeros((len(seqs), width), np.int32), np.zeros(len(seqs), np.int32)
    i = 0
    for r, (tokens, start, table) in enumerate(seqs):
        p = np.arange(start, start + len(tokens))
        slots[i : i + len(p)] = np.asarray(table)[p // page_size] * page_size + p % page_size
        index[r, : len(p)], pos[r, : len(p)] = np.arange(i, i + len(p)), p
        tables[r, : len(table)], lengths[r] = table, start + len(p)
        i += len(p)
    flat_tokens = np.concatenate([t for t, _, _ in seqs]).astype(np.int32)
    flat_pos = np.concatenate([np.arange(s, s + len(t)) for t, s, _ in seqs]).astype(np.int32)
    empty = AttentionGroup(*(jnp.zeros(s, jnp.int32) for s in ((0, 1), (0, 1), (0, width), (0,))))
    rows = AttentionGroup(
        jnp.asarray(index), jnp.asarray(pos, jnp.int32), jnp.asarray(tables), jnp.asarray(lengths)
    )
    meta = PageMeta(jnp.asarray(slots), (empty, rows))
    return jnp.asarray(flat_tokens)[None], jnp.asarray(flat_pos)[None], meta


@pytest.mark.parametrize("preset", ["tiny-gqa-window", "tiny-mla"])
def test_model_over_paged_cache_equals_full_forward(preset):
    """Two sequences in scattered pages, prefilled in two chunks each, side by side in one flat
    row per step: every logit equals the full forward's. The padding slots of the pools (the
    trash page) take nothing that a query can see."""
    from test_engine import _model  # the models test_engine.py builds, built once per session

    model = _model(preset)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 10), rng.integers(0, cfg.vocab_size, 6)
    ps, width = 4, 3
    table_a, table_b = [5, 2, 7], [1, 6]
    kinds = paged_cache.cache_kinds(model)
    pools = paged_cache.init_pools(model, num_pages=8, page_size=ps)

    @jax.jit
    def run(pools, tokens, positions, meta):
        out = model(tokens, positions=positions, cache=paged_cache.attach(kinds, pools, meta))
        return [c.pools for c in out.cache], out.logits

    outs = {"a": [], "b": []}
    for (sa, ea), (sb, eb) in (((0, 5), (0, 3)), ((5, 10), (3, 6))):  # one shape: one compile
        tokens, positions, meta = _flat_step([(a[sa:ea], sa, table_a), (b[sb:eb], sb, table_b)], ps, width)
        pools, logits = run(pools, tokens, positions, meta)
        outs["a"].append(logits[0, : ea - sa])
        outs["b"].append(logits[0, ea - sa :])
    both = np.zeros((2, 10), np.int32)
    both[0], both[1, :6] = a, b  # causality: b's padding does not change its logits
    full = jax.jit(model)(jnp.asarray(both))
    np.testing.assert_allclose(jnp.concatenate(outs["a"]), full[0], atol=2e-4)
    np.testing.assert_allclose(jnp.concatenate(outs["b"]), full[1, :6], atol=2e-4)
    trash = [np.asarray(x[:, TRASH_PAGE]) for pool in pools for x in pool]
    assert not any(np.any(t) for t in trash)  # no padding here: nothing was written to the trash page


def test_paged_cache_through_the_pallas_kernels():
    """cfg.impl="pallas" routes the paged caches through llmarch.ops' kernels (interpreted on CPU)."""
    rng = np.random.default_rng(2)
    P, ps, K, H = 6, 4, 2, 8
    pools = (jnp.asarray(rng.normal(size=(2, P, ps, K, H)), jnp.float32),) * 2
    lengths = np.array([6])
    tables = jnp.asarray([[3, 1]], jnp.int32)
    positions = jnp.asarray([[4, 5]], jnp.int32)
    empty = AttentionGroup(*(jnp.zeros(s, jnp.int32) for s in ((0, 1), (0, 1), (0, 2), (0,))))
    meta = PageMeta(
        jnp.zeros(2, jnp.int32),
        (empty, AttentionGroup(jnp.asarray([[0, 1]], jnp.int32), positions, tables, jnp.asarray(lengths))),
    )
    cache = PagedKVCache(*pools, meta=meta, layer=jnp.int32(1))
    q = jnp.asarray(rng.normal(size=(1, 2, 2 * K, H)), jnp.float32)
    xla = cache.attend(q, positions, impl="xla")
    pallas = cache.attend(q, positions, impl="pallas")
    np.testing.assert_allclose(pallas, xla, atol=1e-5)
    contiguous = ops.attention(
        q,
        pools[0][1][np.array([3, 1])].reshape(1, 8, K, H),
        pools[1][1][np.array([3, 1])].reshape(1, 8, K, H),
        q_positions=positions,
        kv_positions=jnp.arange(8)[None],
        causal=True,
    )
    np.testing.assert_allclose(xla, contiguous, atol=1e-5)


def test_paged_caches_are_pooled_and_the_latent_one_is_not_readable():
    """``BlockRun`` carries a ``Pooled`` cache whole through its scan; MLA attends a latent cache
    without ``read`` only in the latent space."""
    from llmarch.layers.cache import Pooled, ReadableLatentCache

    pool = jnp.zeros((1, 2, 4, 3))
    meta = PageMeta(jnp.zeros(1, jnp.int32), ())
    kv = PagedKVCache(pool, pool, meta=meta, layer=jnp.int32(0))
    latent = PagedLatentCache(pool, pool, meta=meta, layer=jnp.int32(0))
    assert isinstance(kv, Pooled) and isinstance(latent, Pooled)
    assert not isinstance(latent, ReadableLatentCache)
