"""PKM / UltraMem layers (llmarch.layers.memory): each component's promise, wiring, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import accounting, presets
from llmarch.config import AttentionConfig, BlockConfig, MemoryConfig, ModelConfig
from llmarch.layers import memory as memory_lib
from llmarch.layers.memory import MemoryLayer, MemoryState
from llmarch.layers.memory_search import leading_singular_vectors
from llmarch.model import aux_loss

ATT = AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=8)


def _cfg(mem: MemoryConfig, **kw) -> ModelConfig:
    base = dict(
        vocab_size=64,
        d_model=16,
        num_layers=2,
        ffn_dim=32,
        max_seq_len=32,
        attention=ATT,
        blocks=(BlockConfig(), BlockConfig(ffn="pkm")),
        memory=mem,
    )
    return ModelConfig(**{**base, **kw})


# -- config errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MemoryConfig(num_keys=4, topk=5), r"MemoryConfig.topk=5 is invalid: must be <= num_keys=4"),
        (lambda: MemoryConfig(num_keys=4, topk=2, score="sparsemax"), r"score='sparsemax'.*one of"),
        (lambda: MemoryConfig(num_keys=4, topk=2, num_cores=2), r"num_cores=2.*tucker_rank >= 1"),
        (
            lambda: MemoryConfig(num_keys=4, topk=2, tucker_rank=2, num_cores=2),
            r"score='softmax' is invalid: must be 'raw'",
        ),
        (
            lambda: MemoryConfig(num_keys=5, topk=2, virtual_blocks=4, output_proj=True),
            r"virtual_blocks=4 is invalid: must divide the num_keys²=25",
        ),
        (lambda: MemoryConfig(num_keys=4, topk=2, virtual_blocks=4), r"output_proj=False.*IVE"),
        (lambda: MemoryConfig(num_keys=4, topk=2, tucker_rank=-1), r"tucker_rank=-1"),
        (lambda: MemoryConfig(num_keys=0, topk=2), r"num_keys=0.*positive"),
        (
            lambda: _cfg(MemoryConfig(num_keys=4, topk=2, tucker_rank=2, num_cores=3, score="raw")),
            r"MemoryConfig.value_dim=16 is invalid: must be divisible by num_cores=3",
        ),
        (
            lambda: _cfg(MemoryConfig(num_keys=4, topk=2, value_dim=8)),
            r"output_proj=False.*differs from d_model",
        ),
        (lambda: _cfg(None), r"ModelConfig.memory=None is invalid: must be a MemoryConfig"),
        (lambda: _cfg(MemoryConfig(num_keys=4, topk=2), blocks=None), r"memory=.*must be None"),
        (
            lambda: _cfg(
                MemoryConfig(num_keys=4, topk=2), blocks=None, skip_layers=((1, 2),), skip_kind="ultramem"
            ),
            r"skip_layers=\(1, 2\) is invalid: needs 0 <= i <= j < num_layers=2",
        ),
        (
            lambda: _cfg(
                MemoryConfig(num_keys=4, topk=2),
                blocks=None,
                num_layers=4,
                skip_layers=((0, 2), (1, 3)),
                skip_kind="ultramem",
            ),
            r"overlap",
        ),
    ],
)
def test_bad_configs_raise_naming_field_value_and_allowed(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_memory_config_json_round_trip():
    cfg = presets.get("tiny-ultramem")
    assert ModelConfig.from_json(cfg.to_json()) == cfg


# -- the full UltraMem layer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ultramem():
    cfg = presets.get("tiny-ultramem")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    return cfg, model, tokens


def test_skip_layer_wiring_adds_after_block_j(ultramem):
    """Span (0, 1): the memory reads the stream entering block 0 (the embeddings) and its output is
    added to the stream leaving block 1."""
    cfg, model, tokens = ultramem
    out = model(tokens, return_aux=True)
    logits, aux = out.logits, out.aux
    x = model.embed.encode(tokens, jnp.float32)
    mem_out, mem_aux = model.skips[0](x)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    h, _ = model.runs[0](x, positions, None)
    want = model.lm_head("BTD,DV->BTV", model.final_norm(h + mem_out))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert float(aux_loss(aux)) == pytest.approx(float(mem_aux["loss"]))
    np.testing.assert_array_equal(aux["skips/0"]["loss"], mem_aux["loss"])  # keyed by module path
    assert float(mem_aux["loss"]) > 0  # the TDQKR singular-value loss reaches the objective


def test_skip_span_inside_the_stack_splits_the_runs():
    mem = MemoryConfig(num_keys=8, topk=2, num_heads=2, key_dim=8)  # a plain PKM as the skip module
    cfg = _cfg(mem, blocks=None, num_layers=4, skip_layers=((1, 2),), skip_kind="pkm")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    assert [count for *_, count in llmarch.model.run_layout(cfg)] == [1, 2, 1]
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(1, 10)
    g, state = nnx.split(model)

    @jax.jit
    def both(state):
        model = nnx.merge(g, state)
        pos = jnp.arange(10)[None]
        x = model.embed.encode(tokens, jnp.float32)
        x, _ = model.runs[0](x, pos, None)
        mem_out, _ = model.skips[0](x)  # reads what enters block 1
        x, _ = model.runs[1](x, pos, None)
        x, _ = model.runs[2](x + mem_out, pos, None)  # added after block 2
        return model(tokens), model.lm_head("BTD,DV->BTV", model.final_norm(x))

    got, want = both(state)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _layer_norm(x, norm):
    x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + norm.eps)
    return x * np.asarray(norm.scale[...], np.float64) + np.asarray(norm.bias[...], np.float64)


def _leading_pair(cores, ref):
    """``u, v [N, Z]`` of ``Σ_c C_c`` by numpy's SVD; of ``±(u, v)`` the one nearer ``ref`` in L1."""
    pairs = []
    for total, (ref_u, ref_v) in zip(cores.sum(0), ref, strict=True):
        left, _, right_t = np.linalg.svd(total)
        u, v = left[:, 0], right_t[0]
        plus = np.abs(u - ref_u).sum() + np.abs(v - ref_v).sum()
        minus = np.abs(u + ref_u).sum() + np.abs(v + ref_v).sum()
        pairs.append((-u, -v) if minus < plus else (u, v))
    return np.array([u for u, _ in pairs]), np.array([v for _, v in pairs])


