"""The serving engine on a vision-language model (``Engine(llava)``): greedy tokens equal a full
forward of ``Llava`` with the same images, through chunked prefill and the prefix cache (whose pages
must be keyed by the images: two requests with the same placeholder tokens and different images
share nothing), and bad image inputs fail one line before anything runs."""

import jax
import numpy as np
import pytest
from flax import nnx

from llmarch import presets
from llmarch.inference import Engine, SamplingParams
from llmarch.vision import VisionConfig
from llmarch.vision.llava import Llava, LlavaConfig

IMAGE = 319  # the placeholder id: the last of tiny-dense's 320
NEW = 6  # tokens generated per request


@pytest.fixture(scope="module")
def llava():
    # init_std 0.2: decisive logits, so greedy ties cannot flip between the paged and full forward
    text = presets.get("tiny-dense").replace(init_std=0.2)
    vision = VisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        use_head=False,
        init_std=0.2,
    )
    return Llava(LlavaConfig(vision=vision, text=text, image_token_id=IMAGE), rngs=nnx.Rngs(0))


def _prompt(offset=0):
    """Text, one image's 4 placeholders, text: 13 tokens."""
    rng = np.random.default_rng(offset)
    return [*rng.integers(0, IMAGE, 3).tolist(), *[IMAGE] * 4, *rng.integers(0, IMAGE, 6).tolist()]


def _pixels(seed):
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(llava):
    """Greedy tokens of a full (cache-free) forward of the whole model, recomputed per token."""
    graphdef, state = nnx.split(llava)
    forward = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, images=p)[0, -1].argmax())

    def run(prompt, pixels):
        tokens = list(prompt)
        for _ in range(NEW):
            tokens.append(int(forward(state, np.asarray(tokens, np.int32)[None], pixels)))
        return tokens[len(prompt) :]

    return run


GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0)


def test_greedy_tokens_match_the_full_forward_through_chunked_prefill(llava, reference):
    engine = Engine(llava, page_size=4, max_prefill_chunk=3, max_num_seqs=4, enable_prefix_caching=False)
    prompts = [_prompt(0), _prompt(1)]
    pixels = [_pixels(0), _pixels(1)]
    outs = engine.generate(prompts, GREEDY, images=pixels)
    want = [reference(p, x) for p, x in zip(prompts, pixels, strict=True)]
    assert [o.token_ids for o in outs] == want
    other = reference(prompts[0], _pixels(7))
    assert other != want[0], "the images must change the tokens, or this test checks nothing"


def test_prefix_cache_keys_pages_by_the_images(llava, reference):
    engine = Engine(llava, page_size=4, max_num_seqs=4, enable_prefix_caching=True)
    prompt = _prompt(2)
    first = engine.generate([prompt], GREEDY, images=[_pixels(3)])[0].token_ids
    hits = engine.stats["prefix_cache_hit_tokens"]
    # The same tokens with another image: nothing may be reused.
    second = engine.generate([prompt], GREEDY, images=[_pixels(4)])[0].token_ids
    assert engine.stats["prefix_cache_hit_tokens"] == hits
    assert first == reference(prompt, _pixels(3))
    assert second == reference(prompt, _pixels(4))
    # The same tokens and image again: its full pages are found.
    again = engine.generate([prompt], GREEDY, images=[_pixels(3)])[0].token_ids
    assert engine.stats["prefix_cache_hit_tokens"] > hits
    assert again == first


def test_text_requests_still_run_beside_image_ones(llava):
    engine = Engine(llava, page_size=4, max_num_seqs=4)
    text = [5, 6, 7, 8, 9]
    alone = Engine(llava.language_model, page_size=4).generate([text], GREEDY)[0].token_ids
    outs = engine.generate([text, _prompt(0)], GREEDY, images=[None, _pixels(0)])
    assert outs[0].token_ids == alone


@pytest.mark.parametrize(
    "prompt, images, match",
    [
        (_prompt(0), None, "holds 4 image placeholders .id 319. but no images were given"),
        (_prompt(0), np.zeros((2, 3, 16, 16), np.float32), "for 2 images"),
        (_prompt(0), np.zeros((1, 3, 8, 8), np.float32), "8x8 pixels"),
        (_prompt(0), np.zeros((1, 3, 16, 16), np.uint8), "dtype uint8"),
        (_prompt(0), np.full((1, 3, 16, 16), np.nan, np.float32), "non-finite"),
    ],
)
def test_bad_images_raise_one_line_and_change_nothing(llava, prompt, images, match):
    engine = Engine(llava, page_size=4)
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, GREEDY, images=images)
    assert not engine.has_unfinished() and not engine.requests


def test_images_for_a_text_model_or_the_wrong_count_are_refused(llava):
    with pytest.raises(ValueError, match="no vision tower"):
        Engine(llava.language_model, page_size=4).add_request([1, 2], GREEDY, images=_pixels(0))
    with pytest.raises(ValueError, match="images has 1 entries for 2 prompts"):
        Engine(llava, page_size=4).generate([[1], [2]], GREEDY, images=[_pixels(0)])


@pytest.fixture(scope="module")
def llava_dir(llava, tmp_path_factory):
    from llmarch.vision.llava_hf import save_llava

    path = tmp_path_factory.mktemp("llava")
    save_llava(llava, path)
    return path


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)).save(path)
    return path


