"""llmarch.data.shapes (the synthetic captioning set) and llmarch.data.image_text (its grain pipeline):
determinism, captions that the pixels bear out, the row layout and its loss mask, train-only and
caption-preserving augmentation, resumption, and config errors naming the field."""

import numpy as np
import pytest

from llmarch.data import ByteTokenizer
from llmarch.data.image_text import (
    CaptionAugment,
    CaptionFormat,
    FlipLeftRight,
    caption_batches,
    caption_dataset,
    normalize_pixels,
)
from llmarch.data.shapes import (
    CENTRES,
    COLORS,
    POSITIONS,
    Shape,
    ShapesConfig,
    ShapesDataset,
    caption,
    mirror_caption,
    parse_caption,
)

TOK = ByteTokenizer()
IMAGE_ID = TOK.vocab_size  # 259: the first id no text encodes to
P = 16  # placeholders per image (a 32-pixel image in patches of 8)
FMT = CaptionFormat(image_token_id=IMAGE_ID, image_tokens=P, seq_len=128)


def _near(image, position, radius=1):
    """The pixels within ``radius`` of ``position``'s slot centre, ``[k, 3]``."""
    n = image.shape[0]
    fy, fx = CENTRES[position]
    y, x = int(fy * n), int(fx * n)
    return image[y - radius : y + radius + 1, x - radius : x + radius + 1].reshape(-1, 3).astype(int)


def _check_consistent(image, text, background=0, tol=0):
    """Each slot the caption names shows its colour at the slot's centre; the others are background."""
    said = parse_caption(text)
    assert caption([Shape(c, s, p) for p, (c, s) in said.items()]) == text  # the caption parses fully
    for position in POSITIONS:
        pixels = _near(image, position)
        if position in said:
            want = np.asarray(COLORS[said[position][0]])
            assert (np.abs(pixels - want).max(axis=1) <= tol).any(), (position, text)
        else:
            assert (np.abs(pixels - background).max(axis=1) <= tol).all(), (position, text)


def test_deterministic_random_access():
    a, b = ShapesDataset(ShapesConfig(num_examples=50)), ShapesDataset(ShapesConfig(num_examples=50))
    for i in (7, 0, 49, 7):
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert ra["caption"] == rb["caption"]
        assert ra["image"].dtype == np.uint8 and ra["image"].shape == (32, 32, 3)
    other = ShapesDataset(ShapesConfig(num_examples=50, seed=1))
    assert [other[i]["caption"] for i in range(10)] != [a[i]["caption"] for i in range(10)]
    with pytest.raises(IndexError):
        a[50]


@pytest.mark.parametrize("size", [32, 64])
def test_caption_matches_pixels(size):
    cfg = ShapesConfig(image_size=size, num_examples=200, background=30)
    ds = ShapesDataset(cfg)
    counts = set()
    for i in range(len(ds)):
        record = ds[i]
        _check_consistent(record["image"], record["caption"], background=30)
        shapes = ds.shapes(i)
        assert parse_caption(record["caption"]) == {s.position: (s.color, s.shape) for s in shapes}
        counts.add(len(shapes))
    assert counts == {1, 2, 3}


def test_shape_names_follow_geometry():
    """A square fills the corners of its box, a circle does not; a triangle is wider at its base."""
    ds = ShapesDataset(ShapesConfig(image_size=64, num_examples=300, jitter=0.0, min_size=0.12))
    seen = set()
    for i in range(len(ds)):
        record, shapes = ds[i], ds.shapes(i)
        for s in shapes:
            fy, fx = CENTRES[s.position]
            cy, cx = int(fy * 64), int(fx * 64)
            color = np.asarray(COLORS[s.color])

            def at(dy, dx, image=record["image"], cy=cy, cx=cx, color=color):
                return bool((image[cy + dy, cx + dx] == color).all())

            d = 7  # pixel centres 6.5 or 7.5 off: inside every box of half-extent >= 0.12 * 64 = 7.68
            if s.shape == "square":
                assert at(-d, -d) and at(d, d)
            elif s.shape == "circle":
                assert not at(-d, -d) and not at(d, d) and at(0, d) and at(d, 0)
            else:
                assert at(d, -d) and at(d, d) and not at(-d, -d) and not at(-d, d) and at(1 - d, 0)
            seen.add(s.shape)
    assert seen == {"circle", "square", "triangle"}


