"""Device meshes with the axes `data`, `fsdp`, `tensor`, and parameter placement by logical names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from varejax.errors import ConfigError
from varejax.parallel.rules import DEFAULT_RULES, MESH_AXES, LogicalRules, logical_to_spec


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes (data, fsdp, tensor).

    One entry of `shape` may be -1 (filled with the remaining devices); a mesh smaller than the device
    count uses the first devices (e.g. (1, 1, 1) for a single-device run on a multi-device host). Axes are explicitly
    `AxisType.Auto`: `jax.make_mesh` otherwise defaults to Explicit axes, under which GSPMD-style
    logical constraints do not apply.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ConfigError(f"mesh shape (config.mesh.shape) must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis (config.mesh.shape) may be -1, got {shape}")
    known = 1
    for s in shape:
        known *= s if s != -1 else 1
    if -1 in shape:
        shape[shape.index(-1)] = len(devices) // known
    total = shape[0] * shape[1] * shape[2]
    if total > len(devices) or total < 1:
        raise ConfigError(f"mesh {tuple(shape)} (config.mesh.shape) needs {total} devices, {len(devices)} available")
    devices = devices[:total]
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """PartitionSpecs for an `nnx.State`, from each variable's `logical_axes` metadata."""

    def spec_of(var: Any) -> PartitionSpec:
        logical = getattr(var, "logical_axes", None)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if logical is None:
            return PartitionSpec()
        if len(logical) != len(value.shape):
            raise ValueError(f"logical axes {logical} do not match the shape {value.shape}")
        return logical_to_spec(logical, rules, mesh, value.shape)

    return jax.tree.map(spec_of, state, is_leaf=_is_variable)


def param_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for an `nnx.State` (same tree structure as the state)."""
    specs = param_specs(state, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_state(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Places every variable of `state` on `mesh` as the rules say."""
    shardings = param_shardings(state, mesh, rules)
    return jax.device_put(state, shardings)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, ndim: int = 1,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a batch-major array: dim 0 is `act_batch`, the rest replicated.

    With `shape`, a batch that does not divide the data axes is replicated instead of failing.
    """
    ndim = len(shape) if shape is not None else ndim
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), rules, mesh, shape))


def abstract_sharded_state(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """The state with every value a `jax.ShapeDtypeStruct` carrying its rule-given sharding (no memory).

    What AOT lowering (`jit(...).lower(...)`) and sharded restores take as a target.
    """
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        logical = getattr(var, "logical_axes", None)
        spec = PartitionSpec() if logical is None else logical_to_spec(logical, rules, mesh, value.shape)
        out.append((path, var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                            sharding=NamedSharding(mesh, spec)))))
    return nnx.from_flat_state(out)


def batch_split(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """Into how many parts the mesh splits a batch (the product of the mesh axes `act_batch` maps to)."""
    spec = logical_to_spec(("act_batch",), rules, mesh)
    axes = spec[0] if len(spec) else ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def _mesh_text(mesh: Mesh) -> str:
    return "(" + ", ".join(str(s) for s in mesh.shape.values()) + ")"


def check_global_batch(batch: int, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES,
                       field: str = "config.train.batch_size") -> None:
    """Refuses a global batch the mesh cannot split evenly over its batch axes (before anything runs)."""
    parts = batch_split(mesh, rules)
    if batch >= 1 and batch % parts == 0:
        return
    devices = mesh.devices.size
    fixes = [f"--{field}={max(parts, (batch // parts + 1) * parts)}"]
    if batch >= 1 and devices % batch == 0:
        fixes.append(f"--config.mesh.shape='({batch}, 1, {devices // batch})'")
    raise ConfigError(
        f"the global batch {field} = {batch} cannot be split over the mesh {_mesh_text(mesh)} (data, fsdp, tensor), "
        f"whose batch axes (data x fsdp) make {parts} parts; give a multiple of {parts}, e.g. "
        + " or ".join(fixes) + " (the batch is global: every process loads its share)")


def check_mesh_spans_processes(mesh: Mesh) -> None:
    """Refuses a mesh that leaves a process without devices (every process must hold part of the mesh)."""
    holders = {d.process_index for d in mesh.devices.flat}
    missing = sorted(set(range(jax.process_count())) - holders)
    if missing:
        raise ConfigError(
            f"the mesh {_mesh_text(mesh)} (config.mesh.shape) uses {mesh.devices.size} of {jax.device_count()} "
            f"devices and none of process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))}; "
            f"on {jax.process_count()} processes give a mesh over all devices, e.g. --config.mesh.shape='(-1, 1, 1)'")


def process_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The rows of dim 0 of a global array that this process's devices hold (what it must load)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    start, stop = min(starts), max(stops)
    intervals = sorted(set(zip(starts, stops, strict=True)))
    if sum(b - a for a, b in intervals) != stop - start:  # never with make_mesh's device order
        raise ValueError(f"this process's rows of the batch are not contiguous: {intervals}")
    return slice(start, stop)