def _brute_force_memory(layer: MemoryLayer, x):
    """``(out [B,T,D], slots [B,T,N,m])`` from the layer's parameters alone, in float64 numpy, by
    brute force: every one of the P² slots is scored explicitly (PKM: ``s_row[i] + s_col[j]``;
    TDQKR: ``Σ_c S_row C_c S_colᵀ`` per core), each head's m best by a full sort, then softmax (PKM)
    or the raw scores, and the weighted sum of the value rows the slots name (IVE: permuted and
    pooled per virtual block; MCS: core c's score weights chunk c), gate, output projection.
    TDQKR is approximate by design: it ranks only the slots on the m best rows by ``S_row u`` and
    the m best columns by ``S_col v`` (u, v the leading singular pair of ``ΣC_c``, the sign nearer
    ``tucker_ref``), so the full sort runs over the P² slots with the others masked out."""
    m, f64 = layer.mem, (lambda v: np.asarray(v[...], np.float64))
    P, k, W = m.num_keys, m.topk, m.virtual_blocks
    h = np.asarray(x, np.float64)
    if layer.norm is not None:  # a skip-layer memory normalizes the stream itself (RMSNorm)
        h = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + layer.norm.eps) * f64(layer.norm.scale)
    q_row = _layer_norm(np.einsum("btd,dnh->btnh", h, f64(layer.w_q_row_dnh.w)), layer.query_norm)
    q_col = _layer_norm(np.einsum("btd,dnh->btnh", h, f64(layer.w_q_col_dnh.w)), layer.query_norm)
    k_row, k_col = f64(layer.keys_row_npzh), f64(layer.keys_col_npzh)  # [N,P,Z,H]
    if layer.key_norm is not None:
        k_row, k_col = _layer_norm(k_row, layer.key_norm), _layer_norm(k_col, layer.key_norm)
    s_row = np.einsum("btnh,npzh->btnpz", q_row, k_row)  # [B,T,N,P,Z]
    s_col = np.einsum("btnh,npzh->btnpz", q_col, k_col)
    if m.tucker_rank == 0:
        grid = (s_row[..., :, None, 0] + s_col[..., None, :, 0])[..., None]  # [B,T,N,P,P,1]
        allowed = np.ones(grid.shape[:-1], bool)
    else:
        cores = f64(layer.cores_xnzy)  # [X,N,Z,Y]
        grid = np.einsum("btnpz,xnzy,btnqy->btnpqx", s_row, cores, s_col)  # [B,T,N,P,P,X]
        u, v = _leading_pair(cores, f64(layer.tucker_ref))
        best_rows = np.argsort(-np.einsum("btnpz,nz->btnp", s_row, u), -1)[..., :k]
        best_cols = np.argsort(-np.einsum("btnpz,nz->btnp", s_col, v), -1)[..., :k]
        on_row = np.zeros(s_row.shape[:-1], bool)
        on_col = np.zeros(s_col.shape[:-1], bool)
        np.put_along_axis(on_row, best_rows, True, -1)
        np.put_along_axis(on_col, best_cols, True, -1)
        allowed = on_row[..., :, None] & on_col[..., None, :]
    B, T, N, X = *grid.shape[:3], grid.shape[-1]
    grid = grid.reshape(B, T, N, P * P, X)
    total = np.where(allowed.reshape(B, T, N, P * P), grid.sum(-1), -np.inf)
    slots = np.argsort(-total, axis=-1, kind="stable")[..., :k]  # [B,T,N,m]: a full sort of P² slots
    scores = np.take_along_axis(grid, slots[..., None], axis=-2)  # [B,T,N,m,X]
    if m.score == "softmax":
        e = np.exp(scores.sum(-1) - scores.sum(-1).max(-1, keepdims=True))
        weights = (e / e.sum(-1, keepdims=True))[..., None]  # [B,T,N,m,1]
    else:
        weights = scores
    virtual = np.asarray(layer.ive_permutation[...])[slots] if W > 1 else slots
    rows, blocks = virtual % m.physical_rows, virtual // m.physical_rows
    values = f64(layer.values_mu)  # [M,U]
    U = values.shape[1]
    chunks = values[rows].reshape(*rows.shape, X, U // X)  # [B,T,N,m,X,U/X]
    picked = (weights[..., None] * chunks).reshape(*rows.shape, U)  # [B,T,N,m,U]
    pooled = np.stack([np.where((blocks == w)[..., None], picked, 0.0).sum((2, 3)) for w in range(W)], 2)
    if layer.w_gate_dwu is not None:
        g = np.einsum("btd,dwu->btwu", h, f64(layer.w_gate_dwu.w))
        pooled = pooled * g / (1 + np.exp(-g))
    if layer.w_out_wud is None:
        return pooled[:, :, 0], slots
    return np.einsum("btwu,wud->btd", pooled, f64(layer.w_out_wud.w)), slots


_VARIANTS = {  # (MemoryConfig, pre_norm) on d_model=16; "tiny-ultramem": the preset's skip layer
    "pkm-gate": (MemoryConfig(num_keys=8, topk=3, num_heads=2, key_dim=8, gate=True), False),
    "raw-ive-keynorm": (
        MemoryConfig(
            num_keys=8,
            topk=4,
            num_heads=2,
            key_dim=8,
            score="raw",
            value_dim=8,
            output_proj=True,
            virtual_blocks=4,
            key_norm=True,
        ),
        True,
    ),
    "tdqkr-softmax": (MemoryConfig(num_keys=12, topk=4, num_heads=2, key_dim=8, tucker_rank=3), False),
    "tiny-ultramem": None,  # TDQKR r=2, MCS with 2 cores, IVE over 4 blocks, key norm, raw scores
}


@pytest.mark.parametrize("variant", _VARIANTS)
def test_output_is_brute_force_over_all_slots(variant, ultramem):
    """The layer against ``_brute_force_memory``, which uses no code of the layer's: the picked
    slots (as sets per head) and the output."""
    if _VARIANTS[variant] is None:
        cfg, model, _ = ultramem
        layer = model.skips[0]
    else:
        mem, pre_norm = _VARIANTS[variant]
        cfg = _cfg(mem)
        layer = MemoryLayer(cfg.d_model, mem, rngs=nnx.Rngs(3), pre_norm=pre_norm)
    x = jax.random.normal(jax.random.key(2), (2, 5, cfg.d_model))
    want, want_slots = _brute_force_memory(layer, x)
    _, slots = layer.search(layer.norm(x) if layer.norm is not None else x)
    np.testing.assert_array_equal(np.sort(slots, -1), np.sort(want_slots, -1))
    out, _ = layer(x)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_ive_reads_only_heads_times_m_physical_rows(ultramem, monkeypatch):
    cfg, model, _ = ultramem
    layer, m = model.skips[0], cfg.memory
    seen = []
    real = memory_lib.read_values

    def spy(table, rows, weights, blocks, num_blocks, **kw):
        seen.append((table.shape, rows.shape, weights.shape, num_blocks))
        return real(table, rows, weights, blocks, num_blocks, **kw)

    monkeypatch.setattr(memory_lib, "read_values", spy)
    x = jax.random.normal(jax.random.key(3), (1, 1, cfg.d_model))  # one token
    g, params, rest = nnx.split(layer, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(g, p, rest)(x)[0] ** 2)))(params)
    assert seen[0] == ((m.physical_rows, 32), (1, m.num_heads * m.topk), (1, m.num_heads * m.topk, 2), 4)
    touched = np.flatnonzero(np.abs(np.asarray(grads["values_mu"][...])).sum(-1))
    assert 0 < len(touched) <= m.num_heads * m.topk  # of 1,024 physical rows (4,096 virtual slots)


