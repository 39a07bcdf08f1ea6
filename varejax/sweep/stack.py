"""Many S-VARE runs trained as one program: trainable parameters and optimiser states stacked on a run axis.

Runs that share the base model, the update (`mode`), the trainable set and every static setting
(`stack_key`) train together. `stacked_step(update_fn)` `jax.vmap`s one run's update (the pure
`*_update` functions of varejax.erase.step) over a leading run axis of size R:

  frozen        the full parameter state of the base model, shared (not stacked); each run's trainable
                leaves replace its trainable leaves inside the step
  train_stack   {path: [R, ...]}  each run's trainable parameters (`optim.trainable_params` layout)
  opt_stack     the optimiser states, every leaf [R, ...]; learning_rate / weight_decay / max_grad_norm
                are leaves of it (`opt_state.hyperparams`), so they differ per run without recompiling
  batch_stack   {key: [R, B, ...]}  each run's batch of this step (`stack_batches`)
  rng_stack     [R] PRNG keys (`jax.random.fold_in(jax.random.key(seed_r), step)`), or None
  numerics      {alpha, reg_lambda, summed_lambda: [R] float32} (`stack_numerics`): put into the static
                SvareConfig inside the vmapped function (they are used arithmetically, never in Python
                control flow, so they can be traced)

    train_stack, opt_stack = init_stack(params, scfgs)
    step = stacked_step(UPDATES[mode])
    train_stack, opt_stack, metrics = step(params, train_stack, opt_stack, stack_batches(batches), rngs,
                                           stack_numerics(scfgs), cfg=cfg, schedule=schedule, scfg=scfgs[0])
    run_r_params = optim.merge_trainable(params, unstack(train_stack, r))

A run trained in a stack ends with the parameters it gets trained alone up to float32 rounding: XLA
picks reduction orders (softmax, norms, means) by the shape of the whole array, so the logits differ in
the last bits and Adam amplifies that on near-zero gradient elements. tests/test_sweep_stack.py measures
||p_stack - p_alone|| <= 2.5e-6 of the run's total change after 3 steps, every metric within 1.7e-7
relative (kept fractions, lr and step counts equal).

Sharding (inside `varejax.parallel.sharding_context(mesh, rules)`): when R is a multiple of the size of
the mesh's `data` axis, the run axis is split over `data` (vmap's `spmd_axis_name`, and the stacked
leaves constrained to it) and inside the vmapped step the rules lose `data` (each run's batch and
activations go over `fsdp` alone: a mesh axis shards one dimension only). The frozen base stays as it
was placed (replicated over `data`, FSDP / tensor sharded by the rules). Otherwise the run axis is left
to XLA and each run's batch keeps `data`, as a single run trains. Per-step metrics come back replicated.
`shard_stack` / `shard_batch_stack` place stacked inputs the way the step expects them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from varejax.erase import optim
from varejax.erase.step import SvareConfig
from varejax.models import schedules
from varejax.parallel.rules import LogicalRules, active_sharding, logical_to_spec, sharding_context

F32 = jnp.float32
# SvareConfig fields that may differ between the runs of one stack (traced inside the step).
NUMERIC_FIELDS = ("alpha", "reg_lambda", "summed_lambda")
# OptimConfig fields that may differ: they live in each run's optimiser state.
OPTIM_FIELDS = ("learning_rate", "weight_decay", "max_grad_norm")
RUN_AXIS = "data"  # the mesh axis the run axis is split over
# Text arrays [B, T, C] and their masks [B, T]: padded to one length T across a stack.
TEXT_MASKS = {"target_text": "target_mask", "anchor_text": "anchor_mask"}


# ---- which runs share a stack -------------------------------------------------------------------------

def stack_key(scfg: SvareConfig) -> SvareConfig:
    """What every run of one stack must share: `scfg` with its per-run numbers reset to the defaults.

    The result is hashable (the static argument of the compiled step); runs whose keys are equal (and
    whose update function, the `mode`, is the same) can be trained in one stack. Per-run numbers are
    NUMERIC_FIELDS and the optimiser's OPTIM_FIELDS; seeds and batches are per run too.
    """
    defaults = SvareConfig()
    return dataclasses.replace(scfg.static(), **{f: getattr(defaults, f) for f in NUMERIC_FIELDS})


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    out = []
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += _differences(x, y, f"{prefix}{field.name}.")
        elif x != y:
            out.append(f"{prefix}{field.name} ({x!r} vs {y!r})")
    return out


def check_stackable(scfgs: Sequence[SvareConfig]) -> SvareConfig:
    """The common `stack_key` of `scfgs`; ValueError naming the fields when two runs cannot share a stack."""
    if not scfgs:
        raise ValueError("a stack needs at least one run")
    first = stack_key(scfgs[0])
    for i, scfg in enumerate(scfgs[1:], start=1):
        key = stack_key(scfg)
        if key != first:
            raise ValueError(f"run {i} cannot share a stack with run 0: {', '.join(_differences(key, first))} differ")
    return first


def stack_numerics(scfgs: Sequence[SvareConfig]) -> dict[str, np.ndarray]:
    """{field: [R] float32} of the NUMERIC_FIELDS of each run (the step's `numerics` argument)."""
    return {f: np.asarray([getattr(s, f) for s in scfgs], np.float32) for f in NUMERIC_FIELDS}


# ---- stacking -----------------------------------------------------------------------------------------

def stack(trees: Sequence[Any]) -> Any:
    """Trees of equal structure -> one tree whose leaves have a new leading run axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, r: int) -> Any:
    """Run `r` of a stacked tree (every leaf indexed at r on its leading axis)."""
    return jax.tree.map(lambda x: x[r], tree)


def run_metrics(metrics_stack: Mapping[str, Any], r: int) -> dict[str, np.ndarray]:
    """Run `r`'s metrics of one stacked step, as numpy (the step returns them replicated)."""
    return {k: np.asarray(jax.device_get(v))[r] for k, v in metrics_stack.items()}


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]], text_length: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Each run's batch of one step (`TrajectoryBatches[step]`) -> one dict of [R, B, ...] arrays.

    Text arrays and their masks (TEXT_MASKS) are zero-padded to the longest text of the stack (or to
    `text_length` when that is longer); every other array must have one shape across the runs.
    """
    if not batches:
        raise ValueError("stack_batches needs at least one batch")
    keys = set(batches[0])
    for i, batch in enumerate(batches):
        if set(batch) != keys:
            raise KeyError(f"batch {i} has keys {sorted(batch)}, batch 0 has {sorted(keys)}")
    out = {}
    for key in sorted(keys):
        arrays = [np.asarray(b[key]) for b in batches]
        if key in TEXT_MASKS or key in TEXT_MASKS.values():
            length = max([a.shape[1] for a in arrays] + [text_length or 0])
            arrays = [np.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"batch arrays {key!r} differ in shape across the runs: {sorted(shapes)}")
        out[key] = np.stack(arrays)
    return out


# ---- sharding -----------------------------------------------------------------------------------------

def run_axis(mesh: Mesh, runs: int) -> str | None:
    """The mesh axis the run axis is split over: `data` when it has > 1 devices and divides R, else None."""
    size = mesh.shape[RUN_AXIS]
    return RUN_AXIS if size > 1 and runs % size == 0 else None


def _without_axis(rules: LogicalRules, axis: str) -> LogicalRules:
    out = []
    for name, axes in rules:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = tuple(a for a in axes if a != axis)
        out.append((name, kept or None))
    return tuple(out)


def inner_rules(mesh: Mesh, rules: LogicalRules, runs: int) -> LogicalRules:
    """The rules inside the vmapped step: without `data` when the run axis takes it."""
    return _without_axis(rules, RUN_AXIS) if run_axis(mesh, runs) else rules


def _logical_axes(frozen: nnx.State) -> dict[tuple[str, ...], Any]:
    return {tuple(str(p) for p in path): getattr(var, "logical_axes", None) for path, var in nnx.to_flat_state(frozen)}


def _param_path(keypath: tuple, known: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    """The parameter path a leaf of a stacked tree belongs to (a dict key such as ('blocks', '0', ...))."""
    for entry in keypath:
        key = getattr(entry, "key", None)
        if isinstance(key, tuple) and key in known:
            return key
    return None


def stack_specs(tree: Any, frozen: nnx.State, mesh: Mesh, rules: LogicalRules) -> Any:
    """PartitionSpecs of a stacked tree (train_stack, opt_stack, rng_stack, numerics).

    Dim 0 (the run axis) goes over `run_axis`; a leaf of a parameter's shape (a trainable leaf, an Adam
    moment) is sharded like the parameter by the rules without `data`; other leaves are whole per run.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jax.tree.map(lambda x: PartitionSpec(), tree)
    runs = leaves[0].shape[0]
    axis = run_axis(mesh, runs)
    rules = _without_axis(rules, RUN_AXIS)
    logical = _logical_axes(frozen)

    def spec(keypath, x):
        path = _param_path(keypath, logical)
        names = logical.get(path) if path is not None else None
        rest = () if names is None or len(names) != x.ndim - 1 else tuple(logical_to_spec(names, rules, mesh,
                                                                                           x.shape[1:]))
        return PartitionSpec(axis, *rest)

    return jax.tree_util.tree_map_with_path(spec, tree)


