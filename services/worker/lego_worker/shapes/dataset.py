"""The synthetic captioned dataset: one shape in a named colour on a named background colour.

Images are 64x64 RGB (uint8) drawn with numpy from a seed; captions read
"a red circle on a blue background". Some (shape, colour, background) combinations are held out of
training for evaluation (`HELD_OUT`): every shape, colour and background still appears in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
MIN_SIDE, MAX_SIDE = 20, 38  # the shape's bounding box, in pixels
MARGIN = 5  # background pixels kept between the shape and the image border
JITTER = 8  # per-image colour jitter (each channel, +-)


@dataclass(frozen=True)
class Combo:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_combos() -> list[Combo]:
    return [
        Combo(shape, colour, background)
        for shape in SHAPES
        for colour in COLOUR_NAMES
        for background in COLOUR_NAMES
        if colour != background
    ]


def _held_out() -> tuple[Combo, ...]:
    """Twelve combinations: each colour twice as the shape's colour and twice as a background."""
    n = len(COLOUR_NAMES)
    combos = []
    for i, colour in enumerate(COLOUR_NAMES):
        combos.append(Combo(SHAPES[i % 3], colour, COLOUR_NAMES[(i + 1) % n]))
        combos.append(Combo(SHAPES[(i + 1) % 3], colour, COLOUR_NAMES[(i + 3) % n]))
    return tuple(combos)


HELD_OUT = _held_out()


def train_combos() -> list[Combo]:
    held = set(HELD_OUT)
    return [combo for combo in all_combos() if combo not in held]


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """A boolean mask of `shape` with a side x side bounding box centred on (cx, cy)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    half = side / 2
    if shape == "circle":
        return bool_array((xs - cx) ** 2 + (ys - cy) ** 2 <= half**2)
    if shape == "square":
        return bool_array((np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half))
    if shape == "triangle":  # upright isosceles: apex at the top centre, base at the bottom
        top, bottom = cy - half, cy + half
        frac = (ys - top) / side  # 0 at the apex, 1 at the base
        return bool_array((ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half * frac))
    raise ValueError(f"unknown shape {shape!r} (known: {SHAPES})")


def bool_array(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=bool)


def _jittered(rng: np.random.Generator, name: str) -> np.ndarray:
    base = np.array(COLOURS[name], dtype=np.int64)
    return np.clip(base + rng.integers(-JITTER, JITTER + 1, size=3), 0, 255)


def render(combo: Combo, rng: np.random.Generator) -> np.ndarray:
    """One 64x64x3 uint8 image of `combo` at a random size and position."""
    side = float(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    low, high = MARGIN + side / 2, IMAGE_SIZE - MARGIN - side / 2
    cx, cy = rng.uniform(low, high), rng.uniform(low, high)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = _jittered(rng, combo.background)
    image[shape_mask(combo.shape, cx, cy, side)] = _jittered(rng, combo.colour)
    return image


def make_dataset(combos: list[Combo], count: int, seed: int) -> tuple[np.ndarray, list[Combo]]:
    """`count` images (N x 64 x 64 x 3 uint8) cycling through `combos` in a seeded order."""
    rng = np.random.default_rng(seed)
    picks = [combos[int(i)] for i in rng.integers(0, len(combos), size=count)]
    images = np.stack([render(combo, rng) for combo in picks])
    return images, picks
