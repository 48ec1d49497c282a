"""GPTQ and AWQ: GPTQ against RTN (identity Hessian: bit for bit; real Hessians: smaller layer
error), its lazy batches against row-by-row updates; AWQ's α search against brute force, its
folding against the unfolded function; both methods on whole models (dense, GQA, MoE, MLA)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch.quant import QuantConfig, awq, calibrate, dequantize, quantize
from llmarch.quant.gptq import gptq
from llmarch.quant.targets import linears
from llmarch.quant.tensor import QuantizedTensor, rtn

RNG = np.random.default_rng(0)


def _deq(q, s, z, bits, g):
    return np.asarray(dequantize(QuantizedTensor.from_unpacked(q, s, z, bits, g)))


def _layer_problem(K=128, N=48, n=512):
    """A weight and correlated, unevenly scaled inputs (as real activations are)."""
    w = RNG.normal(size=(K, N)).astype(np.float32)
    x = RNG.normal(size=(n, K)) @ RNG.normal(size=(K, K)) * 0.3 + RNG.normal(size=(n, K))
    x *= np.exp(RNG.normal(size=K))  # a few loud channels
    return w, x.astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(bits, group_size, symmetric, act_order):
    w = RNG.normal(size=(64, 24)).astype(np.float32)
    got = gptq(w, np.eye(64), bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order)
    want = rtn(w, bits, group_size, symmetric)
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))


@pytest.mark.parametrize(
    "bits,group_size,symmetric,act_order",
    [
        (4, None, True, False),
        (4, 32, True, False),
        (3, 32, False, False),
        (4, 32, True, True),
        (3, None, True, True),
    ],
)
def test_gptq_layer_error_below_rtn(bits, group_size, symmetric, act_order):
    w, x = _layer_problem()
    h = x.T.astype(np.float64) @ x
    err = lambda wq: float(np.sum(np.square(x @ (w - wq))))  # noqa: E731
    ours = err(
        _deq(
            *gptq(w, h, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order),
            bits,
            group_size,
        )
    )
    base = err(_deq(*rtn(w, bits, group_size, symmetric), bits, group_size))
    assert ours < 0.8 * base, (ours, base)


def test_gptq_lazy_batches_equal_row_by_row_updates():
    """The block width only changes when updates are applied, not what they are."""
    w, x = _layer_problem(K=64, N=16)
    h = x.T.astype(np.float64) @ x
    row_by_row = gptq(w, h, bits=4, group_size=16, block=1)[0]
    for block in (8, 64):
        lazy = gptq(w, h, bits=4, group_size=16, block=block)[0]
        assert np.mean(lazy == row_by_row) > 0.99  # float rounding may flip a rare tie


def test_gptq_batched_matrices_are_each_quantized():
    w, x = _layer_problem(K=32, N=8)
    h = x.T.astype(np.float64) @ x
    both = gptq(np.stack([w, -w]), np.stack([h, h]), bits=4)
    for i, wi in enumerate((w, -w)):
        one = gptq(wi, h, bits=4)
        assert np.array_equal(both[0][i], one[0]) and np.array_equal(both[1][i], one[1])


def test_gptq_zeroes_dead_inputs_and_checks_shapes():
    w, x = _layer_problem(K=32, N=8)
    x[:, 5] = 0.0
    q, s, _ = gptq(w, x.T @ x, bits=8)
    assert np.all(q[5] == 0)
    with pytest.raises(ValueError, match="hessian"):
        gptq(w, np.eye(31), bits=4)


def test_awq_scales_formula():
    mean_abs = np.array([0.1, 1.0, 10.0], np.float32)
    assert np.allclose(awq.scales(mean_abs, 0.0), 1.0)
    s = awq.scales(mean_abs, 0.5)
    assert np.allclose(s, np.sqrt(mean_abs) / np.sqrt(np.sqrt(0.1) * np.sqrt(10.0)), rtol=1e-6)
    assert np.allclose(awq.grid(20), np.arange(20) / 20)


def _model(name):
    cfg = llmarch.presets.get(name)
    return llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), cfg


def _rows(cfg, n=8, t=16, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(n, t)).astype(np.int32)


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-moe"])
def test_awq_search_and_fold_against_brute_force(name):
    """Inside a real walk: each group's α is the grid point whose brute-force block error (scales
    folded into a copy, its members rounded) is smallest, and folding keeps the block's function."""
    model, cfg = _model(name)
    qcfg = QuantConfig(method="awq", bits=3, group_size=32, awq_grid=5)
    checked = []

    def check_unit(unit):
        stats = unit.stats()
        rows = awq.search_rows(unit)
        reference = np.asarray(unit(rows=rows), np.float64)
        for group in awq.groups(unit, stats):
            if group.fold is None:
                continue
            alpha, losses = awq.search(unit, group, qcfg, reference)
            brute = []
            for a in awq.grid(qcfg.awq_grid):
                copy = nnx.clone(unit.module)
                twin = _twin(unit, copy)
                twin_group = awq.groups(twin, stats)[
                    [g.members for g in awq.groups(unit, stats)].index(group.members)
                ]
                awq.fold(twin, twin_group, awq.scales(group.mean_abs, a))
                folded = np.asarray(twin(rows=rows), np.float64)
                assert np.allclose(folded, reference, atol=1e-4, rtol=1e-3)  # the same function
                for p in group.members:
                    twin.sites[p].set(awq.fake_quantize(twin.sites[p].matrix(), qcfg))
                brute.append(np.mean(np.square(np.asarray(twin(rows=rows), np.float64) - reference)))
            assert np.allclose(losses, brute, rtol=1e-3), (losses, brute)
            assert alpha == awq.grid(qcfg.awq_grid)[int(np.argmin(brute))]
            checked.append(group.fold[0])
        return {}

    targets = linears(nnx.clone(model), cfg, qcfg)
    calibrate.walk(
        nnx.clone(model),
        cfg,
        targets,
        _rows(cfg),
        check_unit,
        lambda t, r: None,
        method="awq",
        progress=False,
    )
    assert "norm" in checked and "up" in checked