def test_cli_generate_with_an_image_equals_the_engine(llava, llava_dir, png, capsys):
    from llmarch import cli
    from llmarch.vision.preprocess import ImageProcessing

    argv = ["generate", "--checkpoint", str(llava_dir), "--prompt-ids", "5,6,319,7", "--image", str(png)]
    assert cli.main([*argv, "--max-tokens", str(NEW), "--temperature", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    printed = [int(t) for t in line.split(") ")[1].split()]
    pixels = ImageProcessing.for_tower(llava.cfg.vision)(png)  # SigLIP's defaults: no processor file
    prompt = [5, 6, *[IMAGE] * 4, 7]  # the one <image> expanded to the tower's 4 tokens
    assert printed == Engine(llava, page_size=4).generate([prompt], GREEDY, images=[pixels])[0].token_ids
    # One-line errors: a prompt without its placeholder, an unreadable image, two prompts.
    assert (
        cli.main(["generate", "--checkpoint", str(llava_dir), "--prompt-ids", "5,6", "--image", str(png)])
        == 2
    )
    assert "holds 0 image placeholders (id 319) for 1 images" in capsys.readouterr().err
    assert cli.main([*argv[:-1], str(llava_dir / "config.json")]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    assert cli.main([*argv, "--prompt-ids", "1"]) == 2
    assert "exactly one prompt" in capsys.readouterr().err


def test_text_only_readers_refuse_a_llava_checkpoint(llava_dir):
    from llmarch.inference.loading import load_for_inference

    with pytest.raises(ValueError, match="vision-language .LLaVA. checkpoint"):
        load_for_inference(llava_dir)


def test_preprocessing_equals_transformers_siglip_processor(png):
    transformers = pytest.importorskip("transformers")
    from llmarch.vision.preprocess import ImageProcessing

    theirs = transformers.SiglipImageProcessor(size={"height": 16, "width": 16})
    want = theirs(images=__import__("PIL.Image").Image.open(png), return_tensors="np")["pixel_values"][0]
    ours = ImageProcessing.for_tower(VisionConfig(image_size=16, patch_size=8, use_head=False))(png)
    np.testing.assert_allclose(ours, want, atol=1e-5)
    with pytest.raises(ValueError, match="resample"):
        ImageProcessing(size=16, resample="cubic")


def _data_url(path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_chat_server_takes_image_url_parts(llava, png):
    """`/v1/chat/completions` with an inline image equals the engine on the same ids and pixels."""
    from PIL import Image
    from starlette.testclient import TestClient

    from llmarch.data.chat_template import ChatTemplate
    from llmarch.data.tokenizer import BPETokenizer
    from llmarch.serve import create_app
    from llmarch.vision.preprocess import ImageProcessing

    hf = BPETokenizer.train(["a picture of shapes and colours, " * 20], 300).hf_tokenizer
    hf.add_special_tokens(["<image>"])
    tok = BPETokenizer(hf)
    image_id = hf.token_to_id("<image>")
    # The fixture's weights (same seed, same shapes) with the tokenizer's placeholder id.
    model = Llava(llava.cfg.replace(image_token_id=image_id), rngs=nnx.Rngs(0))
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}", tok)
    engine = Engine(model, tokenizer=tok, page_size=4, max_num_seqs=2)
    content = [
        {"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": _data_url(png)}},
    ]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": NEW, "temperature": 0.0}
    with TestClient(create_app(engine, chat_template=template, stop_token_ids=())) as http:
        r = http.post("/v1/chat/completions", json={**body, "return_token_ids": True})
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["token_ids"]
        for url, match in [
            ("https://example.com/cat.png", "fetches nothing"),
            ("data:image/png;base64,not-base64!", "does not hold a readable image"),
            ("data:image/png,rawbytes", "must be base64"),
        ]:
            content[1] = {"type": "image_url", "image_url": {"url": url}}
            bad = http.post("/v1/chat/completions", json=body)
            assert bad.status_code == 400 and match in bad.json()["error"]["message"], bad.text
    ids = template.encode([{"role": "user", "content": "what is it\n<image>"}])
    ids = [t for i in ids for t in ([i] * 4 if i == image_id else [i])]
    pixels = ImageProcessing.for_tower(model.cfg.vision)(Image.open(png))
    reference = Engine(model, tokenizer=tok, page_size=4).generate([ids], GREEDY, images=[pixels])
    assert served == reference[0].token_ids


def test_image_parts_for_a_text_model_are_refused():
    from llmarch.serve.protocol import ChatMessage

    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    message = ChatMessage(role="user", content=[{"type": "text", "text": "hi"}, part])
    with pytest.raises(ValueError, match="takes no images"):
        message.text()
    assert message.text("<image>") == "hi\n<image>"


def test_hostile_images_are_refused_in_one_line(tmp_path, llava):
    """A few-KB PNG of 400M pixels (a decompression bomb), a directory, a non-image data URL, and
    pixel values that only overflow in float32 are refused before anything decodes or compiles."""
    from PIL import Image

    from llmarch.vision.preprocess import ImageProcessing, decode_data_url

    big, bomb = tmp_path / "big.png", tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(big, optimize=True)  # over our cap, under PIL's
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)  # over PIL's own bomb limit
    process = ImageProcessing(size=16)
    with pytest.raises(ValueError, match="8000x8000 pixels: more than the 40,000,000 allowed"):
        process(big)
    with pytest.raises(ValueError, match="cannot be read as an image: .*decompression bomb"):
        process(bomb)
    with pytest.raises(ValueError, match="is not a file"):
        process(tmp_path)
    png = "data:image/png;base64," + __import__("base64").b64encode(big.read_bytes()).decode()
    with pytest.raises(ValueError, match="8000x8000 pixels"):
        decode_data_url(png)
    with pytest.raises(ValueError, match="is not an image"):
        decode_data_url(png.replace("data:image/png", "data:text/plain"))
    engine = Engine(llava, page_size=4)
    huge = np.full((1, 3, 16, 16), 1e300, np.float64)
    with pytest.raises(ValueError, match=r"non-finite pixel values \(in float32\)"):
        engine.add_request(_prompt(0), GREEDY, images=huge)