def batch_stack_specs(batch_stack: Mapping[str, Any], mesh: Mesh, rules: LogicalRules) -> dict[str, PartitionSpec]:
    """PartitionSpecs of a batch stack [R, B, ...]: runs over `run_axis`, each run's rows by `act_batch`."""
    out = {}
    for key, x in batch_stack.items():
        runs, rows = x.shape[:2]
        batch = logical_to_spec(("act_batch",), inner_rules(mesh, rules, runs), mesh, (rows,))
        out[key] = PartitionSpec(run_axis(mesh, runs), *tuple(batch))
    return out


def _named(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_stack(tree: Any, frozen: nnx.State, mesh: Mesh, rules: LogicalRules) -> Any:
    """`tree` (a train / opt / rng / numerics stack) placed on `mesh` as `stack_specs` says."""
    return jax.device_put(tree, _named(stack_specs(tree, frozen, mesh, rules), mesh))


def shard_batch_stack(batch_stack: Mapping[str, Any], mesh: Mesh, rules: LogicalRules) -> dict[str, jax.Array]:
    """A batch stack placed on `mesh` as `batch_stack_specs` says."""
    return jax.device_put(dict(batch_stack), _named(batch_stack_specs(batch_stack, mesh, rules), mesh))


def _constrain(tree: Any, specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)), tree, specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---- initial state ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("ocfg", "sharding"))
def _init_stack(params, hyper, *, ocfg, sharding):
    train = optim.trainable_params(params, ocfg.trainable)
    opt_state = optim.make_optimizer(ocfg).init(train)
    runs = next(iter(hyper.values())).shape[0]
    def repeat(x):
        return jnp.broadcast_to(x, (runs,) + x.shape)

    train_stack, opt_stack = jax.tree.map(repeat, train), jax.tree.map(repeat, opt_state)
    opt_stack = opt_stack._replace(hyperparams={**opt_stack.hyperparams, **hyper})
    if sharding is not None:
        mesh, rules = sharding
        train_stack = _constrain(train_stack, stack_specs(train_stack, params, mesh, rules), mesh)
        opt_stack = _constrain(opt_stack, stack_specs(opt_stack, params, mesh, rules), mesh)
    return train_stack, opt_stack


