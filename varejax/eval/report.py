"""Run reports: pages with tables, image grids and plots (PNG, drawn with Pillow), as Markdown and HTML.

No plotting library is needed: `line_plot` draws axes, ticks and one polyline per series; `scatter_plot` draws
panels of points (one colour and marker per series) with a Pareto front marked; `bar_chart` draws panels of
labelled horizontal bars. `Page` collects headings, text, tables and images and writes them as both .md and
.html; `add_metrics` and `add_image_grid` add the sections `varejax eval` and `varejax compare` share.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from varejax.images import write_pil
from varejax.paths import as_path, write_text_atomic

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


def nice_ticks(low: float, high: float, target: int = 5) -> tuple[list[float], int]:
    """Round tick values in [low, high] (steps of 1, 2 or 5 x 10^k, about `target` of them) and the number of
    decimals their labels need."""
    raw = (high - low) / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    # The first round step of at least 0.7 x the even split: between `target` and about 1.5 x `target` ticks.
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= 0.7 * raw)
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [k * step for k in range(first, last + 1)], max(0, -math.floor(math.log10(step) + 1e-9))


def _padded_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    span = high - low if high > low else max(abs(low) * 0.1, 0.05)
    return low - 0.06 * span, high + 0.06 * span


def _marker(draw, shape: int, x: float, y: float, r: float, colour) -> None:
    """Marker `shape` (0 circle, 1 square, 2 triangle up, 3 diamond, 4 triangle down, 5 cross) centred at x, y."""
    shape %= 6
    if shape == 0:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == 1:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == 2:
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=colour)
    elif shape == 3:
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)
    elif shape == 4:
        draw.polygon([(x, y + r + 1), (x + r + 1, y - r), (x - r - 1, y - r)], fill=colour)
    else:
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=2)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=2)


def _scatter_panel(title: str, series: Mapping[str, Sequence[tuple[float, float]]], names: Sequence[str],
                   front: Sequence[tuple[float, float]], x_range, y_range, x_label: str, y_label: str,
                   size: tuple[int, int], font):
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 14, 30, height - 50
    sx = lambda x: left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (right - left)
    sy = lambda y: bottom - (y - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top)
    x_ticks, x_decimals = nice_ticks(*x_range)
    y_ticks, y_decimals = nice_ticks(*y_range)
    for value in x_ticks:
        x, label = sx(value), f"{value:.{x_decimals}f}"
        draw.line([(x, top), (x, bottom)], fill=(230, 230, 230))
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - draw.textlength(label, font=font) / 2, bottom + 6), label, fill="black", font=font)
    for value in y_ticks:
        y, label = sy(value), f"{value:.{y_decimals}f}"
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 8 - draw.textlength(label, font=font), y - 8), label, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black", font=font)
    draw.text(((left + right - draw.textlength(x_label, font=font)) / 2, height - 22), x_label, fill="black",
              font=font)
    # The y label is drawn on its own strip and turned a quarter turn, reading bottom to top.
    strip = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, 18), "white")
    ImageDraw.Draw(strip).text((2, 1), y_label, fill="black", font=font)
    strip = strip.rotate(90, expand=True)
    image.paste(strip, (4, int((top + bottom - strip.height) / 2)))

    front = sorted(front)  # by erasure, so the line walks the front from one end to the other
    if len(front) > 1:
        draw.line([(sx(x), sy(y)) for x, y in front], fill=(60, 60, 60), width=1)
    for x, y in front:
        draw.ellipse([sx(x) - 8, sy(y) - 8, sx(x) + 8, sy(y) + 8], outline="black", width=2)
    for k, name in enumerate(names):
        for x, y in series.get(name, ()):
            _marker(draw, k, sx(x), sy(y), 4, PALETTE[k % len(PALETTE)])

    # The legend goes in the corner that hides the fewest points; the lower left first (poor erasure and poor
    # preservation: usually empty).
    entries = len(names) + (1 if front else 0)
    box_w, box_h = 34 + max([draw.textlength(n, font=font) for n in [*names, "Pareto front"]]), 4 + 18 * entries
    corners = [(left + 6, bottom - 6 - box_h), (right - 6 - box_w, bottom - 6 - box_h), (left + 6, top + 6),
               (right - 6 - box_w, top + 6)]
    pixels = [(sx(x), sy(y)) for pts in series.values() for x, y in pts]
    hidden = lambda c: sum(c[0] - 8 <= px <= c[0] + box_w + 8 and c[1] - 8 <= py <= c[1] + box_h + 8
                           for px, py in pixels)
    box_left, box_top = min(corners, key=hidden)
    draw.rectangle([box_left, box_top, box_left + box_w, box_top + box_h], fill="white", outline=(160, 160, 160))
    for k, name in enumerate(names):
        y = box_top + 11 + 18 * k
        _marker(draw, k, box_left + 12, y, 4, PALETTE[k % len(PALETTE)])
        draw.text((box_left + 24, y - 8), name, fill="black", font=font)
    if front:
        y = box_top + 11 + 18 * len(names)
        draw.line([(box_left + 4, y), (box_left + 20, y)], fill=(60, 60, 60))
        draw.ellipse([box_left + 6, y - 6, box_left + 18, y + 6], outline="black", width=2)
        draw.text((box_left + 24, y - 8), "Pareto front", fill="black", font=font)
    return image


def scatter_plot(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | os.PathLike, *,
                 fronts: Mapping[str, Sequence[tuple[float, float]]] | None = None, x_label: str = "",
                 y_label: str = "", panel_size: tuple[int, int] = (480, 400), columns: int = 3) -> epath.Path:
    """Scatter plots side by side (`columns` per row), one panel per key of `panels`, written as one image.

    Args:
      panels: panel title -> {series name -> (x, y) points}. A series keeps its colour and marker in every
        panel (the order of first appearance), and all panels share their axes so that they compare.
      fronts: panel title -> points of that panel's Pareto front: ringed and joined by a line.
      panel_size: (width, height) of one panel in pixels; the image is
        (min(n, columns) * width, ceil(n / columns) * height) for n panels.
    Non-finite points are skipped.
    """
    from PIL import Image, ImageFont

    if not panels:
        raise ValueError("scatter_plot needs at least one panel")
    fronts = fronts or {}
    panels = {title: {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
                      for name, pts in series.items()} for title, series in panels.items()}
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    points = [p for series in panels.values() for pts in series.values() for p in pts]
    points += [p for front in fronts.values() for p in front]
    x_range = _padded_range([p[0] for p in points] or [0.0, 1.0])
    y_range = _padded_range([p[1] for p in points] or [0.0, 1.0])
    font = ImageFont.load_default(size=13)  # a scalable font where Pillow has FreeType; bitmap otherwise
    columns = max(1, min(columns, len(panels)))
    width, height = panel_size
    canvas = Image.new("RGB", (columns * width, math.ceil(len(panels) / columns) * height), "white")
    for i, (title, series) in enumerate(panels.items()):
        panel = _scatter_panel(title, series, names, fronts.get(title, ()), x_range, y_range, x_label, y_label,
                               panel_size, font)
        row, column = divmod(i, columns)
        canvas.paste(panel, (column * width, row * height))
    path = as_path(path)
    write_pil(path, canvas)
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


# ---- pages: Markdown and HTML from the same blocks ----------------------------------------------------

class Page:
    """A report as blocks (headings, text, tables, images) written both as Markdown and as HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def image(self, src: str, alt: str) -> None:
        self.blocks.append(("img", (src, alt)))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "h2":
                lines += [f"## {body}", ""]
            elif kind == "p":
                lines += [body, ""]
            elif kind == "table":
                lines += [markdown_table(*body), ""]
            else:
                lines += [f"![{body[1]}]({body[0]})", ""]
        return "\n".join(lines)

    def html(self) -> str:
        def cell(value: object) -> str:
            return html.escape(f"{value:.3f}" if isinstance(value, float) else str(value))

        parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}</style>",
                 "</head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        for kind, body in self.blocks:
            if kind == "h2":
                parts.append(f"<h2>{html.escape(body)}</h2>")
            elif kind == "p":
                parts.append(f"<p>{html.escape(body)}</p>")
            elif kind == "table":
                header, rows = body
                parts.append("<table><tr>" + "".join(f"<th>{cell(h)}</th>" for h in header) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows]
                parts.append("</table>")
            else:
                parts.append(f"<p><img src=\"{html.escape(body[0])}\" alt=\"{html.escape(body[1])}\"></p>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def write(self, folder, stem: str) -> None:
        write_text_atomic(as_path(folder) / f"{stem}.md", self.markdown())
        write_text_atomic(as_path(folder) / f"{stem}.html", self.html())


def bar_chart(panels: Mapping[str, Mapping[str, float]], path, *, width: int = 480, columns: int = 2):
    """Horizontal bar charts, one panel per key of `panels` ({title: {bar label: value}}), in one PNG: a bar per
    label with its value written next to it (long metric names stay readable)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    columns = max(1, min(columns, len(panels)))
    row_h, label_w = 18, min(220, 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(label), font))
                                          for bars in panels.values() for label in bars))
    height = 44 + row_h * max(len(bars) for bars in panels.values()) + 18
    canvas = Image.new("RGB", (columns * width, math.ceil(len(panels) / columns) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, bars) in enumerate(panels.items()):
        ox, oy = (p % columns) * width, (p // columns) * height
        left, right, top = ox + label_w + 6, ox + width - 56, oy + 26
        bottom = top + row_h * len(bars) + 4
        values = [v for v in bars.values() if math.isfinite(v)]
        low, high = min([0.0, *values]), max([0.0, *values])
        high = high if high > low else low + 1.0
        ticks, decimals = nice_ticks(low, high, 4)
        low, high = min(low, ticks[0]), max(high, ticks[-1])
        sx = lambda v, lo=low, hi=high, a=left, b=right: a + (v - lo) / (hi - lo) * (b - a)
        draw.text((ox + 6, oy + 6), title, fill="black", font=font)
        for tick in ticks:
            draw.line([(sx(tick), top), (sx(tick), bottom)], fill=(225, 225, 225))
            draw.text((sx(tick) - 8, bottom + 2), f"{tick:.{decimals}f}", fill="black", font=font)
        for k, (label, value) in enumerate(bars.items()):
            y = top + 2 + row_h * k
            text = str(label)
            while text and draw.textlength(text, font=font) > label_w - 8:
                text = text[1:]  # keep the end of a long metric path: its most specific part
            draw.text((ox + 4, y + 2), text, fill="black", font=font)
            if math.isfinite(value):
                x0, x1 = sorted((sx(0.0), sx(value)))
                draw.rectangle([x0, y + 2, max(x1, x0 + 1), y + row_h - 3], fill=PALETTE[k % len(PALETTE)])
                draw.text((max(sx(0.0), sx(value)) + 4, y + 2), f"{value:.4g}", fill="black", font=font)
        draw.line([(sx(0.0), top), (sx(0.0), bottom)], fill="black")
    write_pil(as_path(path), canvas)
    return as_path(path)


def thumbnails(images: np.ndarray, longest: int = 128) -> np.ndarray:
    """Images shrunk so that their longer side is at most `longest` (grids of 1024 px images stay small)."""
    from PIL import Image

    h, w = images.shape[1:3]
    if max(h, w) <= longest:
        return images
    size = (max(1, round(w * longest / max(h, w))), max(1, round(h * longest / max(h, w))))
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in images])


def add_metrics(page: Page, heading: str, metrics: Mapping[str, float], folder, figure: str, *,
                title: str = "") -> None:
    """A section of `page`: a metric / value table and, when it has two or more metrics besides counts (`n`), a
    bar chart of them written to `folder`/`figure` (a path relative to the page)."""
    page.heading(heading)
    page.table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    shown = {k: v for k, v in metrics.items() if k != "n" and not k.endswith("/n")}
    if len(shown) >= 2:
        bar_chart({title or heading: shown}, as_path(folder) / figure, width=640)
        page.image(figure, f"{title or heading} metrics")


def add_image_grid(page: Page, heading: str, images: np.ndarray, labels: Sequence[str], folder, figure: str, *,
                   columns: int = 8, alt: str = "images") -> None:
    """A section of `page`: `images` (uint8 [N, H, W, 3]) as thumbnails in a labelled grid written to
    `folder`/`figure` (a path relative to the page); small images are drawn at twice their size."""
    images = thumbnails(images)
    scale = 2 if max(images.shape[1:3]) <= 64 else 1
    labelled_grid(images, labels, min(int(columns), len(images)), as_path(folder) / figure, scale=scale)
    page.heading(heading)
    page.image(figure, alt)
