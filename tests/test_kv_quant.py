"""Quantized KV caches (int8, FP8 e4m3; ``llmarch.layers.kv_quant``): the storage format against a
numpy reference and its error bounds; the paged XLA loop over quantized pools against the
reference over the dequantized pools (GQA and MLA, through ``llmarch.ops`` on both impls); the
engine with a quantized paged cache gives the same greedy tokens as ``generate`` with the same
quantized contiguous cache; bytes per token, page budgets and decode traffic; bad names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from kernels_pallas import mla_decode as md
from kernels_pallas import paged_attention as pa
from llmarch import accounting, ops
from llmarch.inference import Engine, EngineConfig, SamplingParams, generate
from llmarch.layers import kv_quant

INT8, FP8 = jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)


def _vectors(seed=0, shape=(3, 5, 2, 16)):
    x = np.array(jax.random.normal(jax.random.key(seed), shape), np.float32)
    x[0, 0, 0] = 0.0  # an all-zero vector: scale 1, zeros stored
    x[0, 1, 1] *= 1e3  # a large one
    return x


def test_int8_matches_numpy_reference_bit_for_bit():
    x = _vectors()
    q, scale = kv_quant.quantize(jnp.asarray(x), INT8)
    amax = np.abs(x).max(-1, keepdims=True)
    want_scale = np.where(amax == 0, 1.0, amax * np.float32(1 / 127)).astype(np.float32)
    want_q = np.clip(np.round(x / want_scale), -127, 127).astype(np.int8)
    assert q.dtype == INT8 and scale.dtype == jnp.float32 and scale.shape == (3, 5, 2, 1)
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
    np.testing.assert_array_equal(np.asarray(q), want_q)
    assert np.abs(np.asarray(q)).max() == 127  # each vector's largest entry maps to ±127
    assert not np.asarray(q)[0, 0, 0].any()


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_dequantization_error_bounds(dtype):
    x = _vectors(seed=1)
    storage = kv_quant.storage_dtype(dtype, "float32")
    q, scale = kv_quant.quantize(jnp.asarray(x), storage)
    y = np.asarray(kv_quant.dequantize(q, scale, jnp.float32))
    s = np.asarray(scale)
    if storage == INT8:  # round to nearest: half a step
        bound = s / 2
    else:  # e4m3: 3 mantissa bits, relative half-ulp 2^-4 for normals, 2^-10 absolute below 2^-6
        bound = np.maximum(np.abs(x) * 2.0**-4, s * 2.0**-10)
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-6))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0, 0, 0], 0.0)


def _pools(dtype, shape, seed):
    x = jax.random.normal(jax.random.key(seed), shape)
    q, s = kv_quant.quantize(x, dtype)
    return q, s, kv_quant.dequantize(q, s, jnp.float32)


def _batch(page_size=4, max_pages=5):
    """Row 0 decodes at 16, row 1 prefills positions 2..4, row 2 decodes at 8; garbage table entries."""
    tables = jnp.array([[3, 7, 1, 12, 5], [9, 2, 0, 0, 0], [14, 6, 11, 0, 0]], jnp.int32)
    lengths = jnp.array([17, 5, 9], jnp.int32)
    q_positions = jnp.array([[16, -1, -1], [2, 3, 4], [8, -1, -1]], jnp.int32)
    return tables, lengths, q_positions


@pytest.mark.parametrize("dtype", [INT8, FP8])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_paged_attention_over_quantized_pools(dtype, impl):
    q = jax.random.normal(jax.random.key(0), (3, 3, 4, 16))
    kq, ks, kf = _pools(dtype, (16, 4, 2, 16), 1)
    vq, vs, vf = _pools(dtype, (16, 4, 2, 16), 2)
    tables, lengths, q_pos = _batch()
    want = pa.paged_attention_reference(q, kf, vf, tables, lengths, q_pos, sliding_window=6)
    got = ops.paged_attention(
        q, kq, vq, tables, lengths, q_pos, impl=impl, k_scales=ks, v_scales=vs, sliding_window=6
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("dtype", [INT8, FP8])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_mla_decode_over_quantized_pools(dtype, impl):
    ql = jax.random.normal(jax.random.key(0), (3, 3, 4, 32))
    qr = jax.random.normal(jax.random.key(3), (3, 3, 4, 8))
    cq, cs, cf = _pools(dtype, (16, 4, 32), 1)
    rq, rs, rf = _pools(dtype, (16, 4, 8), 2)
    tables, lengths, q_pos = _batch()
    want = md.mla_decode_reference(ql, qr, cf, rf, tables, lengths, q_pos, scale=0.2)
    got = ops.mla_decode(
        ql, qr, cq, rq, tables, lengths, q_pos, scale=0.2, impl=impl, c_kv_scales=cs, k_rope_scales=rs
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


_MODELS = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = llmarch.Transformer(llmarch.presets.get(name), rngs=nnx.Rngs(0))
    return _MODELS[name]


@pytest.mark.parametrize("name,kv", [("tiny-gqa", "int8"), ("tiny-mla", "fp8_e4m3")])
def test_engine_with_quantized_cache_equals_generate_with_the_same_cache(name, kv):
    """Paged (engine: chunked prefill, continuous batching) == contiguous (generate) under the
    same per-token quantization: both dequantize to the same keys and values."""
    model = _model(name)
    prompts = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (3, 20))
    want = generate(model, prompts, 8, kv_cache_dtype=kv)[:, 20:]
    engine = Engine(
        model,
        kv_cache_dtype=kv,
        max_num_seqs=3,
        max_num_batched_tokens=32,
        max_prefill_chunk=16,
        max_len=32,
        page_size=8,
        fixed_shapes=True,
        decode_steps=1,
    )
    assert all(pool[0].dtype == kv_quant.storage_dtype(kv, "float32") for pool in engine.pools)
    outs = engine.generate(prompts.tolist(), SamplingParams(max_tokens=8, temperature=0.0))
    assert [o.token_ids for o in outs] == want.tolist()
    assert engine.stats["mixed_steps"] > 0


def test_quantized_contiguous_cache_is_close_to_the_float_one():
    model = _model("tiny-gqa")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 12)))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full = np.asarray(model(tokens))
    errors = {}
    for kv in ("float32", "int8", "fp8_e4m3"):
        out = model(tokens, positions=positions, cache=model.init_cache(2, 16, kv))
        assert out.cache[0].k.dtype == kv_quant.storage_dtype(kv, "float32")
        errors[kv] = np.abs(np.asarray(out.logits) - full).max() / np.abs(full).max()
    assert errors["float32"] < 1e-5 < errors["int8"] < errors["fp8_e4m3"] < 0.1
    assert errors["int8"] < 0.02


def test_bytes_per_token_and_page_budget():
    gqa, mla = llmarch.presets.get("tiny-gqa"), llmarch.presets.get("tiny-mla")
    L, K, H = gqa.num_layers, gqa.attention.num_kv_heads, gqa.attention.head_dim
    assert accounting.kv_cache_bytes_per_token(gqa) == 2 * L * K * H * 4  # float32: unchanged
    assert accounting.kv_cache_bytes_per_token(gqa, "bfloat16") == 2 * L * K * H * 2
    for kv in ("int8", "fp8_e4m3"):  # one byte a number, a float32 scale per token and head
        assert accounting.kv_cache_bytes_per_token(gqa, kv) == 2 * L * K * (H + 4)
    A, R = mla.mla.kv_lora_rank, mla.mla.qk_rope_head_dim
    assert accounting.kv_cache_bytes_per_token(mla, "int8") == mla.num_layers * (A + R + 8)

    budget = 64 * accounting.kv_page_bytes(gqa, 8, "float32")
    assert accounting.pages_for_memory(gqa, budget, 8, "float32") == 64
    int8_pages = accounting.pages_for_memory(gqa, budget, 8, "int8")
    assert int8_pages == budget // (8 * 2 * L * K * (H + 4)) and int8_pages > 3 * 64

    model = _model("tiny-gqa")
    for kv, pages in (("float32", 64), ("int8", int8_pages)):
        engine = Engine(model, kv_cache_dtype=kv, kv_cache_memory=budget, page_size=8, max_len=64)
        assert engine.stats["num_pages"] == pages
        assert engine.stats["kv_cache_bytes"] == pages * accounting.kv_page_bytes(gqa, 8, kv) <= budget

    t32 = accounting.decode_traffic(gqa, 4, context_len=100)
    t8 = accounting.decode_traffic(gqa, 4, context_len=100, kv_cache_dtype="int8")
    assert t32.kv_cache == 4 * 100 * 2 * L * K * H * 4 and t8.kv_cache == 4 * 100 * 2 * L * K * (H + 4)
    assert t8.dense == t32.dense


def test_bad_kv_cache_dtypes_and_budgets():
    with pytest.raises(ValueError, match=r"EngineConfig.kv_cache_dtype='int4' is invalid: must be one of"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match=r"kv_cache_memory=.* is invalid with num_pages=8"):
        EngineConfig(num_pages=8, kv_cache_memory=1 << 20)
    with pytest.raises(ValueError, match=r"EngineConfig.kv_cache_memory=0 is invalid"):
        EngineConfig(kv_cache_memory=0)
    with pytest.raises(ValueError, match=r"EngineConfig.kv_cache_memory=100 is invalid: holds 0 pages"):
        Engine(_model("tiny-gqa"), kv_cache_memory=100)
    with pytest.raises(ValueError, match=r"kv_cache_dtype='uint8' is invalid"):
        _model("tiny-gqa").init_cache(1, 8, "uint8")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4' is invalid"):
        generate(_model("tiny-gqa"), np.zeros((1, 2), np.int32), 1, kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int2' is invalid"):
        accounting.kv_cache_bytes_per_token(llmarch.presets.get("tiny-gqa"), "int2")
