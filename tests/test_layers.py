import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from kernels_pallas.flash_attention import attention_reference
from llmarch import layers, ops
from llmarch.config import RopeScaling
from llmarch.layers.einsum import Einsum, contract
from llmarch.layers.norms import RMSNorm
from llmarch.layers.rope import apply_rope, inverse_frequencies


def test_einsum_applies_its_weight():
    layer = Einsum((3, 2), ("embed", "mlp"), rngs=nnx.Rngs(0))  # a lone layer: no mesh needed
    x = jnp.arange(6.0).reshape(1, 2, 3)
    np.testing.assert_allclose(layer("BTD,DF->BTF", x), x @ layer.w[...], rtol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        Einsum((3, 2), ("embed",), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "eqn,x_shape,w_shape",
    [
        ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 6)),  # two contracted axes: the weight's order
        ("BTWU,WUD->BTD", (2, 1, 3, 4), (3, 4, 5)),
        ("BTD,DNH->BTNH", (2, 3, 6), (6, 4, 5)),
        ("BTD,D->BT", (2, 3, 6), (6,)),
        ("BTNH,NPH->BTNP", (2, 1, 3, 4), (3, 5, 4)),  # a batch axis: jnp.einsum
        ("BTD,DF->BFT", (2, 3, 4), (4, 5)),  # permuted output: jnp.einsum
    ],
)
def test_contract_is_einsum(eqn, x_shape, w_shape):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    np.testing.assert_allclose(contract(eqn, x, w), jnp.einsum(eqn, x, w), rtol=1e-5, atol=1e-5)


def test_contract_never_copies_the_weight():
    """The attention output projection contracts N and H: the compiled step uses the weight in
    place (jnp.einsum's (H, N) order made XLA:CPU copy a transposed weight at every call)."""
    x = jax.ShapeDtypeStruct((4, 1, 8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((8, 16, 32), jnp.float32)
    text = jax.jit(lambda x, w: contract("BTNH,NHD->BTD", x, w)).lower(x, w).compile().as_text()
    entry = text[text.index("ENTRY") :]
    assert "f32[8,16,32]" in entry and "transpose" not in text
    assert not [line for line in entry.splitlines() if "fusion(%w" in line.replace(" ", "")]


def test_rmsnorm_by_hand():
    with nnx.use_eager_sharding(False):
        norm = RMSNorm(2, eps=0.0)
    x = jnp.array([[3.0, 4.0]])
    rms = np.sqrt((9 + 16) / 2)
    np.testing.assert_allclose(norm(x), [[3 / rms, 4 / rms]], rtol=1e-6)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_position():
    inv_freq = inverse_frequencies(8, 10_000.0)
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), inv_freq)
        rk = apply_rope(k, jnp.array([[pk]]), inv_freq)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), abs=1e-5)


def test_llama3_scaling_bands():
    plain = inverse_frequencies(128, 500_000.0)
    scaled = inverse_frequencies(128, 500_000.0, RopeScaling(factor=8.0))
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths are kept
    low = wavelen > 8192 / 1  # long wavelengths are divided by the factor
    np.testing.assert_allclose(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] <= plain[mid]) and np.all(scaled[mid] >= plain[mid] / 8)


def _naive_mha(q, k, v, causal=True):
    """Per-head softmax(q kᵀ/√H) v with explicit loops: the textbook definition."""
    B, T, N, H = q.shape
    out = np.zeros((B, T, N, H), np.float64)
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n].T / np.sqrt(H)
            if causal:
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n]
    return out


def _qkv(B=2, T=6, N=4, K=4, H=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, T, N, H)),
        jax.random.normal(kk, (B, T, K, H)),
        jax.random.normal(kv, (B, T, K, H)),
    )


def _pos(B, T):
    return jnp.broadcast_to(jnp.arange(T), (B, T))


def test_attention_with_kv_heads_equal_heads_is_mha():
    q, k, v = _qkv(K=4)
    out = attention_reference(q, k, v, q_positions=_pos(2, 6), kv_positions=_pos(2, 6))
    np.testing.assert_allclose(out, _naive_mha(q, k, v), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v = _qkv(N=6, K=2)
    pos = _pos(2, 6)
    gqa = attention_reference(q, k, v, q_positions=pos, kv_positions=pos)
    mha = attention_reference(
        q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), q_positions=pos, kv_positions=pos
    )
    np.testing.assert_allclose(gqa, mha, atol=1e-6)
    mqa = attention_reference(q, k[:, :, :1], v[:, :, :1], q_positions=pos, kv_positions=pos)
    np.testing.assert_allclose(
        mqa, _naive_mha(q, jnp.repeat(k[:, :, :1], 6, 2), jnp.repeat(v[:, :, :1], 6, 2)), atol=1e-5
    )


def test_sliding_window_matches_truncated_context():
    q, k, v = _qkv(B=1, T=8, N=2, K=2)
    pos = _pos(1, 8)
    out = attention_reference(q, k, v, q_positions=pos, kv_positions=pos, sliding_window=3)
    # The last query sees exactly keys 5, 6, 7: the same as full causal attention over them.
    tail = attention_reference(q[:, 5:], k[:, 5:], v[:, 5:], q_positions=pos[:, 5:], kv_positions=pos[:, 5:])
    np.testing.assert_allclose(out[:, -1], tail[:, -1], atol=1e-6)


