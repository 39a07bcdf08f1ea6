"""Model folders: an orbax parameter checkpoint plus `config.json`, written atomically.

Layout of a converted (or fine-tuned) model folder:

    DIR/config.json   {"format": ..., "model": {config fields}, "source": {...}, "varejax": version}
    DIR/params/       orbax checkpoint of the parameter tree (nested dict, string keys)

A folder is written under a temporary sibling name and renamed at the end, so an interrupted or
failed write never leaves a half-written model behind, and an existing folder is never clobbered
unless asked.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import varejax

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"


class ModelDirError(Exception):
    """A model folder is missing, incomplete, or does not match what the caller expects."""


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """{('a', '0', 'b'): x} -> {'a': {'0': {'b': x}}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder that becomes `out` when the block succeeds (and vanishes if not)."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ModelDirError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_params(directory: str | os.PathLike, flat: Mapping[tuple[str, ...], np.ndarray]) -> None:
    """Writes a flat {path: array} parameter dict as an orbax checkpoint at `directory` (must not exist)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute(), nest(flat))
    checkpointer.wait_until_finished()


def write_model_dir(out: str | os.PathLike, flat: Mapping[tuple[str, ...], np.ndarray], config: Mapping[str, Any],
                    overwrite: bool = False) -> Path:
    """Atomically writes `out/params` and `out/config.json` (`config` plus the varejax version and time)."""
    meta = dict(config)
    meta.setdefault("varejax", varejax.__version__)
    meta.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    with atomic_directory(out, overwrite) as tmp:
        save_params(tmp / PARAMS_SUBDIR, flat)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    return Path(out)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {CONFIG_FILE}; is this a folder written by `varejax convert`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from None


def restore_flat(model_dir: str | os.PathLike, target: Mapping[tuple[str, ...], Any] | None = None
                 ) -> dict[tuple[str, ...], Any]:
    """Reads the parameters of a model folder as {path: array}.

    Args:
      target: optional {path: jax.ShapeDtypeStruct (with .sharding)} to restore onto devices directly,
        shard by shard, instead of into host memory.
    """
    import orbax.checkpoint as ocp

    params_dir = Path(model_dir).absolute() / PARAMS_SUBDIR
    if not params_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no {PARAMS_SUBDIR}/ folder (incomplete write?)")
    checkpointer = ocp.StandardCheckpointer()
    if target is None:
        return flatten(checkpointer.restore(params_dir))
    return flatten(checkpointer.restore(params_dir, nest(target)))


def apply_numerics(stored: Any, overrides: Mapping[str, Any], model_dir: str | os.PathLike) -> Any:
    """`stored.replace(**overrides)` for a typed model config; architecture fields may not change."""
    changed = sorted(k for k in overrides if k in stored.arch_dict() and overrides[k] != getattr(stored, k))
    if changed:
        raise ModelDirError(f"{model_dir}: cannot change architecture fields {changed} of a converted model")
    return stored.replace(**overrides)


def restore_state(model_dir: str | os.PathLike, abstract: Any, mesh: Any = None, rules: Any = None) -> Any:
    """The parameters of a model folder as an `nnx.State` shaped like `abstract`.

    With a mesh, every array is restored straight onto its devices, sharded by the rules (no host copy
    of the whole model).
    """
    import jax

    from varejax.models.state import fill_state, flat_params

    target = None
    if mesh is not None:
        from varejax.parallel import DEFAULT_RULES, abstract_sharded_state
        sharded = abstract_sharded_state(abstract, mesh, rules or DEFAULT_RULES)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                  for k, v in flat_params(sharded).items()}
    flat = restore_flat(model_dir, target)
    try:
        return fill_state(abstract, flat)
    except (KeyError, ValueError) as err:
        raise ModelDirError(f"{model_dir}: parameters do not match its config.json: {err}") from None
