"""Scale schedules of Infinity: the 15 aspect-ratio templates and their resolution presets.

A schedule is a tuple of `(t, h, w)` scales in latent units (t = 1 for images); tokens are row-major
inside a scale and scales are concatenated. Each template has 13 scales reaching about 1M pixels
(16 px per latent); the presets `0.06M`, `0.25M`, `0.60M`, `1M` take its first 7, 10, 12, 13
scales. Values are upstream's table (infinity/utils/dynamic_resolution.py); the portrait templates
are the landscape ones transposed, keyed by `int(1000 / ratio) / 1000` as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Schedule = tuple[tuple[int, int, int], ...]

VAE_STRIDE = 16
PN_PREFIX = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

# h/w -> the 13 (h, w) scales of the 1M schedule (landscape and square templates).
_LANDSCAPE = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
            (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
            (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
            (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
            (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
            (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
            (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
            (72, 24), (90, 30), (111, 37)],
}


def _build_templates() -> dict[float, list[tuple[int, int]]]:
    table = {}
    for ratio, hws in _LANDSCAPE.items():
        table[ratio] = hws
        if ratio != 1.0:
            table[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in hws]
    return dict(sorted(table.items()))


TEMPLATES: dict[float, list[tuple[int, int]]] = _build_templates()
TEMPLATE_RATIOS = np.array(sorted(TEMPLATES))


def nearest_template(h_div_w: float) -> float:
    """The template ratio closest to `h_div_w` (upstream's choice for a requested aspect ratio)."""
    return float(TEMPLATE_RATIOS[np.argmin(np.abs(h_div_w - TEMPLATE_RATIOS))])


def get_schedule(h_div_w: float = 1.0, pn: str = "1M") -> Schedule:
    """The scale schedule of the template nearest to `h_div_w` at resolution preset `pn`."""
    if pn not in PN_PREFIX:
        raise KeyError(f"unknown resolution preset {pn!r}; known: {list(PN_PREFIX)}")
    hws = TEMPLATES[nearest_template(h_div_w)][: PN_PREFIX[pn]]
    return tuple((1, h, w) for h, w in hws)


def pixel_size(schedule: Sequence[Sequence[int]], patch: int = VAE_STRIDE) -> tuple[int, int]:
    """(height, width) in pixels of the image a schedule decodes to."""
    _, h, w = schedule[-1]
    return h * patch, w * patch


def as_schedule(schedule: Sequence[Sequence[int]]) -> Schedule:
    """Normalises (h, w) or (t, h, w) lists into a hashable `Schedule` with t = 1."""
    out = []
    for scale in schedule:
        scale = tuple(int(v) for v in scale)
        if len(scale) == 2:
            scale = (1,) + scale
        if len(scale) != 3 or scale[0] != 1 or min(scale) < 1:
            raise ValueError(f"a scale must be (1, h, w) with h, w >= 1, got {scale}")
        out.append(scale)
    if not out or out[0] != (1, 1, 1):
        raise ValueError(f"a schedule must start with the (1, 1, 1) scale of the start token, got {out[:1]}")
    return tuple(out)


def scale_lengths(schedule: Schedule) -> list[int]:
    return [t * h * w for t, h, w in schedule]


def sequence_length(schedule: Schedule) -> int:
    """L = sum of h * w over the scales."""
    return int(sum(scale_lengths(schedule)))


def padded_length(schedule: Schedule, multiple: int) -> int:
    length = sequence_length(schedule)
    return -(-length // multiple) * multiple


def scale_ids(schedule: Schedule) -> np.ndarray:
    """[L] int32: the scale index of every token."""
    return np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(scale_lengths(schedule))])


def template_for(schedule: Schedule) -> float:
    """The aspect template a schedule belongs to (nearest to its last scale's h/w)."""
    _, h, w = schedule[-1]
    return nearest_template(h / w)


def final_grid(h_div_w_template: float) -> tuple[int, int]:
    """(h, w) of the template's 1M (last) scale: rope positions are normalised to this grid."""
    return TEMPLATES[h_div_w_template][-1]