def test_fully_masked_query_gives_zeros_not_nan():
    q, k, v = _qkv(B=1, T=4, N=2, K=2)
    seg_q = jnp.array([[1, 1, 1, 1]])
    seg_k = jnp.array([[2, 2, 2, 2]])
    out = attention_reference(
        q, k, v, q_positions=_pos(1, 4), kv_positions=_pos(1, 4), q_segment_ids=seg_q, kv_segment_ids=seg_k
    )
    assert np.all(np.asarray(out) == 0)
    g = jax.grad(
        lambda q: attention_reference(
            q,
            k,
            v,
            q_positions=_pos(1, 4),
            kv_positions=_pos(1, 4),
            q_segment_ids=seg_q,
            kv_segment_ids=seg_k,
        ).sum()
    )(q)
    assert np.all(np.isfinite(g))


def test_ops_dispatch():
    assert ops.resolve("attention", "auto")[0] == ops.Impl.XLA  # CPU
    assert ops.resolve("attention", "xla")[0] == ops.Impl.XLA
    assert ops.resolve("attention", "pallas")[0] == ops.Impl.PALLAS  # interpreted on CPU
    with pytest.raises(ValueError, match="impl='triton'"):
        ops.resolve("attention", "triton")
    with pytest.raises(ValueError, match="op='conv'"):
        ops.resolve("conv")


def test_model_config_impl_reaches_ops(monkeypatch):
    cfg = llmarch.presets.get("tiny-dense").replace(impl="pallas")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    requested, resolve = [], ops.resolve
    record = lambda op, impl=None: (requested.append((op, impl)), resolve(op, impl))[1]  # noqa: E731
    monkeypatch.setattr(ops, "resolve", record)
    model(jnp.zeros((1, 4), jnp.int32))
    layer_ops = {impl for op, impl in requested if not op.startswith("weight_matmul")}
    weight_ops = {impl for op, impl in requested if op.startswith("weight_matmul")}
    assert layer_ops == {"pallas"}
    # No Pallas weight product: XLA's dot is the accelerator's matmul kernel (and never CPU's FFI).
    assert weight_ops == {ops.Impl.XLA}


def test_model_config_impl_xla_keeps_the_cpu_kernel_out():
    """impl="xla" reaches the weight products: a 2-row decode step, which "auto" gives to the CPU
    kernel, lowers with no custom call (an exported artifact must hold none)."""
    cfg = llmarch.presets.get("tiny-dense")
    x = jnp.zeros((2, 1), jnp.int32)
    texts = {}
    for impl in ("auto", "xla"):
        model = llmarch.Transformer(cfg.replace(impl=impl), rngs=nnx.Rngs(0))
        texts[impl] = jax.jit(lambda m, x: m(x)).lower(model, x).as_text()
    if ops.weight_matmul_kernel_serves(2, jnp.float32, jnp.float32):
        assert "custom_call" in texts["auto"]
    assert "custom_call" not in texts["xla"]


_LONE = {  # each layer from its own sub-config and explicit dimensions: no ModelConfig, no mesh
    "Attention": lambda: layers.Attention(32, layers.AttentionConfig(4, 2, 8), rngs=nnx.Rngs(0)),
    "MLA": lambda: layers.MLA(
        32,
        layers.MLAConfig(4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        rngs=nnx.Rngs(0),
    ),
    "SwiGLU": lambda: layers.SwiGLU(32, 64, rngs=nnx.Rngs(0)),
    "MoE": lambda: layers.MoE(32, layers.MoEConfig(num_experts=4, top_k=2, expert_dim=16), rngs=nnx.Rngs(0)),
    "MemoryLayer": lambda: layers.MemoryLayer(32, layers.MemoryConfig(num_keys=4, topk=2), rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", sorted(_LONE))
def test_each_layer_builds_and_runs_on_its_own(name):
    layer = _LONE[name]()
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    if name in ("Attention", "MLA"):
        out, cache = layer(x, jnp.broadcast_to(jnp.arange(5), (2, 5)))
        assert cache is None
    else:
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: layers.SwiGLU(0, 64, rngs=nnx.Rngs(0)), r"SwiGLU.d_model=0 is invalid: must be a positive"),
        (lambda: layers.SwiGLU(32, 6.5, rngs=nnx.Rngs(0)), r"SwiGLU.hidden=6.5 is invalid"),
        (
            lambda: layers.MLA(32, layers.AttentionConfig(4, 2, 8), rngs=nnx.Rngs(0)),
            r"MLA.cfg='AttentionConfig' is invalid: must be an MLAConfig",
        ),
        (
            lambda: layers.MemoryLayer(
                32, layers.MemoryConfig(num_keys=4, topk=2, value_dim=16), rngs=nnx.Rngs(0)
            ),
            r"MemoryConfig.output_proj=False is invalid: must be True when the value width 16 differs",
        ),
    ],
)
def test_a_lone_layer_rejects_bad_arguments_by_name(build, match):
    with pytest.raises(ValueError, match=match):
        build()
