"""Image augmentation on ``[H, W, C]`` arrays, in jax.numpy, for vision and multimodal inputs.

Every operation is a pure function of the image (and, when random, a ``jax.random`` key),
jit-able with its size-like arguments static: shapes never depend on a random draw, so one
compilation serves every key. The random ops share the signature ``op(image, key, ...)``;
``ImageAugment`` chains such ops as a grain ``RandomMap`` transform with a seed.

Images keep their dtype: integer images are computed in float32, then rounded and clipped
back to their range (so noise on ``uint8`` saturates at 0 and 255 rather than wrapping).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llmarch.data.augment_text import apply_to_field

__all__ = [
    "ImageAugment",
    "flip_horizontal",
    "flip_vertical",
    "gaussian_noise",
    "random_crop",
    "random_rotate",
    "rotate",
    "scale",
]

ImageOp = Callable[[jax.Array, jax.Array], jax.Array]


def _check_image(image) -> jax.Array:
    image = jnp.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}: allowed is a rank-3 [H, W, C] array")
    return image


def _check_range(name: str, value, low: float, high: float = math.inf) -> float:
    # Parameters are static Python numbers, checked at trace time before any compilation.
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r}: allowed range is [{low}, {high}]")
    return float(value)


def _as_float(image: jax.Array) -> jax.Array:
    return image if jnp.issubdtype(image.dtype, jnp.floating) else image.astype(jnp.float32)


def _like(result: jax.Array, image: jax.Array) -> jax.Array:
    """``result`` in the dtype of ``image``; integer dtypes are rounded and clipped to range."""
    if jnp.issubdtype(image.dtype, jnp.integer):
        info = jnp.iinfo(image.dtype)
        result = jnp.clip(jnp.round(result), info.min, info.max)
    return result.astype(image.dtype)


def _flip(image, key, p: float, axis: int) -> jax.Array:
    image = _check_image(image)
    _check_range("p", p, 0.0, 1.0)
    return jnp.where(jax.random.bernoulli(key, p), jnp.flip(image, axis=axis), image)


def flip_horizontal(image, key: jax.Array, p: float = 0.5) -> jax.Array:
    """Mirror left-right (the W axis) with probability ``p``."""
    return _flip(image, key, p, axis=1)


def flip_vertical(image, key: jax.Array, p: float = 0.5) -> jax.Array:
    """Mirror top-bottom (the H axis) with probability ``p``."""
    return _flip(image, key, p, axis=0)


def random_crop(
    image, key: jax.Array, size: int | Sequence[int], *, resize: bool = False, method: str = "bilinear"
) -> jax.Array:
    """A ``size`` window at a uniformly random position, resized back to ``[H, W]`` if ``resize``.

    Args:
      image: ``[H, W, C]``.
      size: ``h`` or ``(h, w)``, with ``1 <= h <= H`` and ``1 <= w <= W`` (static).
      resize: crop-and-resize (the "random resized crop" of vision training) when True.
      method: the ``jax.image.resize`` method for ``resize``.

    Returns:
      ``[h, w, C]``, or ``[H, W, C]`` when ``resize``.
    """
    image = _check_image(image)
    H, W, C = image.shape
    h, w = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"size={(h, w)!r}: allowed is 1 <= h <= H={H} and 1 <= w <= W={W}")
    key_y, key_x = jax.random.split(key)
    y0 = jax.random.randint(key_y, (), 0, H - h + 1)
    x0 = jax.random.randint(key_x, (), 0, W - w + 1)
    crop = jax.lax.dynamic_slice(image, (y0, x0, 0), (h, w, C))  # [h, w, C]
    if not resize:
        return crop
    return _like(jax.image.resize(_as_float(crop), (H, W, C), method=method), image)


def scale(image, factor: float, *, method: str = "bilinear") -> jax.Array:
    """Resize by ``factor`` (> 0, static) to ``[round(H * factor), round(W * factor), C]``."""
    image = _check_image(image)
    H, W, C = image.shape
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor={factor!r}: allowed is a finite number > 0")
    h, w = round(H * factor), round(W * factor)
    if h < 1 or w < 1:
        raise ValueError(
            f"factor={factor!r} shrinks [H={H}, W={W}] to [{h}, {w}]: allowed is a factor "
            "leaving at least one pixel per side"
        )
    return _like(jax.image.resize(_as_float(image), (h, w, C), method=method), image)


def rotate(image, degrees, *, fill: float = 0.0) -> jax.Array:
    """Rotate counter-clockwise by ``degrees`` about the image centre, with bilinear sampling.

    Output pixels whose source falls outside the image take ``fill``. ``degrees`` may be a
    traced scalar; the shape is that of the input (corners are cut, not expanded). At a
    multiple of 90 degrees on a square image this is ``jnp.rot90`` up to rounding.
    """
    image = _check_image(image)
    H, W, _ = image.shape
    theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    y, x = jnp.meshgrid(
        jnp.arange(H, dtype=jnp.float32) - (H - 1) / 2,
        jnp.arange(W, dtype=jnp.float32) - (W - 1) / 2,
        indexing="ij",
    )  # [H, W]
    # Inverse map: output pixel -> source pixel, the rotation by -theta. Rows grow downward,
    # so a counter-clockwise turn on screen is (x, y) -> (x cos + y sin, -x sin + y cos).
    src_y = x * sin + y * cos + (H - 1) / 2
    src_x = x * cos - y * sin + (W - 1) / 2

    def sample(channel):  # [H, W] -> [H, W]
        return jax.scipy.ndimage.map_coordinates(channel, [src_y, src_x], order=1, mode="constant", cval=fill)

    out = jax.vmap(sample, in_axes=2, out_axes=2)(_as_float(image))  # [H, W, C]
    return _like(out, image)


def random_rotate(image, key: jax.Array, max_degrees: float, *, fill: float = 0.0) -> jax.Array:
    """``rotate`` by an angle drawn uniformly from ``[-max_degrees, max_degrees]``."""
    _check_range("max_degrees", max_degrees, 0.0, 180.0)
    angle = jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees)
    return rotate(image, angle, fill=fill)


def gaussian_noise(image, key: jax.Array, std: float) -> jax.Array:
    """Add i.i.d. ``N(0, std^2)`` noise to every pixel and channel."""
    image = _check_image(image)
    _check_range("std", std, 0.0)
    x = _as_float(image)
    return _like(x + std * jax.random.normal(key, x.shape, x.dtype), image)


@functools.partial(jax.jit, static_argnums=0)
def _apply_ops(ops: tuple[ImageOp, ...], image: jax.Array, key: jax.Array) -> jax.Array:
    for op, op_key in zip(ops, jax.random.split(key, len(ops)), strict=True):
        image = op(image, op_key)
    return image


@dataclasses.dataclass(frozen=True)
class ImageAugment(grain.transforms.RandomMap):
    """A grain transform applying ``ops`` in order, each with its own key, under one jit.

    Each op is ``op(image, key) -> image``: bind parameters with ``functools.partial``
    (``partial(random_crop, size=24, resize=True)``) and wrap key-free ops in a lambda
    (``lambda im, _: scale(im, 0.5)``). The element is an ``[H, W, C]`` array or a dict
    whose ``field`` holds one; the result is a numpy array, ready for grain's batching.
    The jax key is drawn from grain's per-element generator, so
    ``MapDataset.random_map(ImageAugment(ops), seed=s)`` is deterministic in ``(s, index)``.
    """

    ops: Sequence[ImageOp]
    field: str = "image"

    def __post_init__(self):
        ops = tuple(self.ops)
        if not all(callable(op) for op in ops):
            raise TypeError(f"ops={self.ops!r}: allowed is a sequence of callables op(image, key)")
        object.__setattr__(self, "ops", ops)  # a tuple: the jit cache key

    def __call__(self, image, key: jax.Array) -> jax.Array:
        """The chain on one image with an explicit jax key, outside grain."""
        return _apply_ops(self.ops, _check_image(image), key) if self.ops else jnp.asarray(image)

    def random_map(self, element, rng: np.random.Generator):
        key = jax.random.key(int(rng.integers(2**31)))
        return apply_to_field(element, self.field, lambda image: np.asarray(self(image, key)))