def test_no_dense_score_and_no_table_sized_intermediate(ultramem):
    """The jaxpr of the layer's forward and backward: nothing has a P² (slot-count) axis but the
    IVE permutation itself, and the only arrays of table size are the table, its views, its grad."""
    cfg, model, _ = ultramem
    m = cfg.memory
    g, params, rest = nnx.split(model.skips[0], nnx.Param, ...)
    x = jnp.ones((2, 8, cfg.d_model))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nnx.merge(g, p, rest)(x)[0])))(params)
    table = m.physical_rows * m.width(cfg.d_model)
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert (m.physical_rows, 32) in shapes  # the table's gradient is built (scatter-add)
    for shape in shapes:
        size = int(np.prod(shape))
        assert m.num_slots not in shape or shape == (m.num_slots,), shape
        assert size < table or size == table, shape


def test_query_and_key_layernorm_use_the_papers_init(ultramem):
    cfg, model, _ = ultramem
    layer, H = model.skips[0], cfg.memory.key_dim
    for norm in (layer.query_norm, layer.key_norm):
        np.testing.assert_allclose(norm.scale[...], H**-0.33, rtol=1e-6)
    q = layer.query_norm(jax.random.normal(jax.random.key(4), (5, H)) * 7 + 3)
    np.testing.assert_allclose(q.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(q.std(-1), H**-0.33, rtol=1e-3)


def test_update_state_keeps_the_sign_reference_of_the_previous_step(ultramem):
    """``Transformer.update_state`` (which the train step calls after each update; the trainer test
    checks that path) stores the current cores' aligned (u, v); the reference decides the sign."""
    cfg, model, tokens = ultramem
    layer = model.skips[0]
    saved_cores, saved_ref = layer.cores_xnzy[...], layer.tucker_ref[...]
    try:
        layer.cores_xnzy[...] = saved_cores + 0.3 * jax.random.normal(jax.random.key(8), saved_cores.shape)
        model.update_state(model(tokens, return_aux=True).aux)
        u, v = leading_singular_vectors(layer.cores_xnzy[...], saved_ref)
        np.testing.assert_allclose(layer.tucker_ref[...], jnp.stack([u, v], 1), atol=1e-6)
        assert not np.allclose(layer.tucker_ref[...], saved_ref)  # it moved with the cores
        # Flipping the reference flips (u, v), hence the candidate rows: the reference rules.
        x = jax.random.normal(jax.random.key(5), (1, 4, cfg.d_model))
        _, slots = layer.search(layer.norm(x))
        layer.tucker_ref[...] = -layer.tucker_ref[...]
        _, flipped = layer.search(layer.norm(x))
        assert not np.array_equal(slots, flipped)
    finally:
        layer.cores_xnzy[...], layer.tucker_ref[...] = saved_cores, saved_ref


def test_trainer_applies_the_value_lr_from_4_to_1(tmp_path):
    """``llmarch train --preset tiny-ultramem`` trains the value tables at λ × the learning rate,
    λ from 4 to 1, with no option to set: the trainer's optimizer reads it from the model config."""
    from llmarch.train.config import TrainConfig
    from llmarch.train.optim import OptimizerConfig, model_lr_groups
    from llmarch.train.trainer import init_state

    sgd = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant", clip_norm=None)
    cfg = TrainConfig(out_dir=str(tmp_path), preset="tiny-ultramem", steps=10, optimizer=sgd)
    _, tx, state = init_state(cfg, mesh=None)
    params = state.params
    ones = jax.tree.map(jnp.ones_like, params)
    opt_state = tx.init(params)
    first, opt_state = tx.update(ones, opt_state, params)
    for _ in range(9):
        last, opt_state = tx.update(ones, opt_state, params)
    assert float(first["skips"][0]["values_mu"][...][0, 0]) == pytest.approx(-4.0)
    assert float(last["skips"][0]["values_mu"][...][0, 0]) == pytest.approx(-1.0 - 3.0 / 10, abs=0.01)
    assert float(first["skips"][0]["keys_row_npzh"][...].ravel()[0]) == pytest.approx(-1.0)
    assert model_lr_groups(presets.get("tiny-pkm")) == ()


# -- PKM ------------------------------------------------------------------------------------------


def test_pkm_blocks_are_scanned_and_softmax_weights_sum_to_one():
    mem = MemoryConfig(num_keys=8, topk=3, num_heads=2, key_dim=8, tucker_rank=1)  # TDQKR r=1 in an FFN
    cfg = _cfg(mem, blocks=(BlockConfig(ffn="pkm"),) * 2)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.runs[0].layers.ffn.values_mu[...].shape == (2, 64, 16)  # stacked [L, M, D]
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    out = model(tokens, return_aux=True)
    aux = out.aux
    assert out.logits.shape == (2, 6, 64) and aux["runs/0/layers/ffn"]["loss"].shape == (2,)
    model.update_state(aux)  # a scanned run's stacked reference updates through its layers axis
    assert model.runs[0].layers.ffn.tucker_ref[...].shape == (2, 2, 2, 1)
    # a lone layer outside Transformer: no ModelConfig, no mesh
    layer = MemoryLayer(
        16, MemoryConfig(num_keys=8, topk=3, num_heads=2, key_dim=8, gate=True), rngs=nnx.Rngs(1)
    )
    weights, slots = layer.search(jnp.ones((1, 2, 16)))
    np.testing.assert_allclose(weights.sum(-2), 1.0, rtol=1e-6)  # a softmax per head
    assert slots.shape == (1, 2, 2, 3) and int(slots.max()) < 64
    out, _ = layer(jnp.ones((1, 2, 16)))
    assert out.shape == (1, 2, 16) and layer.w_gate_dwu is not None


def test_raw_scores_are_the_grid_scores_and_softmax_normalizes_them():
    """UltraMem's raw scores are the product-key grid scores themselves; PKM's are their softmax."""
    x = jax.random.normal(jax.random.key(6), (1, 3, 16))
    weights = {}
    for score in ("raw", "softmax"):
        layer = MemoryLayer(
            16, MemoryConfig(num_keys=8, topk=4, num_heads=2, key_dim=8, score=score), rngs=nnx.Rngs(7)
        )
        weights[score], slots = layer.search(x)
    q_row = layer.query_norm(layer.w_q_row_dnh("BTD,DNH->BTNH", x))
    q_col = layer.query_norm(layer.w_q_col_dnh("BTD,DNH->BTNH", x))
    s_row = jnp.einsum("BTNH,NPH->BTNP", q_row, layer.keys_row_npzh[...][:, :, 0])
    s_col = jnp.einsum("BTNH,NPH->BTNP", q_col, layer.keys_col_npzh[...][:, :, 0])
    grid = (s_row[..., :, None] + s_col[..., None, :]).reshape(1, 3, 2, 64)
    raw = jnp.take_along_axis(grid, slots, axis=-1)
    np.testing.assert_allclose(weights["raw"][..., 0], raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights["softmax"][..., 0], jax.nn.softmax(raw, -1), rtol=1e-5, atol=1e-6)


# -- accounting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-pkm", "tiny-ultramem"])
def test_param_counts_match_the_built_model(name, ultramem):
    cfg = presets.get(name)
    model = ultramem[1] if name == "tiny-ultramem" else llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert accounting.param_count(cfg) == built
    state = nnx.state(model, MemoryState)  # non-trainable state is not a parameter
    assert all(
        not isinstance(v, nnx.Param)
        for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
    active = accounting.active_param_counts(cfg)
    assert active.memory < accounting.param_counts(cfg).memory
    assert abs(active.total - accounting.param_count(presets.get("tiny-dense"))) < 0.002 * active.total


def test_decode_traffic_model():
    um, moe = presets.get("ultramem-1.6b"), presets.get("moe-1.6b-2in34")
    assert abs(accounting.param_count(um) / accounting.param_count(moe) - 1) < 1e-3  # equal totals
    m = um.memory
    for B in (1, 8, 64):
        t = accounting.decode_traffic(um, B)
        rows = 8 * B * m.reads_per_token  # 8 memory layers; rows hardly ever collide at this size
        assert t.sparse == pytest.approx(rows * m.width(um.d_model) * 2, rel=1e-3)  # bf16
        e = moe.moe
        experts = 32 * e.num_experts * (1 - (1 - e.top_k / e.num_experts) ** B)
        want = experts * 3 * 2048 * e.expert_dim * 2
        assert accounting.decode_traffic(moe, B).sparse == pytest.approx(want)
    assert accounting.decode_traffic(moe, 64).total > 5 * accounting.decode_traffic(um, 64).total
    assert accounting.decode_traffic(um, 4, context_len=16).kv_cache == (
        accounting.kv_cache_bytes_per_token(um) * 16 * 4
    )
    with pytest.raises(ValueError, match="batch_size=0"):
        accounting.decode_traffic(um, 0)


def test_paper_shapes_are_the_derived_sizes():
    sizes = ("151m", "680m", "1.6b")
    dense = {s: accounting.param_counts(presets.get(f"dense-{s}")).non_embedding for s in sizes}
    assert [round(v / 1e6) for v in dense.values()] == [151, 680, 1611]
    for s in dense:
        total = accounting.param_counts(presets.get(f"ultramem-{s}")).non_embedding
        assert 11.5 < total / dense[s] < 12.0
    assert dataclasses.replace(presets.get("ultramem-1.6b").memory).virtual_blocks == 4
