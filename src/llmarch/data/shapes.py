"""A synthetic captioning set: 1-3 coloured shapes on a plain background, each named in the caption.

Every image places its shapes in distinct slots of four, ``left``, ``right``, ``top`` and ``bottom``
(``layout`` "quarters": the centres of the image's left, right, upper and lower halves; "thirds": the
outer middle cells of a 3x3 grid, see ``LAYOUTS``), each a ``circle``, ``square`` or
(upward) ``triangle`` of one colour, with a random size and a small random offset. The caption names
the shapes in the fixed slot order left, right, top, bottom::

    "a red circle on the left, a green triangle on the right and a blue square at the top"

so it is a function of the image alone: a model that reads no pixels can learn only the grammar and
the word frequencies. Sizes are kept below an eighth of the image, so no two slots' shapes overlap,
and every shape covers its slot's centre pixel (the check the tests make).

``ShapesDataset(cfg)[i]`` is ``{"image": uint8 [H, W, 3], "caption": str}``, drawn from a generator
seeded by ``(cfg.seed, i)``: random access, the same record for the same index on any machine (numpy
only, no jax), the shape a ``grain.MapDataset.source`` takes.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from llmarch.checks import check_int, check_number, fail

# Saturated colours that stay apart under small noise and brightness changes (RGB, uint8).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")  # also the order in which a caption names them
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# Each slot's centre as fractions of (height, width), per layout: "quarters", the centres of the
# image's left, right, upper and lower halves; "thirds", the centres of the outer middle cells of a
# 3x3 grid, so that a vision tower with 3x3 patches sees each shape whole, in one patch (with a 4x4
# grid, the "quarters" slots sit on patch corners: each shape is cut in four and the four central
# patches each hold quarters of two shapes).
LAYOUTS = {
    "quarters": {"left": (0.5, 0.25), "right": (0.5, 0.75), "top": (0.25, 0.5), "bottom": (0.75, 0.5)},
    "thirds": {"left": (0.5, 1 / 6), "right": (0.5, 5 / 6), "top": (1 / 6, 0.5), "bottom": (5 / 6, 0.5)},
}
CENTRES = LAYOUTS["quarters"]
# The largest half-extent + jitter per layout that keeps neighbouring slots' shapes apart (quarters)
# or each shape inside its grid cell (thirds).
MAX_EXTENT = {"quarters": 0.125, "thirds": 1 / 6}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn shape: ``color`` (a key of ``COLORS``), ``shape`` (of ``SHAPES``), ``position``
    (of ``POSITIONS``)."""

    color: str
    shape: str
    position: str

    def phrase(self) -> str:
        return f"a {self.color} {self.shape} {PHRASES[self.position]}"


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The set: ``num_examples`` images of ``image_size`` pixels (the vision tower's), seeded.

    Attributes:
      image_size: the side of the square images.
      num_examples: the dataset's length.
      seed: with the index, seeds each record's generator.
      min_shapes, max_shapes: how many shapes an image holds, uniformly in between (at most 4 slots).
      colors: the colour names drawn from (keys of ``COLORS``).
      shapes: the shape names drawn from (of ``SHAPES``).
      background: the background's grey level, 0..255 (0: black, which also matches the fill of
        ``augment_image.rotate``'s corners).
      min_size, max_size: a shape's half-extent as a fraction of ``image_size``; ``max_size <=
        0.125`` keeps neighbouring slots' shapes apart.
      jitter: the largest offset of a shape from its slot's centre, as a fraction of ``image_size``;
        at most a third of ``min_size``, so the slot's centre stays inside every shape (a triangle's
        half-width at its centre row is half its size).
      layout: where the slots are (``LAYOUTS``): "quarters" or "thirds"; with "thirds",
        ``max_size + jitter`` must stay within a sixth, each shape inside its cell of a 3x3 grid.
    """

    image_size: int = 32
    num_examples: int = 1024
    seed: int = 0
    min_shapes: int = 1
    max_shapes: int = 3
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    background: int = 0
    min_size: float = 0.09
    max_size: float = 0.125
    jitter: float = 0.02
    layout: str = "quarters"

    def __post_init__(self):
        owner = "ShapesConfig"
        if self.layout not in LAYOUTS:
            fail(owner, "layout", self.layout, f"must be one of {tuple(LAYOUTS)}")
        extent = MAX_EXTENT[self.layout]
        check_int(owner, "image_size", self.image_size, low=16)
        check_int(owner, "num_examples", self.num_examples)
        check_int(owner, "seed", self.seed, low=0, high=2**32 - 1)
        check_int(owner, "min_shapes", self.min_shapes, low=1, high=len(POSITIONS))
        check_int(owner, "max_shapes", self.max_shapes, low=self.min_shapes, high=len(POSITIONS))
        for field, names, allowed in (
            ("colors", self.colors, tuple(COLORS)),
            ("shapes", self.shapes, SHAPES),
        ):
            if not isinstance(names, tuple) or not names or len(set(names)) != len(names):
                fail(owner, field, names, f"must be a non-empty tuple of distinct names from {allowed}")
            for name in names:
                if name not in allowed:
                    fail(owner, field, names, f"{name!r} is unknown; allowed names are {allowed}")
        check_int(owner, "background", self.background, low=0, high=255)
        check_number(owner, "min_size", self.min_size, "must be in (0, 0.125]", lambda v: 0 < v <= 0.125)
        if self.layout == "quarters":
            check_number(
                owner,
                "max_size",
                self.max_size,
                f"must be in [min_size={self.min_size}, 0.125] (larger shapes of neighbouring slots overlap)",
                lambda v: self.min_size <= v <= 0.125,
            )
        else:
            check_number(
                owner,
                "max_size",
                self.max_size,
                f"must be in [min_size={self.min_size}, 1/6 - jitter = {extent - self.jitter:.4f}] (a "
                "larger shape leaves its grid cell)",
                lambda v: self.min_size <= v <= extent - self.jitter,
            )
        check_number(
            owner,
            "jitter",
            self.jitter,
            f"must be in [0, min_size / 3 = {self.min_size / 3:g}] (the slot's centre stays inside)",
            lambda v: 0 <= v <= self.min_size / 3,
        )

    def replace(self, **changes) -> ShapesConfig:
        return dataclasses.replace(self, **changes)


def caption(shapes: list[Shape] | tuple[Shape, ...]) -> str:
    """The caption of ``shapes``, named in slot order: "a red circle on the left and a blue square at
    the top"; three or more are joined "x, y and z"."""
    ordered = sorted(shapes, key=lambda s: POSITIONS.index(s.position))
    phrases = [s.phrase() for s in ordered]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(
    r"a (\w+) (\w+) (on the left|on the right|at the top|at the bottom)",
)


