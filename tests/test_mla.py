"""Multi-head latent attention: config checks, naive == absorbed, the latent cache, decoding,
accounting against DeepSeek-V2's Table 1, training, and the 8-device layouts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch import accounting, sharding
from llmarch.config import BlockConfig, MLAConfig, ModelConfig, YarnScaling
from llmarch.inference import generate
from llmarch.layers import mla, rope
from llmarch.layers.mla import MLA, MLACache
from llmarch.model import with_mla_path

TINY = dict(
    num_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12
)


def _cfg(init_std=0.2, **mla_changes):
    base = llmarch.presets.get("tiny-mla")
    m = dataclasses.replace(base.mla, **{**TINY, **mla_changes})
    return base.replace(mla=m, attention=m.mha_baseline(), init_std=init_std)


def _layer(cfg, seed=0):
    return MLA(cfg.d_model, cfg.mla, rngs=nnx.Rngs(seed), init_std=cfg.init_std)


# Config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MLAConfig(**{**TINY, "qk_rope_head_dim": 7}), r"qk_rope_head_dim=7.*even"),
        (lambda: MLAConfig(**{**TINY, "kv_lora_rank": 0}), r"kv_lora_rank=0.*positive"),
        (lambda: MLAConfig(**{**TINY, "q_lora_rank": -8}), r"q_lora_rank=-8.*positive"),
        (lambda: MLAConfig(**{**TINY, "num_heads": 0}), r"num_heads=0"),
        (lambda: MLAConfig(**{**TINY, "v_head_dim": 2.5}), r"v_head_dim=2.5"),
        (lambda: MLAConfig(**TINY, path="latent"), r"MLAConfig.path='latent'.*'naive', 'absorbed', 'auto'"),
        (lambda: MLAConfig(**TINY, rope_theta=0.0), r"rope_theta"),
        (lambda: MLAConfig(**TINY, rope_scaling={"factor": 4}), r"rope_scaling.*YarnScaling"),
        (lambda: YarnScaling(factor=0.5, original_max_position_embeddings=32), r"factor=0.5"),
        (lambda: YarnScaling(4.0, 32, beta_fast=1.0, beta_slow=32.0), r"beta_slow=32.0"),
        (lambda: YarnScaling(4.0, 32, mscale=-1.0), r"mscale=-1.0"),
        (lambda: _cfg().replace(mla=None), r"ModelConfig.mla=None.*blocks use attention 'mla'"),
        (lambda: _cfg().replace(blocks=None), r"ModelConfig.mla=.*no block uses attention 'mla'"),
    ],
)
def test_bad_mla_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_absorbed_path_requests_that_cannot_apply():
    cfg = _cfg()
    layer = _layer(cfg)
    x, pos = jnp.zeros((1, 3, cfg.d_model)), jnp.arange(3)[None]
    with pytest.raises(ValueError, match=r"path='absorb' is invalid.*'naive', 'absorbed', 'auto'"):
        layer(x, pos, path="absorb")
    dense = nnx.eval_shape(lambda: llmarch.Transformer(llmarch.presets.get("tiny-dense"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"path='absorbed' cannot apply.*no 'mla' attention"):
        with_mla_path(dense, "absorbed")


def test_json_round_trip_with_yarn():
    cfg = _cfg(rope_scaling=YarnScaling(4.0, 32, mscale=0.7, mscale_all_dim=0.7), q_lora_rank=None)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.mla.rope_scaling, YarnScaling)


# The layer: two paths, one set of weights -----------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_naive_and_absorbed_agree_for_prefill_and_cached_decode(q_lora_rank):
    cfg = _cfg(q_lora_rank=q_lora_rank, rope_scaling=YarnScaling(4.0, 8, mscale=1.0, mscale_all_dim=0.8))
    layer = _layer(cfg)
    graphdef, state = nnx.split(layer)

    @functools.partial(jax.jit, static_argnames="path")  # one compile per shape and path
    def run(state, x, pos, seg=None, cache=None, *, path):
        return nnx.merge(graphdef, state)(x, pos, seg, cache, path=path)

    run = functools.partial(run, state)
    B, T, S = 2, 10, 16
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.array([[0] * 6 + [1] * 4, [0] * 10])  # packed documents, no cache
    naive, _ = run(x, pos, seg, path="naive")
    absorbed, _ = run(x, pos, seg, path="absorbed")
    assert float(jnp.abs(naive).mean()) > 0.1  # not vanishing: the comparison means something
    np.testing.assert_allclose(absorbed, naive, atol=2e-5, rtol=1e-5)

    # Prefill 7 tokens into the latent cache, then decode the rest one at a time, per path.
    full, _ = run(x, pos, path="naive")
    for path in ("naive", "absorbed"):
        cache = MLA.init_cache(cfg.mla, B, S, jnp.float32)
        out, cache = run(x[:, :7], pos[:, :7], cache=cache, path=path)
        np.testing.assert_allclose(out, full[:, :7], atol=2e-5, rtol=1e-5)
        for t in range(7, T):
            out, cache = run(x[:, t : t + 1], pos[:, t : t + 1], cache=cache, path=path)
            np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-5, rtol=1e-5)
        # The cache holds c_KV [B,S,A] and k_R [B,S,R] and nothing else; unwritten slots stay 0.
        assert isinstance(cache, MLACache) and cache._fields == ("c_kv", "k_r")
        assert cache.c_kv.shape == (B, S, 32) and cache.k_r.shape == (B, S, 8)
        assert not np.any(np.asarray(cache.c_kv[:, T:])) and np.all(np.any(cache.c_kv[:, :T], -1))


def test_auto_path_choice():
    m = llmarch.presets.get("deepseek-v3").mla  # A=512, H=H_v=128: break-even near T=170
    assert mla.choose_path(m, 1, 4096) == "absorbed"
    assert mla.choose_path(m, 128, 4096) == "absorbed"
    assert mla.choose_path(m, 512, 4096) == "naive"
    assert mla.choose_path(m, 4096, 4096) == "naive"  # no cache: keys = queries
    wide = dataclasses.replace(m, kv_lora_rank=64)  # 2A < H + H_v: absorbed is always cheaper
    assert mla.choose_path(wide, 4096, 4096) == "absorbed"


def test_yarn_softmax_and_rope_scales():
    m = llmarch.presets.get("deepseek-v3").mla  # mscale = mscale_all_dim = 1, factor 40
    assert rope.yarn_rope_factor(m.rope_scaling) == 1.0
    assert mla.softmax_scale(m) == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)
    plain = dataclasses.replace(m, rope_scaling=None)
    assert mla.softmax_scale(plain) == 192**-0.5
    assert rope.yarn_rope_factor(plain.rope_scaling) == 1.0
    inv = rope.yarn_inverse_frequencies(64, 10_000.0, m.rope_scaling)
    base = 1.0 / 10_000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv[:5], base[:5], rtol=1e-6)  # fast dims extrapolate
    np.testing.assert_allclose(inv[-5:], base[-5:] / 40, rtol=1e-6)  # slow dims interpolate


# The model: decoding with the latent cache ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():  # built once: decoding, training and the layouts all start from it
    return llmarch.Transformer(_cfg(init_std=0.05), rngs=nnx.Rngs(0))


def test_model_cache_holds_only_the_latents(tiny_model):
    cache = tiny_model.init_cache(3, 20)
    assert len(cache) == 1 and isinstance(cache[0], MLACache)  # one run of 2 stacked layers
    assert cache[0].c_kv.shape == (2, 3, 20, 32) and cache[0].k_r.shape == (2, 3, 20, 8)


@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_generate_with_cache_equals_recomputation(tiny_model, path):
    model = with_mla_path(tiny_model, path)
    assert model.cfg.mla.path == path and tiny_model.cfg.mla.path == "auto"
    prompt = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    cached = generate(model, prompt, 8, use_cache=True)
    np.testing.assert_array_equal(cached, generate(model, prompt, 8, use_cache=False))
    # Greedy: each token is the argmax of one full forward over the result.
    np.testing.assert_array_equal(cached[:, 4:], jnp.argmax(model(jnp.asarray(cached))[:, 3:-1], -1))


# Accounting -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [_cfg(), _cfg(q_lora_rank=None), llmarch.presets.get("deepseek-v2-lite")],
    ids=["tiny-q-lora", "tiny-no-q-lora", "deepseek-v2-lite"],
)
def test_param_count_matches_built_model(cfg):
    model = nnx.eval_shape(lambda: llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    built = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert built == accounting.param_count(cfg)


def test_kv_cache_bytes_follow_deepseek_v2_table_1():
    v3 = llmarch.presets.get("deepseek-v3")
    assert accounting.kv_cache_bytes_per_token(v3) == (512 + 64) * 61 * 2 == 70_272  # bf16
    assert accounting.kv_cache_bytes_per_token(v3, "float32") == 576 * 61 * 4
    # Table 1: MLA (d_c + d_h^R)·l = (4 d_h + d_h/2)·l against MHA 2·n_h·d_h·l (d_h=128, n_h=128).
    mha = v3.replace(blocks=None, mla=None, moe=None)  # MHA (+ dense FFN) in every layer
    d_h, n_h, layers = 128, 128, 61
    assert accounting.kv_cache_elements_per_token(v3) == (4 * d_h + d_h // 2) * layers
    assert accounting.kv_cache_elements_per_token(mha) == 2 * n_h * d_h * layers == 32_768 * layers
    ratio = accounting.kv_cache_bytes_per_token(v3) / accounting.kv_cache_bytes_per_token(mha)
    assert ratio == pytest.approx(576 / 32_768)
    # GQA 2·n_g·d_h·l and MQA 2·d_h·l, through num_kv_heads.
    llama = llmarch.presets.get("llama3-8b")
    assert accounting.kv_cache_bytes_per_token(llama) == 2 * 8 * 128 * 32 * 2
    mqa = llama.replace(attention=dataclasses.replace(llama.attention, num_kv_heads=1))
    assert accounting.kv_cache_elements_per_token(mqa) == 2 * 128 * 32
    lite = llmarch.presets.get("deepseek-v2-lite")
    assert accounting.kv_cache_bytes_per_token(lite) == 576 * 27 * 2


def test_mixed_stack_counts_each_kind():
    cfg = _cfg()
    mixed = cfg.replace(blocks=(BlockConfig("mla"), BlockConfig("mha")))
    assert accounting.kv_cache_elements_per_token(mixed) == (32 + 8) + 2 * 4 * 16
    model = nnx.eval_shape(lambda: llmarch.Transformer(mixed, rngs=nnx.Rngs(0)))
    built = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert built == accounting.param_count(mixed)
    f = accounting.attention_flops_per_token(mixed, 100)
    assert f == 6 * 4 * (16 + 8 + 12) * 100 + 12 * 4 * 16 * 100


# Training and sharding ------------------------------------------------------------------------


def test_mla_trains_through_the_trainer_on_tinyshakespeare(shared_data, tmp_path):
    from llmarch.train.config import TrainConfig
    from llmarch.train.optim import OptimizerConfig
    from llmarch.train.trainer import train

    result = train(
        TrainConfig(
            out_dir=str(tmp_path),
            preset="tiny-mla",
            data=str(shared_data / "tinyshakespeare.txt"),
            steps=30,
            seq_len=64,
            batch_size=16,
            eval_every=30,
            eval_batches=2,
            log_every=10,
            progress=False,
            tensorboard=False,
            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=3),
        ),
        log=lambda s: None,
    )
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[0] > 5.0  # ~ln(320) at init
    assert np.mean(losses[-5:]) < losses[0] - 2.0, losses
    assert result.val_loss < losses[0] - 2.0


def _loss(graphdef, state, tokens):
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits


@pytest.fixture(scope="module")
def single_device(tiny_model):
    graphdef, state = nnx.split(tiny_model)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, tiny_model.cfg.vocab_size)
    grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    (loss, logits), grads = grad(graphdef, state, tokens)
    return tiny_model.cfg, graphdef, state, tokens, loss, logits, grads


@pytest.mark.parametrize(
    "spec, rules, born",
    [
        ("data=8", "dp", False),
        ("data=2,fsdp=4", "fsdp", False),
        ("data=4,tensor=2", "tp", False),
        ("data=2,fsdp=2,tensor=2", "fsdp_tp", True),
    ],
)
def test_layouts_equal_single_device(devices, single_device, spec, rules, born):
    cfg, graphdef, state, tokens, ref_loss, ref_logits, ref_grads = single_device
    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, rules):
        if born:  # built directly on the mesh (slow: once), else the same state placed on it
            graphdef, placed = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
            jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(placed), jax.tree.leaves(state))
        else:
            placed = sharding.shard_state(state, mesh, rules)
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh, rules))
        grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
        (loss, logits), grads = grad(graphdef, placed, batch)
    jax.tree.map(
        lambda v, s: v.sharding.is_equivalent_to(s, v.ndim) or pytest.fail(f"{v.sharding} != {s}"),
        placed,
        sharding.state_shardings(placed, mesh, rules),
    )
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
        jax.tree.leaves(grads),
        jax.tree.leaves(ref_grads),
    )
