"""Pure-function view of the Infinity model: parameters in, logits out.

The NNX module holds the structure; training, sharding and checkpoints work on its parameter state
(an `nnx.State`). `forward(params, text, text_mask, next_scale_inputs, schedule, cfg=...)` merges the
cached graph definition of `cfg` with `params` inside the trace (`models.state.bind`), so it is a pure
function that can be jitted, differentiated and sharded.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from varejax.models import schedules, state
from varejax.models.config import InfinityConfig
from varejax.models.infinity import Infinity
from varejax.models.state import count_params, fill_state, flat_params  # noqa: F401 (re-exported)


def init_params(cfg: InfinityConfig, seed: int = 0) -> nnx.State:
    """Freshly initialised parameters (an `nnx.State`)."""
    return state.init_state(Infinity, cfg, seed)


def abstract_params(cfg: InfinityConfig) -> nnx.State:
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s (no memory)."""
    return state.abstract_state(Infinity, cfg)


def state_from_flat(cfg: InfinityConfig, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """Builds the parameter state of `cfg` from {path: array}; every path must be present, shapes must match."""
    return fill_state(abstract_params(cfg), flat)


def bind(params: nnx.State, cfg: InfinityConfig) -> Infinity:
    """The module of `cfg` with `params` (inside or outside a trace)."""
    return state.bind(Infinity, params, cfg)


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
