"""A sweep's grid -> named runs, each a complete erase config.

A sweep config (see configs/sweep_toy.py) holds `base` (an erase config) and `grid`, a tuple of axes:

    ("train.learning_rate", (1e-4, 3e-4))              one field, one value per grid point
    ("method", ({"name": "svare", "train.erase_loss": "fce"},
                {"name": "esd", "train.erase_loss": "esd", "train.mode": "erase_only"}))
                                                        several fields at once; "name" labels the point

The runs are the cartesian product of the axes, in order (the last axis varies fastest). A run's name
joins `axis=label` for every axis ("method=svare,learning_rate=0.0003,seed=0"; an axis named by a dotted
field is shortened to its last part), so names are stable when grid points are added and a finished
run is found again by name.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from varejax.configlib import set_field
from varejax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Run:
    """One grid point: its name, the label of each axis, and its erase config (locked)."""

    name: str
    grid: dict[str, Any]
    config: ml_collections.ConfigDict


def _label(value: Any) -> str:
    if isinstance(value, Mapping):
        if "name" in value:
            return str(value["name"])
        return "+".join(_label(v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return "+".join(_label(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _safe(text: str) -> str:
    """A path-safe form: letters, digits and . _ - + kept, anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", text)


def axis_short_name(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _axes(grid: Sequence[Any]) -> list[tuple[str, tuple[Any, ...]]]:
    axes = []
    for entry in grid:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (tuple, list)) and entry[1]):
            raise ConfigError(f"sweep grid: each axis is (field or name, (value, ...)) with at least one value, "
                              f"not {entry!r}")
        axes.append((entry[0], tuple(entry[1])))
    names = [axis_short_name(a) for a, _ in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep grid: axis names {names} repeat; name dict-valued axes apart")
    return axes


def expand(base: ml_collections.ConfigDict, grid: Sequence[Any]) -> list[Run]:
    """Every grid point as a Run (names unique; raises ConfigError on an unknown field or repeated name)."""
    axes = _axes(grid)
    runs, seen = [], {}
    for point in itertools.product(*(values for _, values in axes)):
        labels = {axis_short_name(axis): _label(value) for (axis, _), value in zip(axes, point, strict=True)}
        name = ",".join(f"{_safe(a)}={_safe(v)}" for a, v in labels.items()) or "base"
        config = copy.deepcopy(base)
        config.unlock()
        for (axis, _), value in zip(axes, point, strict=True):
            fields = value if isinstance(value, Mapping) else {axis: value}
            for field, field_value in fields.items():
                if field != "name":
                    set_field(config, field, field_value, f"sweep grid: run {name!r} sets {field}, but the base "
                                                          f"config has no such field")
        if name in seen:
            raise ConfigError(f"sweep grid: two grid points are both named {name!r} ({seen[name]} and {point}); "
                              f"give dict values distinct 'name's")
        seen[name] = point
        runs.append(Run(name, labels, config.lock()))
    return runs
