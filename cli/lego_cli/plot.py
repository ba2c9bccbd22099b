"""SLO attainment against request scale, one line per policy, drawn with Pillow (no plotting library)."""

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


def attainment_plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """`runs`: dicts with `policy`, `rs` and `slo_attainment` (the `runs` of lego sim / bench slo)."""
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        if run.get("slo_attainment") is not None:
            lines[run["policy"]].append((float(run["rs"]), float(run["slo_attainment"])))
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
        x = at(rs, 0)[0]
        draw.text((x - 8, bottom + 8), f"{rs:g}", fill="black")
    draw.text(((left + right) // 2 - 50, bottom + 30), "request scale (RS)", fill="black")
    draw.text((left, 8), title, fill="black")
    for index, (policy, points) in enumerate(sorted(lines.items())):
        colour = COLOURS.get(policy, (90, 90, 90))
        xy = [at(rs, attainment) for rs, attainment in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3)
        for x, y in xy:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        draw.text((left + 12, bottom - 80 + 16 * index), f"- {policy}", fill=colour)
    image.save(path)
