"""`docs/shapes-grid.png`: samples of the trained `lego-shapes` model with their captions (held-out
combinations first, marked "held out"), each scored by the fidelity checker (a tick or a cross)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from lego.builtin_workflows import LEGO_SHAPES_GUIDANCE
from PIL import Image, ImageDraw

from lego_worker.shapes import dataset, fidelity, model
from lego_worker.shapes.train import generate, pipeline

CELL = 128  # each 64x64 sample drawn 2x
TEXT_H = 30
COLUMNS = 6


def make_grid(
    out: Path, steps: int = 20, guidance: float = LEGO_SHAPES_GUIDANCE, seed: int = 0
) -> dict[str, float]:
    trained = dataset.train_combos()
    rng = np.random.default_rng(seed)
    extra = [trained[int(i)] for i in rng.choice(len(trained), size=12, replace=False)]
    combos = [*dataset.HELD_OUT, *extra]
    images = generate(
        pipeline(model.build_lego_shapes()),
        [c.caption for c in combos],
        list(range(100, 100 + len(combos))),
        steps,
        guidance,
    )
    rows = -(-len(combos) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + TEXT_H)), "white")
    draw = ImageDraw.Draw(sheet)
    scores = []
    for index, (image, combo) in enumerate(zip(images, combos, strict=True)):
        x, y = (index % COLUMNS) * CELL, (index // COLUMNS) * (CELL + TEXT_H)
        sheet.paste(Image.fromarray(image).resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        found = fidelity.score(image, combo)
        scores.append(found)
        ok = "ok" if found.shape and found.colour and found.background else "x"
        tag = " (held out)" if index < len(dataset.HELD_OUT) else ""
        draw.text((x + 3, y + CELL + 2), f"{combo.colour} {combo.shape}{tag}", fill="black")
        draw.text((x + 3, y + CELL + 15), f"on {combo.background}  [{ok}]", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return fidelity.rates(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/shapes-grid.png"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # faster than two on a shared CPU
    print(make_grid(args.out, args.steps), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
