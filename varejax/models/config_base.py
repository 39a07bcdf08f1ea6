"""What every model config shares: a frozen dataclass that (de)serialises as config.json's "model"."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self, TypeVar

C = TypeVar("C")


class ModelConfig:
    """Mixin of the model configs (frozen, hashable dataclasses: static arguments of `jax.jit`).

    Subclasses set `arch_fields`, the fields that fix the parameter shapes (a plain class attribute,
    not a dataclass field); the other fields are numerics, which may change when a folder is loaded.
    """

    arch_fields: tuple[str, ...] = ()

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def arch_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.arch_fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The config of a dict (config.json's "model"); unknown fields are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**data)


def lookup_preset(name: str, presets: Mapping[str, C], aliases: Mapping[str, str], model: str) -> C:
    """presets[name] (or the preset an alias names); KeyError listing every known name otherwise."""
    key = aliases.get(name, name)
    if key not in presets:
        raise KeyError(f"unknown {model} preset {name!r}; known: {sorted(presets) + sorted(aliases)}")
    return presets[key]
