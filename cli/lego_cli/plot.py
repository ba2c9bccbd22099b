"""SLO attainment against request scale (or GPUs), one line per policy, drawn with Pillow."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SIZE = (720, 440)
MARGIN = (70, 30, 30, 60)  # left, top, right, bottom
COLOURS = {
    "lego": (214, 39, 40),
    "static": (31, 119, 180),
    "clockwork": (44, 160, 44),
    "shepherd": (148, 103, 189),
}


X_LABELS = {"rs": "request scale (RS)", "gpus": "GPUs"}


def attainment_plot(runs: list[dict[str, Any]], path: Path, title: str, x: str = "rs") -> None:
    """`runs`: dicts with `policy`, `slo_attainment` and `x` (`rs` or `gpus`): the `runs` of lego sim
    / bench slo, SLO attainment against request scale or GPU count, one line per policy."""
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        if run.get("slo_attainment") is not None:
            lines[run["policy"]].append((float(run[x]), float(run["slo_attainment"])))
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    max_rs = max((rs for points in lines.values() for rs, _ in points), default=1.0)

    def at(rs: float, attainment: float) -> tuple[float, float]:
        return left + (right - left) * rs / max_rs, bottom - (bottom - top) * attainment

    draw.rectangle((left, top, right, bottom), outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        y = at(0, tick)[1]
        draw.line((left, y, right, y), fill=(200, 200, 200) if tick != 0.9 else (120, 120, 120))
        draw.text((left - 40, y - 6), f"{tick:.0%}", fill="black")
    for rs in sorted({rs for points in lines.values() for rs, _ in points}):
        tick_x = at(rs, 0)[0]
        draw.text((tick_x - 8, bottom + 8), f"{rs:g}", fill="black")
    draw.text(((left + right) // 2 - 50, bottom + 30), X_LABELS[x], fill="black")
    draw.text((left, 8), title, fill="black")
    for index, (policy, points) in enumerate(sorted(lines.items())):
        colour = COLOURS.get(policy, (90, 90, 90))
        xy = [at(rs, attainment) for rs, attainment in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3)
        for px, py in xy:
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
        draw.text((left + 12, bottom - 80 + 16 * index), f"- {policy}", fill=colour)
    image.save(path)