def test_caption_grammar():
    one = [Shape("red", "circle", "left")]
    two = [Shape("blue", "square", "top"), Shape("red", "circle", "left")]
    three = [*two, Shape("green", "triangle", "bottom")]
    assert caption(one) == "a red circle on the left"
    assert caption(two) == "a red circle on the left and a blue square at the top"
    assert (
        caption(three)
        == "a red circle on the left, a blue square at the top and a green triangle at the bottom"
    )
    assert parse_caption("a red circle on the left and a blue blob") == {"left": ("red", "circle")}
    assert mirror_caption("a red circle on the left and a blue square on the right") == (
        "a blue square on the left and a red circle on the right"  # the slot order is kept
    )
    assert mirror_caption("a red circle on the left, a blue square at the top") == (
        "a red circle on the right, a blue square at the top"  # not one caption(): words swapped only
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 8),
        ("num_examples", 0),
        ("seed", -1),
        ("min_shapes", 0),
        ("max_shapes", 5),
        ("colors", ("red", "pink")),
        ("colors", ()),
        ("shapes", ("hexagon",)),
        ("background", 256),
        ("min_size", 0.0),
        ("max_size", 0.2),
        ("jitter", 0.05),
        ("jitter", float("nan")),
    ],
)
def test_bad_shapes_config(field, value):
    with pytest.raises(ValueError, match=f"ShapesConfig.{field}="):
        ShapesConfig(**{field: value})


# ---- the pipeline -----------------------------------------------------------------------------------


def _source(n=16, **kw):
    return ShapesDataset(ShapesConfig(num_examples=n, **kw))


def test_rows_and_loss_mask():
    src = _source()
    batch = caption_dataset(src, TOK, FMT, batch_size=4, train=False)[0]
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 128)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == np.float32
    prefix = FMT.prefix(TOK)
    assert prefix[0] == TOK.bos_id and (prefix[1 : 1 + P] == IMAGE_ID).all()
    for r in range(4):
        record = src[r]
        inputs, targets, mask = batch["inputs"][r], batch["targets"][r], batch["mask"][r].astype(bool)
        n = np.flatnonzero(mask)[-1] + 1  # real (input, target) pairs; the last target is EOS
        np.testing.assert_array_equal(inputs[1:n], targets[: n - 1])  # a shift by one
        assert (inputs == IMAGE_ID).sum() == P and not (targets[mask] == IMAGE_ID).any()
        # exactly the caption's tokens and its EOS, contiguous, right after the prompt
        caption_ids = TOK.encode(record["caption"], eos=True)
        np.testing.assert_array_equal(targets[mask], caption_ids)
        idx = np.flatnonzero(mask)
        assert idx[0] == len(prefix) - 1 and (np.diff(idx) == 1).all()
        assert TOK.decode(targets[mask]) == record["caption"]
        np.testing.assert_array_equal(inputs[: len(prefix)], prefix)
        assert (targets[idx[-1] + 1 :] == TOK.pad_id).all()
        # SigLIP normalization: [-1, 1], channels first
        np.testing.assert_array_equal(batch["pixel_values"][r], normalize_pixels(record["image"]))
    np.testing.assert_allclose(normalize_pixels(np.full((2, 2, 3), 255, np.uint8)), 1.0)
    np.testing.assert_allclose(normalize_pixels(np.zeros((2, 2, 3), np.uint8)), -1.0)


def _unnormalize(pixels):
    return np.clip(np.round((pixels.transpose(1, 2, 0) * 0.5 + 0.5) * 255), 0, 255).astype(int)


