"""Quantized models: QuantizedEinsum against Einsum on the dequantized weight, ``quantize`` on the
dense/GQA/MLA/MoE presets against the float model carrying the dequantized weights, and a
quantized model served by the Engine against its own full-recompute greedy tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import ops
from llmarch.inference import Engine, SamplingParams
from llmarch.layers.einsum import Einsum
from llmarch.quant import QuantConfig, QuantizedEinsum, QuantParam, dequantize, linears, quantize
from llmarch.quant.linear import Layout
from llmarch.quant.model import is_quantized
from llmarch.quant.tensor import quantize as quantize_tensor

_MODELS: dict[str, llmarch.Transformer] = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = llmarch.Transformer(llmarch.presets.get(name), rngs=nnx.Rngs(0))
    return _MODELS[name]


def _qcfg(name, **kw):
    # tiny-mla's query LoRA rank (24) takes no group of 32: per-channel there
    group = None if "mla" in name or kw.get("method") == "fp8" else 32
    return QuantConfig(**{"group_size": group, **kw})


def dequantized_twin(model, cfg, qcfg, qmodel):
    """The float model with each quantized weight replaced by its dequantized value."""
    twin = nnx.clone(model)
    q_by_path = {
        "/".join(map(str, p)): m for p, m in nnx.iter_modules(qmodel) if isinstance(m, QuantizedEinsum)
    }
    for t in linears(twin, cfg, qcfg):
        if t.path == "embed":
            t.module.table_vd.set_value(qmodel.embed.table())
            continue
        layer = q_by_path[t.path]
        if t.lead:  # a scanned run: dequantize layer by layer
            graphdef, state = nnx.split(layer)
            w = jax.vmap(lambda s, g=graphdef: nnx.merge(g, s).weight())(state)
        else:
            w = layer.weight()
        t.module.w.set_value(w.astype(t.module.w[...].dtype))
    return twin


@pytest.mark.parametrize(
    "eqn,shape,names,x_shape",
    [
        ("BTD,DNH->BTNH", (32, 4, 8), ("embed", "heads", "head_dim"), (2, 3, 32)),
        ("BTNH,NHD->BTD", (4, 8, 32), ("heads", "head_dim", "embed"), (2, 3, 4, 8)),
        ("BTD,DF->BTF", (64, 48), ("embed", "mlp"), (1, 1, 64)),
    ],
)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False), (3, True)])
def test_quantized_einsum_matches_einsum_on_dequantized_weight(eqn, shape, names, x_shape, bits, symmetric):
    layer = Einsum(shape, names, rngs=nnx.Rngs(0))
    lhs, rhs = eqn.split("->")[0].split(",")
    out = eqn.split("->")[1]
    batch = [i for i, c in enumerate(rhs) if c in lhs and c in out]
    k = [i for i, c in enumerate(rhs) if c in lhs and c not in out]
    rest = [i for i, c in enumerate(rhs) if c not in lhs]
    layout = Layout(shape, names, (*batch, *k, *rest), len(batch), len(k))
    qt = quantize_tensor(
        np.asarray(layout.to_matrix(np.asarray(layer.w[...]))),
        method="rtn",
        bits=bits,
        group_size=32,
        symmetric=symmetric,
    )
    q = QuantizedEinsum(qt, layout)
    x = jax.random.normal(jax.random.key(1), x_shape)
    want = jnp.einsum(eqn, x, q.weight())
    np.testing.assert_allclose(np.asarray(q(eqn, x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    # a contraction other than the stored one dequantizes and still agrees (MLA's absorbed path)
    if eqn == "BTD,DNH->BTNH":
        y = jax.random.normal(jax.random.key(2), (2, 3, 4, 8))
        np.testing.assert_allclose(
            np.asarray(q("BTNH,DNH->BTND", y)),
            np.asarray(jnp.einsum("BTNH,DNH->BTND", y, q.weight())),
            rtol=1e-5,
            atol=1e-5,
        )
    # the quantized arrays are not parameters: an nnx.Param filter leaves them out
    assert not jax.tree.leaves(nnx.state(q, nnx.Param))
    assert len(jax.tree.leaves(nnx.state(q, QuantParam))) == (3 if not symmetric else 2)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize(
    "kw",
    [
        dict(method="rtn", bits=8),
        dict(method="rtn", bits=4, group_size=32),
        dict(method="rtn", bits=4, symmetric=False, group_size=64),
        dict(method="fp8"),
        dict(method="fp8", fp8_block=32),
    ],
)
def test_ops_quantized_matmul_equals_dequantized_dot(rows, kw):
    w = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    qt = quantize_tensor(w, **kw)
    x = jax.random.normal(jax.random.key(0), (rows, 128))
    got = jax.jit(ops.quantized_matmul)(x, qt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ dequantize(qt)), rtol=1e-5, atol=1e-4)
    assert ops.quantized_matmul(x.astype(jnp.bfloat16), qt).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "name,kw",
    [
        ("tiny-dense", dict(method="rtn", bits=4)),
        ("tiny-gqa", dict(method="rtn", bits=8, symmetric=False)),
        ("tiny-mla", dict(method="rtn", bits=3)),
        ("tiny-mla", dict(method="fp8")),
        ("tiny-moe", dict(method="rtn", bits=4, symmetric=False)),
        ("tiny-moe", dict(method="fp8", fp8_block=32)),
    ],
)
def test_quantized_model_equals_float_model_on_dequantized_weights(name, kw):
    model = _model(name)
    cfg = model.cfg
    qcfg = _qcfg(name, **kw)
    qmodel = quantize(model, cfg, qcfg, progress=False)
    assert is_quantized(qmodel) and not is_quantized(model) and qmodel.quant_config == qcfg
    kinds = {type(m).__name__ for _, m in nnx.iter_modules(qmodel)}
    assert "QuantizedEinsum" in kinds
    twin = dequantized_twin(model, cfg, qcfg, qmodel)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    want = _jit_forward(twin)(tokens)
    got = _jit_forward(qmodel)(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # and quantization changed the function (the comparison above is not float vs float)
    assert float(jnp.abs(_jit_forward(model)(tokens) - got).max()) > 1e-4


def _jit_forward(model):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return lambda tokens: forward(state, tokens)


def test_which_weights_are_quantized():
    model = _model("tiny-moe")
    found = {t.path.rsplit("/", 1)[-1] for t in linears(model, model.cfg, QuantConfig())}
    assert {"w_q_dnh", "w_k_dkh", "w_v_dkh", "w_o_nhd", "w_gate_edf", "w_up_edf", "w_down_efd"} <= found
    assert "w_router_de" not in found and "lm_head" not in found
    with_head = {t.path for t in linears(model, model.cfg, QuantConfig(include_lm_head=True))}
    assert "lm_head" in with_head


def test_lm_head_quantized_when_asked():
    model = _model("tiny-dense")
    qcfg = QuantConfig(bits=8, include_lm_head=True)
    qmodel = quantize(model, model.cfg, qcfg, progress=False)
    assert isinstance(qmodel.lm_head, QuantizedEinsum)
    w, transposed = qmodel.output_projection()
    assert transposed and w.shape == model.lm_head.w[...].shape


@pytest.mark.parametrize(
    "tied,kw",
    [(False, dict(bits=4, group_size=32, include_lm_head=True)), (True, dict(method="fp8", fp8_block=32))],
)
def test_embeddings_quantized_when_asked(tied, kw):
    cfg = llmarch.presets.get("tiny-gqa").replace(tie_embeddings=tied)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    qcfg = QuantConfig(include_embeddings=True, **kw)
    qmodel = quantize(model, cfg, qcfg, progress=False)
    assert type(qmodel.embed).__name__ == "QuantizedEmbed"
    table = qmodel.embed.table()
    assert table.shape == model.embed.table_vd[...].shape
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    # encode dequantizes the tokens' columns only: the rows of the dequantized table
    np.testing.assert_array_equal(
        np.asarray(qmodel.embed.encode(tokens, jnp.float32)), np.asarray(table[tokens])
    )
    twin = dequantized_twin(model, cfg, qcfg, qmodel)
    np.testing.assert_allclose(
        np.asarray(_jit_forward(qmodel)(tokens)), np.asarray(_jit_forward(twin)(tokens)), rtol=1e-4, atol=1e-4
    )


def test_bad_requests_are_one_line_errors():
    model = _model("tiny-dense")
    with pytest.raises(ValueError, match="group_size=128 does not divide the input dimension K=64"):
        quantize(model, model.cfg, QuantConfig(bits=4, group_size=128), progress=False)
    qmodel = quantize(model, model.cfg, QuantConfig(bits=8), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(qmodel, model.cfg, QuantConfig(bits=8), progress=False)


def _recompute_greedy(model, prompt, n):
    """Greedy tokens by running the whole sequence again at every step (one fixed-length buffer;
    causality makes the padding after the sequence irrelevant)."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    forward = jax.jit(lambda b: jnp.argmax(model(b), axis=-1))
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(forward(jnp.asarray(buf))[0, i - 1])
    return buf[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "name,kw",
    [  # MLA decodes through the absorbed path: w_uk/w_uv contracted another way than stored
        ("tiny-mla", dict(method="rtn", bits=4)),
        pytest.param("tiny-gqa", dict(method="rtn", bits=4, symmetric=False), marks=pytest.mark.slow),
    ],
)
def test_engine_greedy_equals_full_recompute_on_quantized_model(name, kw):
    model = _model(name)
    qmodel = quantize(model, model.cfg, _qcfg(name, **kw), progress=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (3, 17)]
    engine = Engine(
        qmodel,
        max_num_seqs=2,
        max_num_batched_tokens=32,
        max_prefill_chunk=16,
        max_len=48,
        page_size=8,
        fixed_shapes=True,
    )
    outs = engine.generate(prompts, [SamplingParams(max_tokens=8, temperature=0.0)] * 2)
    want = [_recompute_greedy(qmodel, p, 8) for p in prompts]
    assert [o.token_ids for o in outs] == want


@pytest.mark.parametrize("spec,rules", [("fsdp=4,tensor=2", "fsdp_tp"), ("data=2,expert=4", "ep")])
def test_sharded_quantized_model_equals_single_device(devices, spec, rules):
    from llmarch import sharding

    name = "tiny-moe" if rules == "ep" else "tiny-gqa"
    model = _model(name)
    qmodel = quantize(model, model.cfg, QuantConfig(bits=4, group_size=32, symmetric=False), progress=False)
    graphdef, state = nnx.split(qmodel)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, model.cfg.vocab_size)
    want = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, rules):
        placed = sharding.shard_state(state, mesh, rules)  # packed weights and scales by their names
        q_leaves = jax.tree.leaves(nnx.state(nnx.merge(graphdef, placed), QuantParam))
        assert any(not leaf.sharding.is_fully_replicated for leaf in q_leaves)
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh, rules))
        got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(placed, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
