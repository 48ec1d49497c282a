"""An image file (or array) as a vision tower's ``pixel_values``: resized to the tower's square size,
rescaled to [0, 1] and normalized per channel, as transformers' image processors do for SigLIP and
CLIP. ``ImageProcessing.from_checkpoint`` reads a checkpoint's ``preprocessor_config.json``
(``image_mean``, ``image_std``, ``rescale_factor``, ``resample``) when it has one; without one,
SigLIP's settings (mean = std = 0.5, bicubic).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from llmarch.checks import check_choice, fail
from llmarch.json_config import read_json
from llmarch.vision.config import VisionConfig

PREPROCESSOR_FILE = "preprocessor_config.json"
# The most pixels an image may have before it is decoded (PIL reads the size from the header first):
# a few KB of PNG can hold 179M pixels, about half a GB decoded, which one request must not cost.
MAX_PIXELS = 40_000_000
# PIL's resampling filters by name, and the integer codes transformers stores in `resample`.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """How an image becomes ``pixel_values [C, size, size]`` float32: ``resize`` with ``resample``,
    multiply by ``rescale``, then ``(x - mean) / std`` per channel."""

    size: int
    num_channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255
    resample: str = "bicubic"

    def __post_init__(self):
        if self.num_channels not in (1, 3):
            fail("ImageProcessing", "num_channels", self.num_channels, "allowed: 1 (grey) or 3 (RGB)")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if len(value) != self.num_channels:
                fail("ImageProcessing", field, value, f"needs one value per channel ({self.num_channels})")
        if not all(s > 0 for s in self.std):
            fail("ImageProcessing", "std", self.std, "every value must be > 0")
        check_choice("ImageProcessing", "resample", self.resample, tuple(RESAMPLE))

    @classmethod
    def for_tower(cls, cfg: VisionConfig, root: str | os.PathLike | None = None) -> ImageProcessing:
        """The tower's size and channels; the rest from ``root``'s ``preprocessor_config.json``
        when it has one, else SigLIP's defaults."""
        kw: dict[str, Any] = dict(size=cfg.image_size, num_channels=cfg.num_channels)
        path = None if root is None else Path(root) / PREPROCESSOR_FILE
        if path is not None and path.is_file():
            data = read_json(path)
            try:
                for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
                    if theirs in data:
                        kw[ours] = tuple(float(v) for v in data[theirs])
                if "rescale_factor" in data:
                    kw["rescale"] = float(data["rescale_factor"])
                if "resample" in data:
                    names = {code: name for name, code in RESAMPLE.items()}
                    if data["resample"] not in names:
                        raise ValueError(f"resample={data['resample']!r} is not a PIL filter code 0-5")
                    kw["resample"] = names[data["resample"]]
                return cls(**kw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from None
        return cls(**kw)

    def __call__(self, image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
        """``pixel_values [C, size, size]`` float32 of an image file, a PIL image, or a ``[H, W, C]``
        (or ``[H, W]``) uint8 array.

        Raises:
          FileNotFoundError: no such file.
          ValueError: naming the file, for one that is not an image; for an array of another shape
            or dtype.
        """
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.exists():
                raise FileNotFoundError(f"image {path} does not exist")
            if not path.is_file():
                raise ValueError(f"image {path} is not a file: give an image file")
            image = _decode(lambda: Image.open(path), f"image {path}")
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"image array has shape {image.shape} and dtype {image.dtype}: expected [H, W] or "
                    "[H, W, C] uint8 (a file or PIL image works too)"
                )
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise ValueError(
                f"image is a {type(image).__name__}: expected a path, a PIL image or a uint8 array"
            )
        image = image.convert("RGB" if self.num_channels == 3 else "L")
        image = image.resize((self.size, self.size), resample=RESAMPLE[self.resample])
        x = np.asarray(image, np.float32).reshape(self.size, self.size, self.num_channels) * self.rescale
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # [C,H,W]


def decode_data_url(url: str) -> Image.Image:
    """The image of an inline ``data:image/...;base64,...`` URL (what OpenAI's ``image_url`` parts
    carry). Other URLs are refused: nothing is fetched.

    Raises:
      ValueError: a URL that is not an inline base64 data URL, or whose bytes are not an image.
    """
    if not url.startswith("data:"):
        raise ValueError(
            f"image URL {url[:60]!r} is not read: only inline data: URLs (data:image/png;base64,...) "
            "are, this server fetches nothing"
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"image data URL {header[:60]!r}... must be base64: data:<type>;base64,<bytes>")
    if not header.startswith("data:image/"):
        raise ValueError(
            f"data URL {header[:60]!r}... is not an image: expected data:image/<type>;base64,..."
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ValueError(f"image data URL {header[:60]!r}... does not hold a readable image: {e}") from None
    return _decode(lambda: Image.open(io.BytesIO(raw)), f"image data URL {header[:60]!r}...")


def _decode(open_image, what: str) -> Image.Image:
    """The decoded image ``open_image()`` opens, its size checked against ``MAX_PIXELS`` before any
    pixel is decoded; a one-line ValueError naming ``what`` for anything unreadable or too large."""
    try:
        with open_image() as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"{what} is {width}x{height} pixels: more than the {MAX_PIXELS:,} allowed (MAX_PIXELS)"
                )
            return opened.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} cannot be read as an image: {e}") from None
