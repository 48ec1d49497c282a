"""llmarch.vision.llava against transformers' LlavaForConditionalGeneration (SigLIP tower, Llama
decoder): logits parity, the checkpoint round trip, the decoder's ``embeddings=`` hook, input errors.

Weights are random everywhere, norm scales included, so that a swapped or transposed mapping changes
the logits. Two images in a batch of two rows, their placeholders at different offsets, check that
features are written in order (HF's row-major ``masked_scatter``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmarch import sharding
from llmarch.vision import VisionConfig
from llmarch.vision import llava_hf as lhf
from llmarch.vision.llava import check_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

V, IMAGE, T = 128, 120, 40  # vocabulary, placeholder id, sequence length
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)
TEXT = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TOL = 1e-4


def _hf_config(**overrides):
    kw = dict(
        vision_config=transformers.SiglipVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return transformers.LlavaConfig(**{**kw, **overrides})


def _torch_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(_hf_config(**overrides)).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return model


def _inputs(P=16, seed=0):
    """Two rows, one image each: row 0's placeholders from position 2, row 1's from position 20."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, IMAGE, (2, T)).astype(np.int32)
    tokens[0, 2 : 2 + P] = IMAGE
    tokens[1, 20 : 20 + P] = IMAGE
    pixels = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    return tokens, pixels


def _torch_logits(model, tokens, pixels):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens).long(), pixel_values=torch.from_numpy(pixels))
    return out.logits.numpy()


@functools.cache
def _forward(graphdef):
    return jax.jit(lambda state, t, x: nnx.merge(graphdef, state)(t, images=x))


def _run(model, tokens, pixels):
    """One jit per (model structure, shape); the placeholder count is checked on the host first, as a
    traced forward pass cannot see token values."""
    check_inputs(model.cfg, tokens, pixels)
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef)(state, jnp.asarray(tokens), jnp.asarray(pixels)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = _torch_model()
    path = tmp_path_factory.mktemp("llava")
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    _, path = checkpoint
    return lhf.load_llava(path)


def test_config_from_checkpoint(loaded):
    _, cfg = loaded
    assert cfg.vision == VisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        use_head=False,
    )
    assert (cfg.text.d_model, cfg.text.num_layers, cfg.text.vocab_size) == (32, 2, V)
    assert (cfg.image_token_id, cfg.vision_feature_layer, cfg.image_tokens) == (IMAGE, -2, 16)


def test_logits_match_transformers(checkpoint, loaded):
    ref, _ = checkpoint
    model, _ = loaded
    tokens, pixels = _inputs()
    want, got = _torch_logits(ref, tokens, pixels), _run(model, tokens, pixels)
    assert got.shape == (2, T, V)
    diff = float(np.abs(got - want).max())
    print("max abs logit diff vs transformers:", diff)
    assert diff < TOL
    # The images matter: other pixels change the logits after (not before) the placeholders.
    other = _run(model, tokens, pixels[::-1].copy())
    assert np.abs(other[0, :2] - got[0, :2]).max() < 1e-6 and np.abs(other[0, 18:] - got[0, 18:]).max() > 1e-3


def test_hf_load_pretrained_and_engine_greedy_equal_transformers_generate(checkpoint):
    """``llmarch.hf.load_pretrained`` dispatches a LLaVA directory; the ``Engine`` serving it
    (image features at prefill, paged decode) generates transformers' greedy tokens."""
    from llmarch import hf
    from llmarch.inference import Engine, SamplingParams
    from llmarch.vision.llava import Llava

    ref, path = checkpoint
    model, cfg = hf.load_pretrained(path)
    assert isinstance(model, Llava) and cfg.image_token_id == IMAGE
    tokens, pixels = _inputs()
    prompt, image = tokens[1, :36], pixels[1:]  # its 16 placeholders from position 20
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.from_numpy(prompt[None]).long(),
            pixel_values=torch.from_numpy(image),
            max_new_tokens=8,
            do_sample=False,
        )
    want = out[0, len(prompt) :].tolist()
    engine = Engine(model, page_size=8, max_prefill_chunk=16, max_num_batched_tokens=64)
    got = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0), images=[image])
    assert got[0].token_ids == want


def test_default_strategy_and_last_layer_from_a_state_dict():
    """HF's "default" drops each image's first token (15 placeholders of 16 patches); layer -1 is the
    last block's output before the final LayerNorm. A transformers 5 state dict (model.* names)."""
    ref = _torch_model(seed=1, vision_feature_select_strategy="default", vision_feature_layer=-1)
    model, cfg = lhf.load_llava(ref.state_dict(), config=ref.config.to_dict())
    assert cfg.image_tokens == 15 and cfg.vision_feature_layer == -1
    tokens, pixels = _inputs(P=15, seed=1)
    assert np.abs(_run(model, tokens, pixels) - _torch_logits(ref, tokens, pixels)).max() < TOL


def test_save_round_trip_loads_in_transformers(checkpoint, loaded, tmp_path):
    ref, _ = checkpoint
    model, _ = loaded
    lhf.save_llava(model, tmp_path)
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    want = {k: v for k, v in ref.state_dict().items() if ".vision_tower.head." not in k}
    got = back.state_dict()
    assert got.keys() == want.keys()  # no MAP head: vision_use_head is false
    for name, w in want.items():
        assert np.array_equal(got[name].numpy(), w.numpy()), name
    again, cfg = lhf.load_llava(tmp_path)
    assert cfg == model.cfg.replace(text=model.cfg.text.replace(name=tmp_path.name))
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model)), strict=True):
        assert np.array_equal(a, b)


