"""A prompt-fidelity checker that is not the model: colour statistics and a bounding-box fill ratio.

The background colour is the median of the border pixels; the shape's pixels are those far from it
(refined by one 2-means step: closer to the shape's median colour than to the background's). Each
colour maps to the nearest named colour; the shape is read from how much of its bounding box it
fills (square ~1, circle ~0.785, triangle ~0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lego_worker.shapes.dataset import COLOURS, Combo

BORDER = 3  # pixels of each edge taken as background
FAR = 60.0  # RGB distance from the background beyond which a pixel is the shape's (first guess)
SQUARE_FILL = 0.89  # fill ratio at or above: square
CIRCLE_FILL = 0.64  # fill ratio at or above (below SQUARE_FILL): circle; below: triangle
_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Reading:
    shape: str  # "" when no shape was found
    colour: str
    background: str
    fill: float


@dataclass(frozen=True)
class Score:
    shape: bool
    colour: bool
    background: bool


def nearest_colour(rgb: np.ndarray) -> str:
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float64), axis=1)
    return _NAMES[int(np.argmin(distances))]


def read(image: np.ndarray) -> Reading:
    """What a 64x64x3 uint8 image shows, as (shape, colour, background) names."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    border = np.concatenate(
        [
            pixels[:BORDER].reshape(-1, 3),
            pixels[-BORDER:].reshape(-1, 3),
            pixels[:, :BORDER].reshape(-1, 3),
            pixels[:, -BORDER:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    far = np.linalg.norm(pixels - background, axis=-1) > FAR
    if far.sum() < 4:
        return Reading("", "", nearest_colour(background), 0.0)
    shape_rgb = np.median(pixels[far], axis=0)
    mask = np.linalg.norm(pixels - shape_rgb, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
    mask[:BORDER] = mask[-BORDER:] = False
    mask[:, :BORDER] = mask[:, -BORDER:] = False
    if mask.sum() < 4:
        return Reading("", "", nearest_colour(background), 0.0)
    shape_rgb = np.median(pixels[mask], axis=0)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = float(mask.sum() / box)
    if fill >= SQUARE_FILL:
        shape = "square"
    elif fill >= CIRCLE_FILL:
        shape = "circle"
    else:
        shape = "triangle"
    return Reading(shape, nearest_colour(shape_rgb), nearest_colour(background), fill)


def score(image: np.ndarray, combo: Combo) -> Score:
    found = read(image)
    return Score(
        shape=found.shape == combo.shape,
        colour=found.colour == combo.colour,
        background=found.background == combo.background,
    )


def rates(scores: list[Score]) -> dict[str, float]:
    """The fraction right of each attribute, and of all three together."""
    n = max(1, len(scores))
    return {
        "shape": sum(s.shape for s in scores) / n,
        "colour": sum(s.colour for s in scores) / n,
        "background": sum(s.background for s in scores) / n,
        "all": sum(s.shape and s.colour and s.background for s in scores) / n,
    }