def init_stack(params: nnx.State, scfgs: Sequence[SvareConfig]) -> tuple[dict, Any]:
    """(train_stack, opt_stack) of R runs that all start from `params`.

    Run r's optimiser state is `init_opt_state(params, scfgs[r])` (its own learning_rate, weight_decay and
    max_grad_norm). Inside a sharding context the stacks are created sharded (see the module docstring).

    Raises:
      ValueError: two runs differ in a static setting (`check_stackable`).
    """
    key = check_stackable(scfgs)
    hyper = {f: jnp.asarray([getattr(s.optim, f) for s in scfgs], F32) for f in OPTIM_FIELDS}
    return _init_stack(params, hyper, ocfg=key.optim, sharding=active_sharding())


# ---- the stacked step ---------------------------------------------------------------------------------

def _stacked_update(update_fn, frozen, train_stack, opt_stack, batch_stack, rng_stack, numerics, *, cfg, schedule,
                    scfg, sharding):
    """vmap of one run's update over the run axis (un-jitted; see `stacked_step`)."""

    def one_run(train, opt_state, batch, rng, numeric):
        run_scfg = dataclasses.replace(scfg, **numeric)
        params = optim.merge_trainable(frozen, train)
        params, opt_state, metrics = update_fn(params, opt_state, batch, rng, cfg=cfg, schedule=schedule,
                                               scfg=run_scfg)
        return optim.trainable_params(params, scfg.optim.trainable), opt_state, metrics

    args = (train_stack, opt_stack, batch_stack, rng_stack, numerics)
    if sharding is None:
        return jax.vmap(one_run)(*args)
    mesh, rules = sharding
    runs = jax.tree.leaves(train_stack)[0].shape[0]
    train_specs = stack_specs(train_stack, frozen, mesh, rules)
    opt_specs = stack_specs(opt_stack, frozen, mesh, rules)
    train_stack = _constrain(train_stack, train_specs, mesh)
    opt_stack = _constrain(opt_stack, opt_specs, mesh)
    batch_stack = _constrain(batch_stack, batch_stack_specs(batch_stack, mesh, rules), mesh)
    with sharding_context(mesh, inner_rules(mesh, rules, runs)):
        train_stack, opt_stack, metrics = jax.vmap(one_run, spmd_axis_name=run_axis(mesh, runs))(
            train_stack, opt_stack, batch_stack, rng_stack, numerics)
    replicated = jax.tree.map(lambda _: PartitionSpec(), metrics)
    return (_constrain(train_stack, train_specs, mesh), _constrain(opt_stack, opt_specs, mesh),
            _constrain(metrics, replicated, mesh))