def _twin(unit, module):
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(module) if p}
    sites = {p: calibrate.Site(p, modules[p], s.target, s.layer) for p, s in unit.sites.items()}
    return calibrate.Unit(unit.name, module, unit._call, unit.x, sites, unit._batch)


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-moe", "tiny-mla"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_beat_rtn_on_calibration_data(name, method):
    model, cfg = _model(name)
    rows = _rows(cfg)
    group = None if "mla" in name else 32  # tiny-mla's LoRA rank 24 takes no group of 32
    tokens = jnp.asarray(rows)
    ref = model(tokens)
    err = {}
    for m in ("rtn", method):
        q = quantize(model, cfg, QuantConfig(method=m, bits=3, group_size=group), rows, progress=False)
        assert q.quant_config.method == m
        err[m] = float(jnp.mean(jnp.square(q(tokens) - ref)))
    assert err[method] < err["rtn"], err


def test_awq_folds_into_the_model_norms():
    model, cfg = _model("tiny-dense")
    q = quantize(model, cfg, QuantConfig(method="awq", bits=4, group_size=32), _rows(cfg), progress=False)
    before = np.asarray(model.runs[0].layers.attn_norm.scale[...])
    after = np.asarray(q.runs[0].layers.attn_norm.scale[...])
    assert before.shape == after.shape and not np.allclose(before, after)
    assert np.array_equal(np.asarray(model.runs[0].layers.attn_norm.scale[...]), before)  # source untouched


@pytest.mark.parametrize(
    "rows,match",
    [
        (None, "needs calibration data"),
        (np.zeros((4, 8), np.int32), "at least 8"),
        (np.zeros((8,), np.int32), "token rows"),
        (np.full((8, 8), 10**6, np.int32), "calibration tokens must be in"),
    ],
)
def test_calibration_errors(rows, match):
    model, cfg = _model("tiny-dense")
    for method in ("gptq", "awq"):
        with pytest.raises(ValueError, match=match):
            quantize(model, cfg, QuantConfig(method=method, bits=4), rows, progress=False)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_awq_host_fake_quantize_is_rtn_dequantized(symmetric, group_size, bits):
    w = RNG.normal(size=(2, 64, 24)).astype(np.float32)
    qcfg = QuantConfig(method="awq", bits=bits, group_size=group_size, symmetric=symmetric)
    assert np.array_equal(
        awq.fake_quantize(w, qcfg), _deq(*rtn(w, bits, group_size, symmetric), bits, group_size)
    )
