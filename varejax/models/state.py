"""Parameter states of NNX models: flat {path: array} dicts and the pure-function view, for every model.

Paths are string tuples, e.g. ('blocks', '0', 'sa', 'proj', 'kernel'); checkpoints, converters and the
trainer all speak this form.

The pure-function view: a module class built as `module_cls(cfg, rngs)` with a hashable config is split
once per config into a graph definition and an abstract state (`graph_and_abstract_state`, cached);
`bind(module_cls, params, cfg)` merges that graph with a parameter state, inside or outside a trace, so
`forward(params, ...)` functions are pure and can be jitted, differentiated and sharded.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from varejax.models.layers import shapes_only


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


@functools.lru_cache(maxsize=64)
def graph_and_abstract_state(module_cls: type[nnx.Module], cfg: Any) -> tuple[Any, nnx.State]:
    """(graphdef, abstract parameter state) of `module_cls(cfg, rngs)`, without allocating any parameter."""
    with shapes_only():
        abstract = nnx.eval_shape(lambda: module_cls(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state


def abstract_state(module_cls: type[nnx.Module], cfg: Any) -> nnx.State:
    """Parameter shapes and dtypes of `module_cls(cfg, ...)` as `jax.ShapeDtypeStruct`s (no memory)."""
    return graph_and_abstract_state(module_cls, cfg)[1]


def init_state(module_cls: type[nnx.Module], cfg: Any, seed: int = 0) -> nnx.State:
    """Freshly initialised parameters of `module_cls(cfg, ...)` (an `nnx.State`)."""
    return nnx.state(module_cls(cfg, nnx.Rngs(seed)))


def bind(module_cls: type[nnx.Module], params: nnx.State, cfg: Any) -> Any:
    """The module `module_cls(cfg, ...)` holding `params` (inside or outside a trace)."""
    graphdef, _ = graph_and_abstract_state(module_cls, cfg)
    return nnx.merge(graphdef, params)