def test_loading_on_a_mesh_equals_single_device(devices, checkpoint, loaded):
    """Born sharded under fsdp_tp (tower, projector and decoder), with the batch over fsdp."""
    _, path = checkpoint
    tokens, pixels = (np.concatenate([x, x[::-1]]) for x in _inputs())  # 4 rows, 4 images
    want = _run(loaded[0], tokens, pixels)
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    with sharding.use(mesh, "fsdp_tp"):
        model, _ = lhf.load_llava(path)
        assert model.projector.linear_2.w.get_value().sharding.spec == P("tensor", "fsdp")
        batch = [
            jax.device_put(x, sharding.batch_sharding(mesh, "fsdp_tp", ndim=x.ndim)) for x in (tokens, pixels)
        ]
        check_inputs(model.cfg, tokens, pixels)
        graphdef, state = nnx.split(model)
        got = jax.jit(lambda state, t, x: nnx.merge(graphdef, state)(t, images=x))(state, *batch)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_decoder_embeddings_hook(loaded):
    """``Transformer(tokens, embeddings=)`` runs the decoder from given input embeddings."""
    decoder = loaded[0].language_model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, IMAGE, (2, 8)), jnp.int32)
    graphdef, state = nnx.split(decoder)

    def run(state, tokens):
        model = nnx.merge(graphdef, state)
        x = model.embed.encode(tokens, jnp.float32)  # [B,T,D]
        return model(tokens), model(tokens, embeddings=x), model(tokens, embeddings=2 * x)

    plain, same, doubled = jax.jit(run)(state, tokens)
    np.testing.assert_array_equal(same, plain)
    assert np.abs(doubled - plain).max() > 1e-3  # the embeddings given are the ones used
    # Text alone (no placeholders, images=None) is the decoder's own forward pass.
    np.testing.assert_allclose(loaded[0](tokens), plain, atol=1e-6)
    with pytest.raises(ValueError, match=r"embeddings has shape \(2, 7, 32\): expected \[B, T, d_model\]"):
        decoder(tokens, embeddings=jnp.zeros((2, 7, 32)))


@pytest.mark.parametrize(
    "case, match",
    [
        ("size", r"pixel_values is 24x24 pixels"),
        ("channels", r"pixel_values has 1 channels"),
        (
            "more_images",
            r"tokens hold 32 image placeholders \(id 120\) for 3 images: each image needs exactly 16",
        ),
        ("no_image_for_placeholder", r"tokens hold 32 image placeholders \(id 120\) for 1 images"),
        ("no_placeholders", r"tokens hold 0 image placeholders \(id 120\) for 2 images"),
        ("images_none", r"tokens hold 32 image placeholders \(id 120\) but images=None"),
    ],
)
def test_bad_inputs_raise_one_line_before_compiling(loaded, case, match):
    model, _ = loaded
    tokens, pixels = _inputs()
    images = {
        "size": np.zeros((2, 3, 24, 24), np.float32),
        "channels": np.zeros((2, 1, 32, 32), np.float32),
        "more_images": np.concatenate([pixels, pixels[:1]]),
        "no_image_for_placeholder": pixels[:1],
        "no_placeholders": pixels,
        "images_none": None,
    }[case]
    if case == "no_placeholders":
        tokens = np.where(tokens == IMAGE, 0, tokens)
    with pytest.raises(ValueError, match=match) as e:
        model(jnp.asarray(tokens), images=None if images is None else jnp.asarray(images))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_token_id", V, r"LlavaConfig.image_token_id=128 is invalid: must be an integer in \[0, 127\]"),
        (
            "vision_feature_layer",
            3,
            r"LlavaConfig.vision_feature_layer=3 is invalid: must be an integer in \[-3, 2\]",
        ),
        (
            "vision_feature_select_strategy",
            "cls",
            r"vision_feature_select_strategy='cls' is invalid: must be one of",
        ),
        ("projector_activation", "relu", r"LlavaConfig.projector_activation='relu' is invalid"),
        ("projector_bias", 1, r"LlavaConfig.projector_bias=1 is invalid: must be True or False"),
    ],
)
def test_config_errors_name_field_value_and_allowed(loaded, field, value, match):
    _, cfg = loaded
    with pytest.raises(ValueError, match=match):
        cfg.replace(**{field: value})


def test_unsupported_checkpoints_are_named(checkpoint, loaded):
    ref, _ = checkpoint
    _, cfg = loaded
    with pytest.raises(ValueError, match=r"vision.use_head=True is invalid"):
        cfg.replace(vision=cfg.vision.replace(use_head=True))
    hf = ref.config.to_dict()
    with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\] is not supported"):
        lhf.config_from_hf({**hf, "vision_feature_layer": [-2, -1]})
    clip = {**hf, "vision_config": {**hf["vision_config"], "model_type": "clip_vision_model"}}
    with pytest.raises(ValueError, match=r"model_type='clip_vision_model' is not supported"):
        lhf.config_from_hf(clip)
    state = dict(ref.state_dict())
    state["model.multi_modal_projector.extra.weight"] = state.pop("model.multi_modal_projector.linear_2.bias")
    with pytest.raises(ValueError, match=r"missing \[linear_2.bias\]; unexpected \[extra.weight\]"):
        lhf.load_llava(state, config=cfg)
    with pytest.raises(ValueError, match=r"tensors that are no part of a LLaVA model: \[stray.weight\]"):
        lhf.load_llava({**ref.state_dict(), "stray.weight": torch.zeros(1)}, config=cfg)
