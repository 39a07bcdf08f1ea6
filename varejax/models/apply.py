"""Pure-function view of the Infinity model: parameters in, logits out.

The NNX module holds the structure; training, sharding and checkpoints work on its parameter state
(an `nnx.State`). `forward(params, text, text_mask, next_scale_inputs, schedule, cfg=...)` merges the
cached graph definition of `cfg` with `params` inside the trace, so it is a pure function that can be
jitted, differentiated and sharded.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from varejax.models import schedules
from varejax.models.config import InfinityConfig
from varejax.models.infinity import Infinity
from varejax.models.layers import shapes_only
from varejax.models.state import count_params, fill_state, flat_params  # noqa: F401 (re-exported)


@functools.lru_cache(maxsize=32)
def graph_and_abstract_state(cfg: InfinityConfig) -> tuple[Any, nnx.State]:
    """(graphdef, abstract parameter state) of `cfg`, without allocating any parameter."""
    with shapes_only():
        abstract = nnx.eval_shape(lambda: Infinity(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state


def init_params(cfg: InfinityConfig, seed: int = 0) -> nnx.State:
    """Freshly initialised parameters (an `nnx.State`)."""
    return nnx.state(Infinity(cfg, nnx.Rngs(seed)))


def abstract_params(cfg: InfinityConfig) -> nnx.State:
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s (no memory)."""
    return graph_and_abstract_state(cfg)[1]


def state_from_flat(cfg: InfinityConfig, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """Builds the parameter state of `cfg` from {path: array}; every path must be present, shapes must match."""
    return fill_state(abstract_params(cfg), flat)


def bind(params: nnx.State, cfg: InfinityConfig) -> Infinity:
    """The module of `cfg` with `params` (inside or outside a trace)."""
    graphdef, _ = graph_and_abstract_state(cfg)
    return nnx.merge(graphdef, params)


def forward(params: nnx.State, text: jax.Array, text_mask: jax.Array, next_scale_inputs: jax.Array,
            schedule: schedules.Schedule, *, cfg: InfinityConfig, h_div_w_template: float | None = None,
            rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits [B, L, 2d] (see `Infinity.__call__`)."""
    model = bind(params, cfg)
    return model(text, text_mask, next_scale_inputs, schedule, h_div_w_template=h_div_w_template, rng=rng)


def forward_with_activations(params: nnx.State, text: jax.Array, text_mask: jax.Array,
                             next_scale_inputs: jax.Array, schedule: schedules.Schedule, *, cfg: InfinityConfig,
                             h_div_w_template: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits and the per-module activations upstream's forward hooks see (for parity checks)."""
    model = bind(params, cfg)
    model.capture_activations = True
    logits = model(text, text_mask, next_scale_inputs, schedule, h_div_w_template=h_div_w_template)
    captured = nnx.pop(model, nnx.Intermediate)
    acts = {name.removeprefix("act__"): value[0] for name, value in nnx.to_pure_dict(captured).items()}
    return logits, acts


forward_jit = jax.jit(forward, static_argnames=("schedule", "cfg", "h_div_w_template"))
forward_with_activations_jit = jax.jit(forward_with_activations,
                                       static_argnames=("schedule", "cfg", "h_div_w_template"))
