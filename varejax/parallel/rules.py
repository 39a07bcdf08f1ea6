"""Logical axis names and the one table that maps them to mesh axes.

Model code names the dimensions of parameters and activations with logical names only (`embed`,
`heads`, `mlp`, `act_batch`, ...). This module turns those names into `PartitionSpec`s over the mesh
axes `data`, `fsdp`, `tensor`, using a rules table (a tuple of `(logical, mesh axes)` pairs that
configs may override). Two rules of interpretation, both as in MaxText:

* a mesh axis is used at most once per array: a later dimension that maps to an axis already used
  is replicated instead;
* a dimension that is not divisible by the product of its mesh axes is replicated (small test
  models and odd sizes such as 15 level embeddings then still run on any mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from varejax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # activations
    ("act_batch", ("data", "fsdp")),   # samples: data parallel over both data and fsdp axes
    ("act_len", None),                 # tokens of the VAR sequence
    ("act_embed", None),               # model width of activations
    ("act_heads", "tensor"),           # attention heads (Megatron-style tensor parallel)
    ("act_mlp", "tensor"),             # FFN hidden units
    ("act_text_len", None),            # text tokens
    # parameters
    ("embed", "fsdp"),                 # model width: FSDP shards every matrix along it
    ("cond", "fsdp"),                  # condition width D (= C in released models)
    ("text_embed", "fsdp"),            # T5 feature width
    ("heads", "tensor"),               # attention projections' head-major features
    ("mlp", "tensor"),                 # FFN hidden units
    ("ada", None),                     # ada-LN gamma/scale/shift outputs
    ("bits", None),                    # bits per token (word_embed input)
    ("vocab", None),                   # head outputs (2 logits per bit)
    ("levels", None),                  # level embedding rows
    ("text_len", None),                # rows of cfg_uncond
    ("norm", None),                    # norm scales, per-head temperatures
    ("lora", None),                    # LoRA rank (a handful of columns: never sharded)
    ("t5_vocab", None),                # T5 token embedding rows (gathered, so kept whole)
    ("t5_buckets", None),              # T5 relative position buckets
    ("conv_in", None),                 # BSQ-VAE conv input channels (the tokenizer stays data-parallel)
    ("conv_out", None),                # BSQ-VAE conv output channels
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "varejax_sharding", default=None)


def _rules_dict(rules: LogicalRules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
        unknown = [a for a in out[name] if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"sharding rule {name!r} (config.mesh.rules) names unknown mesh axes {unknown}; "
                              f"mesh axes are {MESH_AXES}")
    return out


def logical_to_spec(logical: Sequence[str | None], rules: LogicalRules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names.

    Args:
      logical: one logical name (or None) per dimension.
      rules: the rules table.
      mesh: when given with `shape`, mesh axes of size 1 are dropped and non-divisible dims replicated.
      shape: the array's shape.
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        axes = tuple(a for a in table[name] if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Activates `mesh` and `rules` for `constrain` calls traced inside the block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, LogicalRules] | None:
    """The (mesh, rules) of the enclosing `sharding_context`, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `sharding_context`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