def test_augmentation_only_at_train_time_and_caption_true():
    src = _source(n=32)
    plain = caption_dataset(src, TOK, FMT, batch_size=32, train=False)[0]
    again = caption_dataset(src, TOK, FMT, batch_size=32, train=False, augment=CaptionAugment(flip_p=1.0))[0]
    for key in plain:  # evaluation ignores augment=
        np.testing.assert_array_equal(plain[key], again[key])
    trained = caption_dataset(src, TOK, FMT, batch_size=32, train=True, shuffle=False, seed=3)[0]
    assert not np.array_equal(trained["pixel_values"], plain["pixel_values"])
    swapped = 0
    for r in range(32):
        mask = trained["mask"][r].astype(bool)
        text = TOK.decode(trained["targets"][r][mask])
        swapped += text != src[r]["caption"]
        assert text in (src[r]["caption"], mirror_caption(src[r]["caption"]))
        # rotation by <= 5 degrees and noise of std 6: the colours stay at their slots
        _check_consistent(_unnormalize(trained["pixel_values"][r]), text, tol=40)
    assert 4 <= swapped <= 28  # flip_p=0.5 over 32 records (some captions have neither side)
    # the same seed gives the same augmented batch; another seed another one
    same = caption_dataset(src, TOK, FMT, batch_size=32, train=True, shuffle=False, seed=3)[0]
    np.testing.assert_array_equal(same["pixel_values"], trained["pixel_values"])
    other = caption_dataset(src, TOK, FMT, batch_size=32, train=True, shuffle=False, seed=4)[0]
    assert not np.array_equal(other["pixel_values"], trained["pixel_values"])


def test_flip_mirrors_image_and_swaps_caption():
    src = _source(n=8)
    flip = FlipLeftRight(p=1.0)
    for i in range(8):
        record = src[i]
        out = flip.random_map(record, np.random.default_rng(0))
        np.testing.assert_array_equal(out["image"], record["image"][:, ::-1])
        assert out["caption"] == mirror_caption(record["caption"])
        _check_consistent(out["image"], caption(_shapes_of(out["caption"])))


def _shapes_of(text):
    return [Shape(c, s, p) for p, (c, s) in parse_caption(text).items()]


def test_iterator_resumes_exactly():
    src = _source(n=16)
    it = caption_batches(src, TOK, FMT, batch_size=4, train=True, seed=5, prefetch=0)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed = caption_batches(src, TOK, FMT, batch_size=4, train=True, seed=5, prefetch=0)
    resumed.set_state(state)
    for a in want:
        b = next(resumed)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CaptionFormat(image_token_id=-1, image_tokens=P, seq_len=128), "image_token_id"),
        (lambda: CaptionFormat(image_token_id=IMAGE_ID, image_tokens=0, seq_len=128), "image_tokens"),
        (lambda: CaptionFormat(image_token_id=IMAGE_ID, image_tokens=P, seq_len=P), "seq_len"),
        (lambda: CaptionAugment(flip_p=1.5), "flip_p"),
        (lambda: CaptionAugment(max_degrees=45.0), "max_degrees"),
        (lambda: CaptionAugment(noise_std=-1.0), "noise_std"),
        (lambda: FlipLeftRight(p=-0.1), "p"),
    ],
)
def test_bad_pipeline_config(make, field):
    with pytest.raises(ValueError, match=f"\\.{field}="):
        make()


def test_bad_pipeline_inputs():
    src = _source(n=4)
    text_id = CaptionFormat(image_token_id=TOK.eos_id, image_tokens=P, seq_len=128)
    with pytest.raises(ValueError, match="image_token_id=258 .*vocab_size=259"):
        caption_dataset(src, TOK, text_id, batch_size=2, train=False)
    with pytest.raises(ValueError, match="image_token_id=259 .*vocab_size=259"):
        caption_dataset(src, TOK, FMT, batch_size=2, train=False, model_vocab_size=259)
    with pytest.raises(ValueError, match="batch_size=8"):
        caption_dataset(src, TOK, FMT, batch_size=8, train=False)
    short = CaptionFormat(image_token_id=IMAGE_ID, image_tokens=P, seq_len=40)
    with pytest.raises(ValueError, match="seq_len=40 .*needs"):
        caption_dataset(src, TOK, short, batch_size=2, train=False)[0]
