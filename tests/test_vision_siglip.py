"""llmarch.vision against transformers' SiglipVisionModel: output parity, exact round trips, errors.

Weights are random everywhere, LayerNorm scales and biases included (HF starts them at one and
zero), so that a swapped or transposed mapping changes the outputs or breaks the round trip.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmarch import sharding
from llmarch.vision import SiglipVision, VisionConfig, patchify
from llmarch.vision import hf as vhf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

SMALL = dict(
    image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64, layer_norm_eps=1e-6
)
TOL = 1e-4


def _torch_model(seed=0, **overrides):
    config = transformers.SiglipVisionConfig(**SMALL, num_hidden_layers=2, num_attention_heads=4, **overrides)
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return model


def _pixels(seed=0, batch=2):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32)


def _torch_outputs(model, pixels):
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return out.last_hidden_state.numpy(), pooled, np.stack([h.numpy() for h in out.hidden_states])


def _run(model, pixels):
    """One jit per (model structure, input shape): graphdef is static, state an argument."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, hidden_states=True))
    return jax.tree.map(np.asarray, fn(state, jnp.asarray(pixels)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random SigLIP tower with its MAP head, saved as save_pretrained writes it."""
    ref = _torch_model()
    path = tmp_path_factory.mktemp("siglip")
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    _, path = checkpoint
    return vhf.load_siglip_vision(path)


def test_config_from_checkpoint(loaded):
    _, cfg = loaded
    assert cfg == VisionConfig(**SMALL, num_layers=2, num_heads=4, use_head=True)
    assert (cfg.num_patches, cfg.patch_dim, cfg.head_dim) == (16, 192, 8)


def test_load_matches_transformers(checkpoint, loaded):
    ref, _ = checkpoint
    model, _ = loaded
    pixels = _pixels()
    want_last, want_pooled, want_hidden = _torch_outputs(ref, pixels)
    got = _run(model, pixels)
    assert got.last_hidden_state.shape == (2, 16, 32) and got.pooled.shape == (2, 32)
    diffs = {
        "last_hidden_state": np.abs(got.last_hidden_state - want_last).max(),
        "pooler_output": np.abs(got.pooled - want_pooled).max(),
        "hidden_states": np.abs(got.hidden_states - want_hidden).max(),
    }
    print("max abs diff vs transformers:", {k: float(v) for k, v in diffs.items()})
    assert all(d < TOL for d in diffs.values()), diffs


def test_state_dict_without_head_matches_transformers(checkpoint):
    """A torch state dict in memory; use_head=False (LLaVA's use) skips the checkpoint's head."""
    ref, _ = checkpoint
    model, cfg = vhf.load_siglip_vision(ref.state_dict(), config=ref.config.to_dict(), use_head=False)
    assert not cfg.use_head and model.head is None
    got = _run(model, _pixels(seed=1, batch=1))
    want_last, _, _ = _torch_outputs(ref, _pixels(seed=1, batch=1))
    assert got.pooled is None
    assert np.abs(got.last_hidden_state - want_last).max() < TOL


def test_round_trip_is_exact(checkpoint, loaded, tmp_path):
    ref, _ = checkpoint
    model, _ = loaded
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    got = vhf.to_hf(model)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert np.array_equal(got[name], want[name]), name
    # What save_siglip_vision writes, transformers loads to the same tensors.
    vhf.save_siglip_vision(model, tmp_path)
    back = transformers.SiglipVisionModel.from_pretrained(tmp_path).eval()
    for name, w in back.state_dict().items():
        assert np.array_equal(w.numpy(), want[name]), name


def test_patchify_is_the_stride_patch_conv():
    pixels = _pixels()
    w = np.random.default_rng(2).normal(size=(5, 3, 8, 8)).astype(np.float32)  # [D,C,p,p]
    conv = torch.nn.functional.conv2d(torch.from_numpy(pixels), torch.from_numpy(w), stride=8)
    want = conv.flatten(2).transpose(1, 2).numpy()  # [B,T,D]
    got = np.asarray(patchify(jnp.asarray(pixels), 8)) @ w.reshape(5, -1).T
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gelu_exact_activation_matches_transformers(tmp_path):
    ref = _torch_model(seed=3, hidden_act="gelu", vision_use_head=False)
    ref.save_pretrained(tmp_path)
    model, cfg = vhf.load_siglip_vision(tmp_path)
    assert cfg.activation == "gelu" and not cfg.use_head
    want, _, _ = _torch_outputs(ref, _pixels(batch=1))
    assert np.abs(_run(model, _pixels(batch=1)).last_hidden_state - want).max() < TOL


def test_random_init_is_born_sharded_and_runs_in_bfloat16(devices):
    cfg = VisionConfig(**SMALL, num_layers=2, num_heads=4, dtype="bfloat16")
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    with sharding.use(mesh, "fsdp_tp"):
        model = SiglipVision(cfg, rngs=nnx.Rngs(0))
        w = model.encoder.layers.mlp.w_up_df.w.get_value()  # [L,D,F]
        assert w.sharding.spec == P(None, "fsdp", "tensor")
        graphdef, state = nnx.split(model)
        out = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, jnp.asarray(_pixels(batch=4)))
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.pooled.shape == (4, 32)
    assert out.hidden_states is None and bool(jnp.isfinite(out.last_hidden_state.astype(jnp.float32)).all())


def test_loading_on_a_mesh_equals_single_device(devices, checkpoint, loaded):
    _, path = checkpoint
    pixels = _pixels(seed=5, batch=4)
    want = _run(loaded[0], pixels)
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    with sharding.use(mesh, "fsdp_tp"):
        model, _ = vhf.load_siglip_vision(path)
        assert model.encoder.layers.attn.w_q_dnh.w.get_value().sharding.spec == P(
            None, "fsdp", "tensor", None
        )
        got = _run(model, jax.device_put(pixels, sharding.batch_sharding(mesh, "fsdp_tp", ndim=4)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prefix_is_found_in_a_larger_checkpoint(checkpoint, loaded):
    """A LLaVA-style state dict: the tower under a prefix, beside tensors that are not the tower's."""
    ref, _ = checkpoint
    model, cfg = loaded
    state = {"model.vision_tower." + k: v for k, v in ref.state_dict().items()}
    state["model.language_model.embed_tokens.weight"] = torch.zeros(4, 4)
    again, _ = vhf.load_siglip_vision(state, config=cfg)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model)), strict=True)
    )
    assert set(vhf.to_hf(again, prefix="model.vision_tower.")) == {
        "model.vision_tower." + k for k in ref.state_dict()
    }
    two = {**state, "other.embeddings.patch_embedding.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"found 2 tensors named \*embeddings.patch_embedding.weight"):
        vhf.load_siglip_vision(two, config=cfg)
    assert vhf.load_siglip_vision(two, config=cfg, prefix="model.vision_tower.")[0].head is not None


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_size", 0, r"VisionConfig.image_size=0 is invalid: must be a positive integer"),
        ("patch_size", 7, r"VisionConfig.patch_size=7 is invalid: must divide image_size=32"),
        ("num_heads", 5, r"VisionConfig.num_heads=5 is invalid: must divide hidden_size=32"),
        ("num_layers", 2.0, r"VisionConfig.num_layers=2.0 is invalid"),
        ("layer_norm_eps", 0.0, r"VisionConfig.layer_norm_eps=0.0 is invalid: must be in \(0, 1\)"),
        ("activation", "relu", r"VisionConfig.activation='relu' is invalid: must be one of"),
        ("use_head", 1, r"VisionConfig.use_head=1 is invalid: must be True or False"),
        ("dtype", "float64", r"VisionConfig.dtype='float64' is invalid: must be one of"),
        ("param_dtype", "int8", r"VisionConfig.param_dtype='int8' is invalid"),
    ],
)
def test_config_errors_name_field_value_and_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**{**SMALL, "num_layers": 2, "num_heads": 4, field: value})


