"""The toy world: 64x64 RGB images of one coloured shape on a patterned background, with prompts.

Every image has three attributes:

* shape: circle, square, triangle, star, cross, heart;
* colour of the shape: red, green, blue, yellow, purple, orange (saturated, with a little jitter);
* background style: plain, striped, dotted, checkered, drawn with its own pair of neutral colours
  (white, silver, grey, charcoal, beige, taupe), never one of the shape colours.

The shape's size (radius 15-24 px) and position (always fully inside the image) and the background's
colours and stripe orientation are drawn freely. The pattern's phase is drawn freely too
(`pattern_phase="free"`, the first world) or aligned to the 16 px grid (`"grid"`): a 16 px period is finer
than every scale but the last one, whose tokens (16 px each) are sampled in parallel, so the model cannot
make them agree on a free phase and draws dots and stripes that the oracle reads as noise. Rendering is
numpy only, 2x2 supersampled (anti-aliased), and deterministic given an `np.random.Generator`; both phases
draw the same random numbers, so "grid" images differ from "free" ones only in their background pattern.

Prompts come from two disjoint families of templates and synonyms:

* `seen`: the canonical words ("a red circle on a striped background", "an image of a square"); the
  erasure job builds its concept/anchor pairs from these only;
* `paraphrase`: other templates and synonyms ("a crimson disk with stripes behind it", "a picture of
  a box in cobalt"); used to test whether erasure generalises.

Both families train the base model. A prompt may leave attributes unsaid (they are then free in the
image): `prompt(attrs, rng, family, mention=...)` says which are said. `dataset(n, seed)` gives images,
labels and prompts; `concept_prompts`, `anchor_pairs` and `enumerate_prompts` serve the erasure job.

    rng = np.random.default_rng(0)
    attrs = sample_attributes(rng)
    image = render(attrs, rng)                      # uint8 [64, 64, 3]
    text = prompt(attrs, rng, "paraphrase")         # e.g. "a scarlet pentagram against a banded backdrop"
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

WORLD_VERSION = 1
IMAGE_SIZE = 64
FAMILIES = ("seen", "paraphrase")


class Shape(enum.IntEnum):
    CIRCLE = 0
    SQUARE = 1
    TRIANGLE = 2
    STAR = 3
    CROSS = 4
    HEART = 5


class Colour(enum.IntEnum):
    RED = 0
    GREEN = 1
    BLUE = 2
    YELLOW = 3
    PURPLE = 4
    ORANGE = 5


class Background(enum.IntEnum):
    PLAIN = 0
    STRIPED = 1
    DOTTED = 2
    CHECKERED = 3


# Attribute name -> its enum; the order is the order of labels and oracle heads everywhere.
ATTRIBUTES: dict[str, type[enum.IntEnum]] = {"shape": Shape, "colour": Colour, "background": Background}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
NUM_CLASSES = {name: len(cls) for name, cls in ATTRIBUTES.items()}

SHAPE_RGB = {
    Colour.RED: (220, 35, 35), Colour.GREEN: (40, 170, 60), Colour.BLUE: (40, 80, 225),
    Colour.YELLOW: (245, 215, 25), Colour.PURPLE: (145, 45, 195), Colour.ORANGE: (250, 135, 25),
}
NEUTRAL_RGB = {
    "white": (238, 238, 232), "silver": (185, 185, 185), "grey": (128, 128, 128), "charcoal": (45, 45, 50),
    "beige": (214, 196, 160), "taupe": (120, 104, 88),
}
SHAPE_JITTER = 15       # +- per channel
NEUTRAL_JITTER = 8
MIN_PATTERN_CONTRAST = 60  # luma difference of the two background colours
RADIUS_RANGE = (15.0, 24.0)
PERIOD = 16             # stripes: 8 px on / 8 px off; dots: one per 16x16 cell; checks: 16 px squares
DOT_RADIUS = 4.0


@dataclasses.dataclass(frozen=True)
class Attributes:
    """The labelled attributes of one image."""

    shape: Shape
    colour: Colour
    background: Background

    def __post_init__(self):
        for name, cls in ATTRIBUTES.items():
            object.__setattr__(self, name, cls(int(getattr(self, name))))

    def replace(self, **changes) -> Attributes:
        return dataclasses.replace(self, **changes)

    def labels(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in ATTRIBUTE_NAMES}


def value_name(value: enum.IntEnum) -> str:
    """The canonical (seen-family) word of an attribute value: Shape.CIRCLE -> 'circle'."""
    return value.name.lower()


def sample_attributes(rng: np.random.Generator, **fixed) -> Attributes:
    """Uniformly random attributes; keyword arguments (shape=Shape.CIRCLE, ...) fix some of them."""
    unknown = set(fixed) - set(ATTRIBUTE_NAMES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {ATTRIBUTE_NAMES}")
    values = {}
    for name, cls in ATTRIBUTES.items():
        drawn = int(rng.integers(len(cls)))  # drawn even when fixed: the stream does not depend on `fixed`
        values[name] = fixed.get(name, drawn)
    return Attributes(**values)


# ---- rendering -----------------------------------------------------------------------------------

def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


_NEUTRAL_NAMES = tuple(NEUTRAL_RGB)
# Ordered pairs (base, pattern) of neutrals with enough contrast for a visible pattern.
NEUTRAL_PAIRS = tuple((a, b) for a in _NEUTRAL_NAMES for b in _NEUTRAL_NAMES
                      if a != b and abs(_luma(NEUTRAL_RGB[a]) - _luma(NEUTRAL_RGB[b])) >= MIN_PATTERN_CONTRAST)

_SS = 2  # supersampling factor per axis
_GRID = ((np.arange(IMAGE_SIZE * _SS) + 0.5) / _SS).astype(np.float32)  # sample positions in pixel units


def _polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the points (u, v) against `vertices` [K, 2]."""
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star_vertices(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


_STAR = _star_vertices()
_TRIANGLE = np.array([[0.0, -0.95], [0.95, 0.75], [-0.95, 0.75]])


def shape_mask(shape: Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-radius shape at normalised coordinates (u right, v down)."""
    shape = Shape(shape)
    if shape == Shape.CIRCLE:
        return u * u + v * v <= 0.92 ** 2
    if shape == Shape.SQUARE:
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == Shape.TRIANGLE:
        return _polygon(u, v, _TRIANGLE)
    if shape == Shape.STAR:
        return _polygon(u, v, _STAR)
    if shape == Shape.CROSS:
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.92)) | ((av <= 0.3) & (au <= 0.92))
    if shape == Shape.HEART:
        x, y = 1.14 * u, 0.12 - 1.12 * v
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise ValueError(f"unknown shape {shape}")


PATTERN_PHASES = ("free", "grid")


def _check_phase(pattern_phase: str) -> None:
    if pattern_phase not in PATTERN_PHASES:
        raise ValueError(f"unknown pattern_phase {pattern_phase!r}; known: {PATTERN_PHASES}")


def _pattern(style: Background, rng: np.random.Generator, pattern_phase: str = "free") -> np.ndarray:
    """[S, S] bool pattern mask (True = the pattern colour) at the supersampled grid."""
    _check_phase(pattern_phase)
    y, x = _GRID[:, None], _GRID[None, :]
    phase = rng.integers(PERIOD, size=2)  # drawn for both phases: the stream does not depend on it
    if pattern_phase == "grid":
        phase = np.zeros(2, phase.dtype)
    vertical = bool(rng.integers(2))  # drawn for every style: the stream does not depend on the style
    xs, ys = x + phase[0], y + phase[1]
    if style == Background.PLAIN:
        return np.zeros((_GRID.size, _GRID.size), bool)
    if style == Background.STRIPED:
        coord = np.broadcast_to(xs if vertical else ys, (_GRID.size, _GRID.size))
        return np.mod(coord, PERIOD) < PERIOD / 2
    if style == Background.DOTTED:
        dx, dy = np.mod(xs, PERIOD) - PERIOD / 2, np.mod(ys, PERIOD) - PERIOD / 2
        return dx * dx + dy * dy <= DOT_RADIUS ** 2
    if style == Background.CHECKERED:
        return (np.floor(xs / PERIOD) + np.floor(ys / PERIOD)) % 2 == 1
    raise ValueError(f"unknown background {style}")


def _jitter(rgb, amount: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.integers(-amount, amount + 1, size=3), 0, 255).astype(np.float32)


def render(attrs: Attributes, rng: np.random.Generator, pattern_phase: str = "free") -> np.ndarray:
    """One image uint8 [64, 64, 3] of `attrs`; size, position, background colours (and phase) from `rng`."""
    base_name, pattern_name = NEUTRAL_PAIRS[int(rng.integers(len(NEUTRAL_PAIRS)))]
    base = _jitter(NEUTRAL_RGB[base_name], NEUTRAL_JITTER, rng)
    pattern_rgb = _jitter(NEUTRAL_RGB[pattern_name], NEUTRAL_JITTER, rng)
    colour = _jitter(SHAPE_RGB[attrs.colour], SHAPE_JITTER, rng)
    radius = float(rng.uniform(*RADIUS_RANGE))
    cx, cy = (float(rng.uniform(radius + 1, IMAGE_SIZE - 1 - radius)) for _ in range(2))
    pattern = _pattern(attrs.background, rng, pattern_phase)

    u = (_GRID[None, :] - np.float32(cx)) / np.float32(radius)
    v = (_GRID[:, None] - np.float32(cy)) / np.float32(radius)
    u, v = np.broadcast_arrays(u, v)
    inside = _coverage(shape_mask(attrs.shape, u, v))[..., None]
    covered = _coverage(pattern)[..., None]
    canvas = base * (1 - covered) + pattern_rgb * covered
    canvas = canvas * (1 - inside) + colour * inside
    return np.round(canvas).astype(np.uint8)


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Supersampled bool mask -> [64, 64] fraction of covered samples per pixel (anti-aliasing)."""
    s = IMAGE_SIZE
    return mask.reshape(s, _SS, s, _SS).mean(axis=(1, 3), dtype=np.float32)


# ---- prompts ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptFamily:
    """Templates and synonyms of one prompt family.

    templates: (with background, without background) template lists; `{obj}` is the object phrase,
      `{bg}` a background adjective, `{bgnoun}` a background noun phrase.
    forms: object phrases with a colour (`{shape}`, `{colour}`); without a colour the phrase is
      "a {shape}".
    words: attribute name -> {value: synonyms}; `generic` names an unsaid shape.
    bg_nouns: background value -> noun phrases (for `{bgnoun}`).
    """

    name: str
    templates_bg: tuple[str, ...]
    templates: tuple[str, ...]
    forms: tuple[str, ...]
    words: dict[str, dict[int, tuple[str, ...]]]
    generic: tuple[str, ...]
    bg_nouns: dict[int, tuple[str, ...]]


SEEN = PromptFamily(
    name="seen",
    templates_bg=("{obj} on a {bg} background", "{obj} in front of a {bg} background", "a {bg} background with {obj}"),
    templates=("{obj}", "an image of {obj}"),
    forms=("a {colour} {shape}",),
    words={
        "shape": {s: (value_name(s),) for s in Shape},
        "colour": {c: (value_name(c),) for c in Colour},
        "background": {b: (value_name(b),) for b in Background},
    },
    generic=("shape",),
    bg_nouns={b: (f"a {value_name(b)} background",) for b in Background},
)

PARAPHRASE = PromptFamily(
    name="paraphrase",
    templates_bg=("{obj} with {bgnoun} behind it", "{obj} against a {bg} backdrop",
                  "a picture of {obj} over a {bg} backdrop", "{bg} backdrop , {obj}"),
    templates=("{obj}", "a picture of {obj}", "a drawing of {obj}"),
    forms=("a {colour} {shape}", "a {shape} in {colour}", "a {shape} painted {colour}"),
    words={
        "shape": {
            Shape.CIRCLE: ("disk", "disc", "round form"), Shape.SQUARE: ("box", "block"),
            Shape.TRIANGLE: ("pyramid", "wedge", "three-sided form"), Shape.STAR: ("pentagram", "five-pointed form"),
            Shape.CROSS: ("plus sign", "plus mark"), Shape.HEART: ("valentine", "love symbol"),
        },
        "colour": {
            Colour.RED: ("crimson", "scarlet"), Colour.GREEN: ("emerald", "jade"), Colour.BLUE: ("azure", "cobalt"),
            Colour.YELLOW: ("golden", "lemon"), Colour.PURPLE: ("violet", "plum"),
            Colour.ORANGE: ("tangerine", "amber"),
        },
        "background": {
            Background.PLAIN: ("solid", "blank", "uniform"), Background.STRIPED: ("banded", "lined", "pinstriped"),
            Background.DOTTED: ("spotted", "polka-dot", "speckled"),
            Background.CHECKERED: ("checkerboard", "chequered", "gingham"),
        },
    },
    generic=("object", "figure", "form"),
    bg_nouns={
        Background.PLAIN: ("a blank backdrop", "an empty backdrop"), Background.STRIPED: ("stripes", "bands"),
        Background.DOTTED: ("spots", "polka dots"), Background.CHECKERED: ("checks", "a checkerboard pattern"),
    },
)

PROMPT_FAMILIES = {"seen": SEEN, "paraphrase": PARAPHRASE}
# Probability that a randomly mentioned attribute is said (`mention=None`).
MENTION_PROBABILITY = {"shape": 0.85, "colour": 0.7, "background": 0.6}
_DRAWS = 5  # uniforms drawn per prompt for its choices (template, form, shape, colour, background words)


def _family(family: str | PromptFamily) -> PromptFamily:
    if isinstance(family, PromptFamily):
        return family
    if family not in PROMPT_FAMILIES:
        raise ValueError(f"unknown prompt family {family!r}; known: {FAMILIES}")
    return PROMPT_FAMILIES[family]


def _fix_articles(text: str) -> str:
    """'a orange' -> 'an orange' ('a uniform' stays); collapses spaces."""
    words = text.split()
    out = []
    for i, word in enumerate(words):
        if word in ("a", "an") and i + 1 < len(words):
            word = "an" if words[i + 1][0] in "aeio" else "a"
        out.append(word)
    return " ".join(out)


def _normalise_mention(mention) -> frozenset[str]:
    if mention == "all":
        return frozenset(ATTRIBUTE_NAMES)
    said = frozenset(mention)
    unknown = said - set(ATTRIBUTE_NAMES)
    if unknown:
        raise ValueError(f"mention names unknown attributes {sorted(unknown)}; known: {ATTRIBUTE_NAMES}")
    return said


def compose(attrs: Attributes, family: str | PromptFamily, said: Iterable[str], template: int = 0, form: int = 0,
            shape_word: int = 0, colour_word: int = 0, background_word: int = 0) -> str:
    """The prompt of `attrs` saying the attributes in `said`, with explicit template/synonym indices.

    Indices wrap around the lists they index (so any index is valid).
    """
    fam = _family(family)
    said = _normalise_mention(said)
    pick = lambda options, i: options[i % len(options)]
    shape = pick(fam.words["shape"][attrs.shape], shape_word) if "shape" in said else pick(fam.generic, shape_word)
    if "colour" in said:
        obj = pick(fam.forms, form).format(shape=shape, colour=pick(fam.words["colour"][attrs.colour], colour_word))
    else:
        obj = f"a {shape}"
    if "background" in said:
        text = pick(fam.templates_bg, template).format(
            obj=obj, bg=pick(fam.words["background"][attrs.background], background_word),
            bgnoun=pick(fam.bg_nouns[attrs.background], background_word))
    else:
        text = pick(fam.templates, template).format(obj=obj)
    return _fix_articles(text)


def _choices(rng: np.random.Generator) -> dict[str, int]:
    # Large integers: `compose` wraps them around each list, so one draw serves lists of any length.
    draws = rng.integers(0, 2 ** 30, size=_DRAWS)
    return dict(zip(("template", "form", "shape_word", "colour_word", "background_word"), (int(d) for d in draws),
                    strict=True))


def sample_mention(rng: np.random.Generator) -> frozenset[str]:
    """A random set of said attributes (each said with MENTION_PROBABILITY)."""
    u = rng.random(len(ATTRIBUTE_NAMES))
    return frozenset(name for name, x in zip(ATTRIBUTE_NAMES, u, strict=True) if x < MENTION_PROBABILITY[name])


def prompt(attrs: Attributes, rng: np.random.Generator, family: str = "seen", mention=None) -> str:
    """A prompt of `family` describing `attrs`.

    Args:
      mention: the attributes to say (names from ATTRIBUTE_NAMES, or "all"); None = a random subset
        (`sample_mention`). Unsaid attributes are simply not described.
    """
    random_said = sample_mention(rng)  # drawn in every case: the stream does not depend on `mention`
    said = random_said if mention is None else _normalise_mention(mention)
    return compose(attrs, family, said, **_choices(rng))


# ---- data sets -------------------------------------------------------------------------------------

class Dataset(NamedTuple):
    """images uint8 [N, 64, 64, 3]; labels {attr: int64 [N]}; prompts [N]; families [N]; mentions bool [N, 3]."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    prompts: list[str]
    families: list[str]
    mentions: np.ndarray


def dataset(n: int, seed: int, families: Sequence[str] = FAMILIES, mention=None,
            pattern_phase: str = "free") -> Dataset:
    """`n` images with labels and one prompt each (family drawn uniformly from `families`)."""
    _check_phase(pattern_phase)
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = {name: np.empty(n, np.int64) for name in ATTRIBUTE_NAMES}
    prompts, fams = [], []
    mentions = np.zeros((n, len(ATTRIBUTE_NAMES)), bool)
    for i in range(n):
        attrs = sample_attributes(rng)
        images[i] = render(attrs, rng, pattern_phase)
        for name, value in attrs.labels().items():
            labels[name][i] = value
        family = families[int(rng.integers(len(families)))]
        random_said = sample_mention(rng)
        said = random_said if mention is None else _normalise_mention(mention)
        prompts.append(compose(attrs, family, said, **_choices(rng)))
        fams.append(family)
        mentions[i] = [name in said for name in ATTRIBUTE_NAMES]
    return Dataset(images, labels, prompts, fams, mentions)


def attributes_at(labels: dict[str, np.ndarray], i: int) -> Attributes:
    return Attributes(**{name: int(labels[name][i]) for name in ATTRIBUTE_NAMES})


# ---- concepts --------------------------------------------------------------------------------------

CONCEPTS: dict[str, tuple[str, enum.IntEnum]] = {
    value_name(value): (name, value) for name, cls in ATTRIBUTES.items() for value in cls}


def parse_concept(concept: str | tuple[str, int]) -> tuple[str, enum.IntEnum]:
    """'circle' -> ('shape', Shape.CIRCLE); also accepts ('shape', 0)."""
    if isinstance(concept, tuple):
        name, value = concept
        return name, ATTRIBUTES[name](int(value))
    key = concept.strip().lower()
    if key not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; known: {sorted(CONCEPTS)}")
    return CONCEPTS[key]


def default_anchor(concept: str | tuple[str, int]) -> enum.IntEnum:
    """The anchor value of a concept: shapes -> cross (cross -> square), colours -> blue (blue -> red),
    backgrounds -> plain (plain -> striped).

    Cross for shapes: the anchor is what erased prompts should draw instead, so it must be told apart from
    the concept at a glance. At 64 px a square and a circle differ only in four corners (measured on the
    shipped base model: S-VARE towards square erased circle in 0.20 / 0.11 of seen / paraphrased prompts,
    towards cross in 0.98 / 0.94, same steps and learning rate: `varejax erase --config configs/toy_circle.py
    "--config.toy.anchors=('square',)" --config.attacks.enabled=False`, and the same with 'cross'); a cross
    shares the least area with any other shape."""
    name, value = parse_concept(concept)
    first, second = {"shape": (Shape.CROSS, Shape.SQUARE), "colour": (Colour.BLUE, Colour.RED),
                     "background": (Background.PLAIN, Background.STRIPED)}[name]
    return second if value == first else first


class PromptPair(NamedTuple):
    """A concept prompt and its anchor (the concept replaced by another value, same words otherwise)."""

    prompt: str
    anchor: str
    attrs: Attributes
    anchor_attrs: Attributes


def concept_prompts(concept: str | tuple[str, int], family: str = "seen", n: int = 32, seed: int = 0,
                    mention=None) -> list[tuple[str, Attributes]]:
    """`n` random prompts of `family` that mention `concept` (other attributes random, said or not).

    `mention`, when given, is the set of the *other* attributes to say as well.
    """
    return [(p.prompt, p.attrs) for p in anchor_pairs(concept, None, family, n, seed, mention)]


def _anchor_value(concept: str | tuple[str, int], anchor: str | int | None) -> enum.IntEnum:
    """The anchor's value (a name, a value, or None = `default_anchor`), of the concept's attribute."""
    name, value = parse_concept(concept)
    if anchor is None:
        return default_anchor((name, value))
    if isinstance(anchor, str):
        anchor_name, anchor_value = parse_concept(anchor)
        if anchor_name != name:
            raise ValueError(f"anchor {anchor!r} is a {anchor_name}, the concept {concept!r} a {name}")
        return anchor_value
    return ATTRIBUTES[name](int(anchor))


def anchor_pairs(concept: str | tuple[str, int], anchor: str | int | None = None, family: str = "seen", n: int = 32,
                 seed: int = 0, mention=None) -> list[PromptPair]:
    """`n` (concept prompt, anchor prompt) pairs of `family` with the same template, synonyms slots and
    other attributes; `anchor` (a value or its name; default `default_anchor`) replaces the concept."""
    name, value = parse_concept(concept)
    anchor_value = _anchor_value(concept, anchor)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        attrs = sample_attributes(rng, **{name: value})
        random_said = sample_mention(rng)
        said = (random_said if mention is None else _normalise_mention(mention)) | {name}
        choices = _choices(rng)
        other = attrs.replace(**{name: anchor_value})
        out.append(PromptPair(compose(attrs, family, said, **choices), compose(other, family, said, **choices),
                              attrs, other))
    return out


def to_anchor(text: str, concept: str | tuple[str, int], anchor: str | int | None = None) -> str:
    """Rewrites a prompt of either family with `concept` replaced by `anchor` (default `default_anchor`).

    Each synonym of the concept (and, for backgrounds, each noun phrase) becomes the anchor's synonym
    at the same index of the same family, and the articles are fixed: "a crimson disk with stripes
    behind it" -> "a crimson plus sign with stripes behind it" for circle -> cross.
    """
    import re

    name, value = parse_concept(concept)
    target = _anchor_value(concept, anchor)
    swaps = []
    for fam in PROMPT_FAMILIES.values():
        tables = [fam.words[name]] + ([fam.bg_nouns] if name == "background" else [])
        for table in tables:
            src, dst = table[value], table[target]
            swaps.extend((word, dst[i % len(dst)]) for i, word in enumerate(src))
    swaps.sort(key=lambda pair: -len(pair[0]))  # longest first: "plus sign" before "plus"
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(src) for src, _ in swaps) + r")(?![\w-])")
    lookup = dict(swaps)
    return _fix_articles(pattern.sub(lambda m: lookup[m.group(1)], text))


def enumerate_prompts(family: str = "seen", concept: str | tuple[str, int] | None = None) -> list[str]:
    """Every distinct prompt of `family` (that mentions `concept`, if given), sorted."""
    fam = _family(family)
    fixed = parse_concept(concept) if concept is not None else None
    out = set()
    for said_bits in itertools.product((False, True), repeat=len(ATTRIBUTE_NAMES)):
        said = frozenset(n for n, s in zip(ATTRIBUTE_NAMES, said_bits, strict=True) if s)
        if fixed is not None and fixed[0] not in said:
            continue
        value_lists = [[fixed[1]] if fixed is not None and fixed[0] == name else list(cls)
                       for name, cls in ATTRIBUTES.items()]
        n_templates = len(fam.templates_bg if "background" in said else fam.templates)
        for values in itertools.product(*value_lists):
            attrs = Attributes(*values)
            n_shape = len(fam.words["shape"][attrs.shape]) if "shape" in said else len(fam.generic)
            n_form = len(fam.forms) if "colour" in said else 1
            n_colour = len(fam.words["colour"][attrs.colour]) if "colour" in said else 1
            n_bg = max(len(fam.words["background"][attrs.background]), len(fam.bg_nouns[attrs.background])) \
                if "background" in said else 1
            for t, f, s, c, b in itertools.product(range(n_templates), range(n_form), range(n_shape), range(n_colour),
                                                   range(n_bg)):
                out.add(compose(attrs, fam, said, t, f, s, c, b))
    return sorted(out)


def vocabulary() -> list[str]:
    """Every word the prompts of both families use (split on whitespace), sorted."""
    words = set()
    for fam in PROMPT_FAMILIES.values():
        texts = list(fam.templates_bg) + list(fam.templates) + list(fam.forms) + list(fam.generic)
        for table in fam.words.values():
            for synonyms in table.values():
                texts.extend(synonyms)
        for phrases in fam.bg_nouns.values():
            texts.extend(phrases)
        for text in texts:
            for word in text.replace("{", " {").replace("}", "} ").split():
                if not word.startswith("{"):
                    words.add(word)
    words.update(("a", "an"))
    return sorted(words)
