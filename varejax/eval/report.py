"""Run reports: a Markdown page with tables, image grids and a loss plot (PNG, drawn with Pillow).

No plotting library is needed: `line_plot` draws axes, ticks and one polyline per series.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from varejax.images import write_pil
from varejax.paths import as_path

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
              title: str = "", width: int = 720, height: int = 360, log_y: bool = False) -> epath.Path:
    """Draws (x, y) series as lines with a legend; non-finite points are skipped."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    points = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(y) and (not log_y or y > 0)]
              for name, pts in series.items()}
    all_pts = [p for pts in points.values() for p in pts]
    if all_pts:
        xs, ys = [p[0] for p in all_pts], [math.log10(p[1]) if log_y else p[1] for p in all_pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad
        sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
        sy = lambda y: bottom - ((math.log10(y) if log_y else y) - y0) / (y1 - y0) * (bottom - top)
        for i in range(5):
            value = y0 + (y1 - y0) * i / 4
            y = bottom - (bottom - top) * i / 4
            draw.line([(left, y), (right, y)], fill=(230, 230, 230))
            draw.text((4, y - 6), f"{10 ** value:.3g}" if log_y else f"{value:.3g}", fill="black")
        for i in range(5):
            value = x0 + (x1 - x0) * i / 4
            x = left + (right - left) * i / 4
            draw.text((x - 10, bottom + 6), f"{value:.0f}", fill="black")
        for k, (name, pts) in enumerate(points.items()):
            colour = PALETTE[k % len(PALETTE)]
            if len(pts) > 1:
                draw.line([(sx(x), sy(y)) for x, y in pts], fill=colour, width=2)
            elif pts:
                x, y = pts[0]
                draw.ellipse([sx(x) - 2, sy(y) - 2, sx(x) + 2, sy(y) + 2], fill=colour)
            draw.text((right - 170, top + 4 + 14 * k), f"-- {name}", fill=colour)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 6), title, fill="black")
    path = as_path(path)
    write_pil(path, image)
    return path


def labelled_grid(images: np.ndarray, labels: Sequence[str], columns: int, path: str | os.PathLike,
                  scale: int = 2) -> epath.Path:
    """Images [N, H, W, 3] uint8 in a grid, each upscaled by `scale` with its label under it."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cell_w, cell_h = w * scale, h * scale + 14
    rows = math.ceil(n / columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        r, c = divmod(i, columns)
        tile = Image.fromarray(np.asarray(image, np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (c * cell_w, r * cell_h))
        draw.text((c * cell_w + 2, r * cell_h + h * scale + 1), label[: cell_w // 6], fill="black")
    path = as_path(path)
    write_pil(path, canvas)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width table for the terminal."""
    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [list(map(str, header))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
