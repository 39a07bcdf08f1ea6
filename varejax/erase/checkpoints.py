"""Orbax checkpoints of a training run, every array stored and restored under its name.

    checkpoints = Checkpoints(workdir / "checkpoints")
    checkpoints.save(step, {"params": trainable, "opt_state": opt_state})
    state = checkpoints.restore(checkpoints.latest_step(), like={"params": ..., "opt_state": ...})

A name is the "/"-joined key path of a leaf ("params/blocks/0/ca/mat_q/kernel",
"opt_state/inner_state/1/mu/blocks/0/ca/mat_q/kernel"), so a restore never depends on the order in
which two trees flatten, and a tree that changed (a renamed, added or removed parameter, another
trainable set, another dtype) fails with the names that differ instead of loading arrays into the
wrong places.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from varejax.errors import UserError
from varejax.paths import orbax_path


def _key_name(key: Any) -> str:
    """One step of a pytree key path as text: a dict key (a parameter path tuple joins with "/"), a
    field name or an index."""
    if isinstance(key, jax.tree_util.DictKey):
        return "/".join(map(str, key.key)) if isinstance(key.key, tuple) else str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def named_leaves(tree: Any) -> dict[str, Any]:
    """{"params/blocks/0/ca/mat_q/kernel": leaf, "opt_state/inner_state/1/mu/...": leaf, ...} of a pytree.

    The names come from the tree's own keys (dict keys, NamedTuple fields, indices), so two trees
    with the same names hold the same things, whatever order their leaves flatten in.
    """
    named: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(_key_name(k) for k in path)
        if name in named:
            raise ValueError(f"two leaves of the checkpointed state are both named {name!r}")
        named[name] = leaf
    return named


def _nest(named: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}} (orbax stores string-keyed nested dicts)."""
    nested: dict[str, Any] = {}
    for name, leaf in named.items():
        node = nested
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return nested


class CheckpointMismatchError(UserError):
    """A training checkpoint does not hold the state this run trains (a changed model, trainable set or
    optimiser): restoring it by position would silently load the wrong arrays."""


class Checkpoints:
    """Orbax checkpoints of the training state ({"params": trainable params, "opt_state": ...}); the step
    number is the data state.

    Every array is stored under its name (`named_leaves`), and a restore checks names, shapes and dtypes
    against the state it restores into before reading anything, so a run whose parameters or optimiser
    changed fails with the names that differ instead of loading arrays into the wrong places.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = orbax_path(directory)  # local (absolute) or gs://: orbax writes both itself
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=ocp.StandardCheckpointHandler(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        import orbax.checkpoint as ocp

        # Asynchronous: orbax copies the arrays to host memory before returning, then writes them in the
        # background while training goes on; the next save, a restore and close() wait for it.
        self.manager.save(step, args=ocp.args.StandardSave(_nest(named_leaves(state))), force=True)

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restores step `step` into the structure (and shardings) of `like`, matching arrays by name.

        Raises:
          CheckpointMismatchError: names missing from or unexpected in the checkpoint, or a shape or
            dtype that differs; nothing is loaded then.
        """
        import orbax.checkpoint as ocp

        self.wait()
        leaves, treedef = jax.tree.flatten(like)
        wanted = named_leaves(like)
        stored = named_leaves(self.manager.item_metadata(step).tree)
        self._check(step, wanted, stored)
        shardings = _restore_shardings(wanted)
        abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[name])
                    for name, x in wanted.items()}
        restored = named_leaves(self.manager.restore(step, args=ocp.args.StandardRestore(_nest(abstract))))
        # `named_leaves(like)` lists the leaves in `jax.tree.flatten(like)` order.
        return jax.tree.unflatten(treedef, [restored[name] for name in wanted])

    def _check(self, step: int, wanted: dict[str, Any], stored: dict[str, Any]) -> None:
        missing = sorted(set(wanted) - set(stored))
        unexpected = sorted(set(stored) - set(wanted))
        changed = [f"{name}: saved {tuple(stored[name].shape)} {stored[name].dtype}, this run has "
                   f"{tuple(wanted[name].shape)} {wanted[name].dtype}"
                   for name in sorted(set(wanted) & set(stored))
                   if (tuple(stored[name].shape), np.dtype(stored[name].dtype))
                   != (tuple(wanted[name].shape), np.dtype(wanted[name].dtype))]
        if not (missing or unexpected or changed):
            return
        problems = []
        if missing:
            problems.append(f"{len(missing)} arrays of this run are not in it, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} arrays in it are not in this run, e.g. {unexpected[:3]}")
        if changed:
            problems.append(f"{len(changed)} arrays differ, e.g. {changed[:3]}")
        raise CheckpointMismatchError(
            f"{self.directory / str(step)}: the checkpoint does not match this run's trainable parameters and "
            f"optimiser state ({'; '.join(problems)}). Was config.train.trainable, the model or "
            f"config.train.bf16_params changed? Use a new --workdir, or delete {self.directory} to restart.")

    def close(self) -> None:
        self.wait()
        self.manager.close()



def _restore_shardings(leaves: dict[str, Any]) -> dict[str, Any]:
    """Where each leaf of `like` is restored: its own sharding. On several processes, a leaf that lives on
    one device of this process only (e.g. an optimiser step count made outside the mesh) is replicated
    over the mesh of the other leaves instead: a committed single-device array could not enter the
    training step next to arrays that span the processes."""
    shardings = {name: getattr(x, "sharding", None) for name, x in leaves.items()}
    if jax.process_count() == 1:
        return shardings
    meshes = [s.mesh for s in shardings.values() if isinstance(s, jax.sharding.NamedSharding)]
    if not meshes:
        return shardings
    replicated = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
    return {name: s if s is None or isinstance(s, jax.sharding.NamedSharding) else replicated
            for name, s in shardings.items()}
