"""The image+text grain pipeline for captioning: ``{"image", "caption"}`` records -> LLaVA batches.

Each record becomes one row of ``seq_len`` next-token pairs over the sequence::

    BOS  <image> x P  prompt  caption  EOS  PAD ...

(``CaptionFormat(bos=False)`` leaves the BOS out, so a prompt written as text reproduces the prefix.)
``inputs`` and ``targets`` are that sequence and its shift by one; ``mask`` is 1 exactly where the
target is a caption token or the EOS that ends it (never a placeholder, the prompt or padding), so the
loss trains the model to describe the image and to stop. ``pixel_values`` is the image as the SigLIP
processor gives it: ``float32 [C, H, W]``, ``x / 255`` normalized by mean 0.5 and std 0.5 to [-1, 1].
The ``P`` placeholders are ``image_token_id``, one id past the text tokenizer's (``Llava`` writes the
projected image features over them), so no text can ever produce one.

At train time only (``train=True``), and before normalizing, images are augmented in ways that keep
the caption true (``CaptionAugment``): a left-right mirror that also swaps the words "left" and
"right" in the caption (a mirrored image of "a red circle on the left" shows one on the right; the
shapes are all left-right symmetric, so their names hold) and re-orders it into the slot order the
set's captions always use (else the order would stop being a function of the image), a small
rotation (a few degrees move no shape out of its slot, see ``llmarch.data.shapes``) and small
Gaussian pixel noise. A vertical flip
is left out: it would turn triangles upside down, which no caption word says.

Like ``llmarch.data.pipeline``, everything before the iterator is a ``grain.MapDataset`` (random
access, shuffled per epoch by seed), so the iterator's ``get_state``/``set_state`` resume exactly,
augmentation included (its draws are seeded by the element's index).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llmarch.checks import check_int, check_number, fail
from llmarch.data.augment_image import ImageAugment, gaussian_noise, random_rotate
from llmarch.data.shapes import mirror_caption
from llmarch.data.tokenizer import Tokenizer

PROMPT = "Caption: "
# SigLIP's image processor: rescale by 1/255, then (x - 0.5) / 0.5 per channel.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def normalize_pixels(
    image: np.ndarray, mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD
) -> np.ndarray:
    """``uint8 [H, W, C]`` -> ``float32 [C, H, W]``, ``(image / 255 - mean) / std`` per channel."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}: allowed is a rank-3 [H, W, C] array")
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # [H, W, C]
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [C, H, W]


@dataclasses.dataclass(frozen=True)
class FlipLeftRight(grain.transforms.RandomMap):
    """Mirror ``record["image"] [H, W, C]`` left-right with probability ``p`` and swap "left" and
    "right" in ``record["caption"]`` (``shapes.mirror_caption``, which also restores a shapes
    caption's canonical slot order), so the caption stays true and stays a function of the image."""

    p: float = 0.5

    def __post_init__(self):
        check_number("FlipLeftRight", "p", self.p, "must be in [0, 1]", lambda v: 0 <= v <= 1)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() >= self.p:
            return element
        return {
            **element,
            "image": np.ascontiguousarray(element["image"][:, ::-1]),
            "caption": mirror_caption(element["caption"]),
        }


