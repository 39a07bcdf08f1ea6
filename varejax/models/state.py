"""Parameter states of NNX models as flat {path: array} dicts, shared by every model in varejax.

Paths are string tuples, e.g. ('blocks', '0', 'sa', 'proj', 'kernel'); checkpoints, converters and the
trainer all speak this form.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import nnx


def path_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def flat_params(state: nnx.State) -> dict[tuple[str, ...], Any]:
    """{path: array or ShapeDtypeStruct} of a state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[path_key(path)] = var.get_value() if hasattr(var, "get_value") else var
    return out


def fill_state(abstract: nnx.State, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """The state with the structure and metadata of `abstract` and the arrays of `flat`.

    Every path must be present with its shape (values are cast to the abstract dtype); extra paths are
    an error. Raises KeyError / ValueError naming the parameter.
    """
    out, seen = [], set()
    for path, var in nnx.to_flat_state(abstract):
        key = path_key(path)
        seen.add(key)
        if key not in flat:
            raise KeyError(f"parameter {'.'.join(key)} missing")
        value = flat[key]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"parameter {'.'.join(key)} has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
        out.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    extra = sorted(set(flat) - seen)
    if extra:
        raise KeyError(f"unexpected parameters {extra[:5]}")
    return nnx.from_flat_state(out)


def count_params(state: nnx.State) -> int:
    return sum(math.prod(v.shape) for v in flat_params(state).values())