def test_unsupported_hf_activation_names_the_field(checkpoint):
    ref, _ = checkpoint
    hf_config = {**ref.config.to_dict(), "hidden_act": "quick_gelu"}
    with pytest.raises(ValueError, match=r"activation='quick_gelu' is invalid"):
        vhf.load_siglip_vision(ref.state_dict(), config=hf_config)


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((3, 32, 32), np.float32, r"pixel_values has shape \(3, 32, 32\) \(rank 3\)"),
        ((1, 1, 32, 32), np.float32, r"pixel_values has 1 channels"),
        ((1, 3, 32, 24), np.float32, r"pixel_values is 32x24 pixels"),
        ((1, 3, 32, 32), np.int32, r"pixel_values has dtype int32"),
    ],
)
def test_bad_pixels_raise_one_line_before_compiling(loaded, shape, dtype, match):
    model, _ = loaded
    with pytest.raises(ValueError, match=match) as e:
        model(jnp.zeros(shape, dtype))
    assert "\n" not in str(e.value) and "[B, 3, 32, 32]" in str(e.value)


def test_mismatched_tensors_are_listed(checkpoint):
    ref, _ = checkpoint
    state = dict(ref.state_dict())
    state["extra.weight"] = state.pop("post_layernorm.bias")
    with pytest.raises(ValueError, match=r"missing \[post_layernorm.bias\]; unexpected \[extra.weight\]"):
        vhf.load_siglip_vision(state, config=ref.config.to_dict())
    cfg = dataclasses.replace(vhf.config_from_hf(ref.config.to_dict()), intermediate_size=48)
    with pytest.raises(ValueError, match=r"mlp.fc1.weight has shape \(64, 32\): the config needs \(48, 32\)"):
        vhf.load_siglip_vision(ref.state_dict(), config=cfg)
    with pytest.raises(ValueError, match=r"config=None is invalid with a state dict"):
        vhf.load_siglip_vision(ref.state_dict())


def test_full_siglip_model_state_dict_loads_its_vision_tower():
    """SiglipModel holds the tower under ``vision_model.`` beside a text tower; config has vision_config."""
    vision = dict(SMALL, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(4)
    ref = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    model, cfg = vhf.load_siglip_vision(ref.state_dict(), config=ref.config.to_dict())
    pixels = _pixels(seed=4, batch=1)
    with torch.no_grad():
        want = ref.vision_model(torch.from_numpy(pixels)).pooler_output.numpy()
    assert cfg.use_head and np.abs(_run(model, pixels).pooled - want).max() < TOL