def parse_caption(text: str) -> dict[str, tuple[str, str]]:
    """The ``{position: (color, shape)}`` a caption states; phrases it cannot read are skipped (so a
    model's malformed caption scores what it got right). A position named twice keeps the first."""
    by_phrase = {v: k for k, v in PHRASES.items()}
    found: dict[str, tuple[str, str]] = {}
    for color, shape, where in _PHRASE.findall(text):
        found.setdefault(by_phrase[where], (color, shape))
    return found


def mirror_caption(text: str) -> str:
    """The caption of the left-right mirrored image: "left" and "right" exchanged, and a shapes caption
    (one ``caption`` wrote) re-ordered so it names the slots in the canonical order again; any other
    text gets the word swap alone."""
    swapped = re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", text)
    said = parse_caption(text)
    shapes = [Shape(c, s, p) for p, (c, s) in said.items()]
    if not shapes or caption(shapes) != text:
        return swapped
    side = {"left": "right", "right": "left"}
    return caption([dataclasses.replace(s, position=side.get(s.position, s.position)) for s in shapes])


def draw(shapes: list[Shape], sizes: np.ndarray, offsets: np.ndarray, cfg: ShapesConfig) -> np.ndarray:
    """``uint8 [H, W, 3]``: ``shapes`` with half-extents ``sizes [n]`` and centre offsets
    ``offsets [n, 2]`` (rows, columns; in pixels) on the background."""
    n = cfg.image_size
    image = np.full((n, n, 3), cfg.background, np.uint8)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5  # pixel centres, [H, W] each
    for s, size, (dy, dx) in zip(shapes, sizes, offsets, strict=True):
        fy, fx = LAYOUTS[cfg.layout][s.position]
        cy, cx = fy * n + dy, fx * n + dx
        if s.shape == "circle":
            inside = (y - cy) ** 2 + (x - cx) ** 2 <= size**2
        elif s.shape == "square":
            inside = (np.abs(y - cy) <= size) & (np.abs(x - cx) <= size)
        else:  # an upward triangle: apex at (cy - size, cx), base from cx - size to cx + size
            inside = (y <= cy + size) & (np.abs(x - cx) <= (y - cy + size) / 2)
        image[inside] = COLORS[s.color]
    return image


class ShapesDataset:
    """``len`` and ``[i] -> {"image": uint8 [H, W, 3], "caption": str}``; see the module docstring.
    ``shapes(i)`` gives the record's ``Shape``s, the ground truth for scoring captions."""

    def __init__(self, cfg: ShapesConfig):
        if not isinstance(cfg, ShapesConfig):
            fail("ShapesDataset", "cfg", type(cfg).__name__, "must be a ShapesConfig")
        self.cfg = cfg

    def __len__(self) -> int:
        return self.cfg.num_examples

    def _draw_record(self, index: int) -> tuple[list[Shape], np.ndarray, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        count = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
        slots = rng.choice(len(POSITIONS), size=count, replace=False)
        shapes = [
            Shape(
                color=cfg.colors[int(rng.integers(len(cfg.colors)))],
                shape=cfg.shapes[int(rng.integers(len(cfg.shapes)))],
                position=POSITIONS[int(slot)],
            )
            for slot in sorted(slots)
        ]
        sizes = rng.uniform(cfg.min_size, cfg.max_size, count) * cfg.image_size
        offsets = rng.uniform(-cfg.jitter, cfg.jitter, (count, 2)) * cfg.image_size
        return shapes, sizes, offsets

    def shapes(self, index: int) -> list[Shape]:
        return self._draw_record(index)[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        shapes, sizes, offsets = self._draw_record(index)
        return {"image": draw(shapes, sizes, offsets, self.cfg), "caption": caption(shapes)}

    def __repr__(self) -> str:
        return f"ShapesDataset({self.cfg})"
