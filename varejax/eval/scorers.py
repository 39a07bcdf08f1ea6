"""One interface for every metric of `varejax eval`: a scorer turns images (and their prompt rows) into
per-image values, then a summary; each scorer states every setting that determines its numbers.

    scorer = build_scorer("nudity", {"thresholds": (0.45, 0.6, 0.75)})
    per_image = scorer.score(images, rows)          # {"name": array [N, ...]}
    summary = scorer.summarize(per_image, rows)     # {"name": float | dict}
    settings = scorer.settings()                    # version, model file hash, thresholds, classes, ...

Images are uint8 RGB arrays [N, H, W, 3] (colour order fixed here: RGB, whatever a wrapped tool expects).
`rows` are the prompt file's rows (dicts with at least `prompt` and `seed`, plus the task's own columns,
e.g. `class` for object prompts), one per image. Per-image values are what `varejax eval` stores and
resumes from; summaries are computed from them alone, so a resumed run summarises every image at once.

Plug-ins register a factory under a name (`@register_scorer("name")`); a lab adds its own classifier the
same way (import its module before `varejax eval`, or name it in `config.eval.plugins`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from varejax.errors import UserError


@runtime_checkable
class Scorer(Protocol):
    """What `varejax eval` needs of a metric."""

    name: str

    def settings(self) -> dict[str, Any]:
        """Everything that determines the numbers (versions, file hashes, thresholds, class lists, templates)."""

    def score(self, images: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Per-image values: arrays whose first axis is the image index."""

    def summarize(self, per_image: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Set-level figures from the per-image values of every image of the task."""


_FACTORIES: dict[str, Callable[..., Scorer]] = {}
# Built-in scorers live in modules imported on first use (heavy optional dependencies stay optional).
_BUILTIN_MODULES = {
    "nudity": "varejax.eval.nudity",
    "clip_score": "varejax.eval.clip_metrics",
    "clip_zero_shot": "varejax.eval.clip_metrics",
    "fid": "varejax.eval.fid",
    "toy_oracle": "varejax.eval.toy_scorer",
}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: registers `factory(**options) -> Scorer` under `name` (a second registration replaces it)."""

    def wrap(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        _FACTORIES[name] = factory
        return factory

    return wrap


def import_plugins(modules: Sequence[str]) -> None:
    """Imports user modules that register scorers; a module that cannot be imported is a user error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"scorer plug-in module {module!r} cannot be imported: {err}") from err


def available_scorers() -> list[str]:
    return sorted(set(_FACTORIES) | set(_BUILTIN_MODULES))


def build_scorer(name: str, options: Mapping[str, Any] | None = None) -> Scorer:
    """The scorer registered under `name`, built with `options` (a config dict)."""
    if name not in _FACTORIES and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _FACTORIES:
        raise UserError(f"unknown scorer {name!r}; known: {', '.join(available_scorers())}")
    scorer = _FACTORIES[name](**dict(options or {}))
    if not isinstance(scorer, Scorer):
        raise TypeError(f"the factory of scorer {name!r} returned {type(scorer).__name__}, not a Scorer")
    return scorer


def check_images(images: np.ndarray, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """`images` as uint8 [N, H, W, 3], or a one-line UserError naming `where` and what is wrong."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{where}: images must be [N, H, W, 3] RGB, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8, got {images.dtype}")
    if size is not None and tuple(images.shape[1:3]) != tuple(size):
        raise UserError(f"{where}: images are {images.shape[1]}x{images.shape[2]}, expected {size[0]}x{size[1]}")
    return images