@dataclasses.dataclass(frozen=True)
class CaptionAugment:
    """Train-time augmentations that keep a shapes caption true (see the module docstring).

    Attributes:
      flip_p: probability of the left-right mirror with the caption's "left"/"right" swapped.
      max_degrees: rotation drawn uniformly from ``[-max_degrees, max_degrees]`` (0: none); at most
        15, beyond which shapes can leave their slot and squares read as diamonds.
      noise_std: Gaussian pixel noise, in uint8 levels (0: none).
      fill: the grey level of the corners a rotation uncovers (the dataset's background).
    """

    flip_p: float = 0.5
    max_degrees: float = 5.0
    noise_std: float = 6.0
    fill: int = 0

    def __post_init__(self):
        owner = "CaptionAugment"
        check_number(owner, "flip_p", self.flip_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        check_number(owner, "max_degrees", self.max_degrees, "must be in [0, 15]", lambda v: 0 <= v <= 15)
        check_number(owner, "noise_std", self.noise_std, "must be in [0, 64]", lambda v: 0 <= v <= 64)
        check_int(owner, "fill", self.fill, low=0, high=255)

    def image_ops(self) -> tuple:
        """The pixel-only ops, for ``ImageAugment`` (the flip lives in ``FlipLeftRight``)."""
        ops = []
        if self.max_degrees > 0:
            ops.append(functools.partial(random_rotate, max_degrees=self.max_degrees, fill=float(self.fill)))
        if self.noise_std > 0:
            ops.append(functools.partial(gaussian_noise, std=self.noise_std))
        return tuple(ops)


@dataclasses.dataclass(frozen=True)
class CaptionFormat:
    """How a record is laid out as a row (see the module docstring); checked against the tokenizer.

    Attributes:
      image_token_id: the placeholder id; at least ``tokenizer.vocab_size`` (no text id may equal it)
        and below ``model_vocab_size`` (``LlavaConfig.image_token_id``).
      image_tokens: placeholders per image (``LlavaConfig.image_tokens``).
      seq_len: T, the row length; a record that does not fit is a ValueError, never truncated.
      prompt: the text between the image and the caption.
      bos: whether rows start with the tokenizer's BOS (False: with the placeholders, so a prompt
        written as text, ``"<image>Caption: "``, is the training prefix exactly).
    """

    image_token_id: int
    image_tokens: int
    seq_len: int
    prompt: str = PROMPT
    bos: bool = True

    def __post_init__(self):
        check_int("CaptionFormat", "image_token_id", self.image_token_id, low=0)
        check_int("CaptionFormat", "image_tokens", self.image_tokens)
        check_int("CaptionFormat", "seq_len", self.seq_len, low=self.image_tokens + 2)
        if not isinstance(self.prompt, str):
            fail("CaptionFormat", "prompt", self.prompt, "must be a str")
        if not isinstance(self.bos, bool):
            fail("CaptionFormat", "bos", self.bos, "must be True or False")

    def check(self, tokenizer: Tokenizer, model_vocab_size: int | None = None) -> None:
        """ValueError unless the placeholder is outside the tokenizer's ids and inside the model's."""
        if self.image_token_id < tokenizer.vocab_size:
            fail(
                "CaptionFormat",
                "image_token_id",
                self.image_token_id,
                f"must be >= the tokenizer's vocab_size={tokenizer.vocab_size}, so no text encodes to it",
            )
        if model_vocab_size is not None and self.image_token_id >= model_vocab_size:
            fail(
                "CaptionFormat",
                "image_token_id",
                self.image_token_id,
                f"must be < the model's vocab_size={model_vocab_size} (it is an embedding row)",
            )

    def prefix(self, tokenizer: Tokenizer) -> np.ndarray:
        """``int32 [1 + P + len(prompt)]``: BOS (when ``bos``), the placeholders and the prompt; what
        a captioner is given, and what precedes the caption in every training row."""
        placeholders = np.full(self.image_tokens, self.image_token_id, np.int32)
        bos = [tokenizer.bos_id] if self.bos else []
        return np.concatenate([bos, placeholders, tokenizer.encode(self.prompt)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class EncodeCaption(grain.transforms.Map):
    """``{"image": uint8 [H, W, C], "caption": str}`` -> the row dict of the module docstring."""

    tokenizer: Any
    fmt: CaptionFormat

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        tok, T = self.tokenizer, self.fmt.seq_len
        prefix = self.fmt.prefix(tok)
        caption = tok.encode(element["caption"], eos=True)
        seq = np.concatenate([prefix, caption])
        if len(seq) - 1 > T:
            fail(
                "CaptionFormat",
                "seq_len",
                T,
                f"the record needs {len(seq) - 1} positions (prefix {len(prefix)}, caption and EOS "
                f"{len(caption)}): use a larger seq_len",
            )
        n = len(seq) - 1
        row = {
            "inputs": np.full(T, tok.pad_id, np.int32),
            "targets": np.full(T, tok.pad_id, np.int32),
            "mask": np.zeros(T, np.int32),
        }
        row["inputs"][:n], row["targets"][:n] = seq[:-1], seq[1:]
        row["mask"][len(prefix) - 1 : n] = 1  # targets from the caption's first token to its EOS
        row["pixel_values"] = normalize_pixels(element["image"])
        return row


def caption_dataset(
    source: Any,
    tokenizer: Tokenizer,
    fmt: CaptionFormat,
    *,
    batch_size: int,
    train: bool,
    augment: CaptionAugment | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
    model_vocab_size: int | None = None,
) -> grain.MapDataset:
    """The ``MapDataset`` of batches: ``inputs``, ``targets``, ``mask`` int32 ``[B, T]`` and
    ``pixel_values`` float32 ``[B, C, H, W]``.

    Args:
      source: random-access records ``{"image": uint8 [H, W, C], "caption": str}`` (``len``, ``[]``),
        e.g. ``llmarch.data.shapes.ShapesDataset``.
      tokenizer, fmt: the text tokenizer and the row layout (``fmt.check`` is run here).
      batch_size: rows per batch; a last partial batch is dropped.
      train: augment (with ``augment``, default ``CaptionAugment()``) and shuffle; False (evaluation)
        reads the records as they are, in order.
      augment: the train-time augmentations; ignored when ``train`` is False.
      seed: seeds the shuffle and the augmentations, in [0, 2**32).
      shuffle: default ``train``.
      num_epochs: passes over the records; None: forever when ``train``, once otherwise (an
        evaluation reads each record once).
      model_vocab_size: the decoder's vocabulary, to check ``fmt.image_token_id`` against.
    """
    fmt.check(tokenizer, model_vocab_size)
    check_int("", "batch_size", batch_size)
    if batch_size > len(source):
        fail("", "batch_size", batch_size, f"must be <= the {len(source)} records of the source")
    check_int("", "seed", seed, low=0, high=2**32 - 1)
    if num_epochs is not None:
        check_int("", "num_epochs", num_epochs)
    if augment is not None and not isinstance(augment, CaptionAugment):
        fail("", "augment", augment, "must be a CaptionAugment or None")
    ds = grain.MapDataset.source(source)
    if train if shuffle is None else shuffle:
        ds = ds.shuffle(seed)  # reshuffled per epoch by the index's epoch
    ds = ds.repeat(num_epochs if num_epochs is not None or train else 1)
    if train:
        aug = CaptionAugment() if augment is None else augment
        if aug.flip_p > 0:
            ds = ds.random_map(FlipLeftRight(aug.flip_p), seed=seed)
        if aug.image_ops():
            ds = ds.random_map(ImageAugment(aug.image_ops()), seed=seed + 1 if seed < 2**32 - 1 else 0)
    ds = ds.map(EncodeCaption(tokenizer, fmt))
    return ds.batch(batch_size, drop_remainder=True)


def caption_batches(
    source: Any,
    tokenizer: Tokenizer,
    fmt: CaptionFormat,
    *,
    batch_size: int,
    train: bool,
    prefetch: int = 2,
    **kwargs: Any,
) -> grain.DatasetIterator:
    """An iterator over ``caption_dataset(...)``'s batches with exact ``get_state``/``set_state``;
    ``prefetch`` batches are prepared ahead by threads (0: in the calling thread)."""
    check_int("", "prefetch", prefetch, low=0)
    ds = caption_dataset(source, tokenizer, fmt, batch_size=batch_size, train=train, **kwargs)
    options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