def stacked_step(update_fn: Callable, *, donate: bool = False) -> Callable:
    """The jitted stacked version of one of the `*_update` functions of varejax.erase.step.

    Returns `step(frozen, train_stack, opt_stack, batch_stack, rng_stack, numerics, *, cfg, schedule, scfg)
    -> (train_stack, opt_stack, metrics_stack)`, every metric with a leading run axis. `scfg` is any run's
    config (only its `stack_key` is used: one compilation per stack key); `numerics` ({field: [R]}, see
    `stack_numerics`) gives each run's NUMERIC_FIELDS, a missing field takes scfg's value for every run;
    `rng_stack` may be None. With `donate=True` train_stack and opt_stack are donated. The sharding
    context active at the call decides the layout (module docstring) and is part of the compilation key.
    """
    compiled = jax.jit(functools.partial(_stacked_update, update_fn),
                       static_argnames=("cfg", "schedule", "scfg", "sharding"),
                       donate_argnums=(1, 2) if donate else ())

    @functools.wraps(update_fn)
    def step(frozen, train_stack, opt_stack, batch_stack, rng_stack, numerics=None, *, cfg, schedule, scfg):
        runs = jax.tree.leaves(train_stack)[0].shape[0]
        numerics = dict(numerics or {})
        unknown = sorted(set(numerics) - set(NUMERIC_FIELDS))
        if unknown:
            raise KeyError(f"numerics {unknown} cannot differ within a stack; per-run numbers: {NUMERIC_FIELDS}")
        values = {f: jnp.asarray(numerics[f], F32) if f in numerics else jnp.full((runs,), getattr(scfg, f), F32)
                  for f in NUMERIC_FIELDS}
        return compiled(frozen, train_stack, opt_stack, dict(batch_stack), rng_stack, values, cfg=cfg,
                        schedule=schedules.as_schedule(schedule), scfg=stack_key(scfg), sharding=active_sharding())

    step.__doc__ = f"Stacked, jitted `{update_fn.__name__}` (see varejax.sweep.stack.stacked_step)."
    step.compiled = compiled
    return step
