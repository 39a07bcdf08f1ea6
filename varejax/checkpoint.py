"""Model folders, the one place that knows them: formats, writing (`save_model`) and loading.

Layout of a converted (or trained, or erased) model folder:

    DIR/config.json   {"format": ..., "model": {config fields}, "source": {...}, "varejax": version}
    DIR/params/       orbax checkpoint of the parameter tree (nested dict, string keys)
    DIR/tokenizer.json  (text encoders only)

`FORMATS` names the kinds of folder (infinity, vae, t5, oracle, clip, fid_inception);
`save_model(out, kind, cfg, params)` writes one, `read_meta(model_dir, kind)` reads and checks its config.json,
and `load_infinity`, `load_vae`, `load_t5` return (config, nnx.State). Layering: `varejax.models` (pure modules) <- this
module <- `varejax.convert` (upstream checkpoints -> our folders), the sampler, trainers and the toy world.

A folder is written under a temporary sibling name and renamed at the end, so an interrupted or
failed write never leaves a half-written model behind, and an existing folder is never clobbered
unless asked.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

import varejax
from varejax.errors import UserError
from varejax.models import apply, bsq_vae, lora, t5
from varejax.models.config import LORA_FIELDS, InfinityConfig
from varejax.models.state import fill_state, flat_params
from varejax.parallel import DEFAULT_RULES, abstract_sharded_state
from varejax.paths import as_path, is_remote, orbax_path

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
FORMATS = {
    "infinity": "varejax-infinity/1",
    "vae": "varejax-vae/1",
    "t5": "varejax-t5/1",
    "oracle": "varejax-toy-oracle/1",
    "clip": "varejax-clip/1",
    "fid_inception": "varejax-fid-inception/1",
}
# Who writes each kind, for the message when a folder of another kind is given.
_WRITERS = {"infinity": "`varejax convert infinity`, `varejax erase` or `varejax toy train`",
            "vae": "`varejax convert vae` or `varejax toy train`",
            "t5": "`varejax convert t5` or `varejax toy train`",
            "oracle": "`varejax toy train`",
            "clip": "`varejax convert clip`",
            "fid_inception": "`varejax convert inception`"}


class ModelDirError(UserError):
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
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yields a temporary folder that becomes `out` when the block succeeds (and vanishes if not).

    On an object store (gs://, ...) a folder "rename" copies every object, so the folder is written in
    place instead: the writer puts config.json last, and a folder without it reads as incomplete
    (`read_config`); a failed write is removed.
    """
    out = as_path(out)
    if out.exists() and not overwrite:
        raise ModelDirError(f"{out} already exists; choose another --out or pass --overwrite")
    if is_remote(out):
        if out.exists():
            out.rmtree()
        out.mkdir(parents=True, exist_ok=True)
        try:
            yield out
        except BaseException:
            out.rmtree(missing_ok=True)
            raise
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            with contextlib.suppress(OSError):
                old.rmtree()
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.rmtree()


def save_params(directory: str | os.PathLike, flat: Mapping[tuple[str, ...], np.ndarray]) -> None:
    """Writes a flat {path: array} parameter dict as an orbax checkpoint at `directory` (must not exist)."""
    import orbax.checkpoint as ocp

    # Host arrays, one writer: the process that calls this saves alone (no barrier with the others).
    me = jax.process_index()
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))
    checkpointer.save(orbax_path(directory), nest(flat))
    checkpointer.wait_until_finished()


def write_model_dir(out: str | os.PathLike, flat: Mapping[tuple[str, ...], np.ndarray], config: Mapping[str, Any],
                    overwrite: bool = False, files: Mapping[str, str | bytes | os.PathLike] | None = None
                    ) -> epath.Path:
    """Atomically writes `out/params`, `out/config.json` (`config` plus the varejax version and time) and `files`.

    Args:
      files: {file name: text, bytes, or a path (`os.PathLike`, local or remote) to copy} written next to
        config.json.
    """
    meta = dict(config)
    meta.setdefault("varejax", varejax.__version__)
    meta.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    with atomic_directory(out, overwrite) as tmp:
        save_params(tmp / PARAMS_SUBDIR, flat)
        for name, content in (files or {}).items():
            if isinstance(content, os.PathLike):
                (tmp / name).write_bytes(as_path(content).read_bytes())
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    return as_path(out)


def save_model(out: str | os.PathLike, kind: str, cfg: Any, params: Any, *, source: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None, files: Mapping[str, str | bytes | os.PathLike] | None = None,
               overwrite: bool = False) -> epath.Path:
    """Writes a model folder of `kind` (a key of FORMATS), atomically; the one writer of every model folder.

    Args:
      cfg: the model config (anything with `to_dict()`), stored as config.json "model".
      params: an `nnx.State` or a flat {path tuple: array} dict (copied to host memory).
      source: where the parameters come from (config.json "source": path, sha256s, ...).
      extra: more top-level config.json fields (e.g. "training", "tokenizer").
      files: extra files for the folder, as in `write_model_dir` (e.g. {TOKENIZER_FILE: path}).
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(FORMATS)}")
    if not isinstance(params, Mapping) or any(not isinstance(k, tuple) for k in params):
        params = flat_params(params)
    flat = {path: np.asarray(value) for path, value in params.items()}
    meta: dict[str, Any] = {"format": FORMATS[kind], "model": cfg.to_dict()}
    if source is not None:
        meta["source"] = dict(source)
    meta.update(extra or {})
    return write_model_dir(out, flat, meta, overwrite=overwrite, files=files)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder (any kind)."""
    path = as_path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {CONFIG_FILE}; is this a folder written by `varejax convert`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from None


def read_meta(model_dir: str | os.PathLike, kind: str) -> dict[str, Any]:
    """config.json of a model folder of `kind`; ModelDirError when the folder holds another kind."""
    meta = read_config(model_dir)
    if meta.get("format") != FORMATS[kind]:
        raise ModelDirError(f"{model_dir}: config.json format is {meta.get('format')!r}, expected "
                            f"{FORMATS[kind]!r} (a folder written by {_WRITERS[kind]})")
    return meta


def restore_flat(model_dir: str | os.PathLike, target: Mapping[tuple[str, ...], Any] | None = None
                 ) -> dict[tuple[str, ...], Any]:
    """Reads the parameters of a model folder as {path: array}.

    Args:
      target: optional {path: jax.ShapeDtypeStruct (with .sharding)} to restore onto devices directly,
        shard by shard, instead of into host memory.
    """
    import orbax.checkpoint as ocp

    params_dir = orbax_path(model_dir) / PARAMS_SUBDIR
    if not params_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no {PARAMS_SUBDIR}/ folder (incomplete write?)")
    if target is None:
        # Into host memory, this process alone (no barrier with the others, as in `save_params`): process 0
        # of `varejax merge` reads while the others wait for its exit status.
        me = jax.process_index()
        alone = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
        return flatten(alone.restore(params_dir))
    return flatten(ocp.StandardCheckpointer().restore(params_dir, nest(target)))


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
    target = None
    if mesh is not None:
        sharded = abstract_sharded_state(abstract, mesh, rules or DEFAULT_RULES)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                  for k, v in flat_params(sharded).items()}
    flat = restore_flat(model_dir, target)
    try:
        return fill_state(abstract, flat)
    except (KeyError, ValueError) as err:
        raise ModelDirError(f"{model_dir}: parameters do not match its config.json: {err}") from None


def load_infinity(model_dir: str | os.PathLike, *, mesh: Any = None, rules: Any = None,
                  **overrides: Any) -> tuple[Any, Any]:
    """Loads an Infinity transformer folder -> (InfinityConfig, nnx.State).

    Args:
      model_dir: output of `varejax convert infinity` (or an erased model written by `varejax erase`).
      mesh: when given, parameters are restored straight onto the mesh, sharded by `rules`.
      **overrides: numerics to change (compute_dtype, param_dtype, ca_bf16_rounding, ...); architecture
        fields must match the folder's. LoRA fields are numerics too: `lora_rank=4` on a folder without
        adapters adds them (A from `lora_seed`, B = 0: the same model); adapters the folder holds are
        loaded when the requested config has them and merged into their kernels when it does not
        (`varejax.models.lora.retarget`).
    """
    meta = read_meta(model_dir, "infinity")
    stored = InfinityConfig.from_dict(meta["model"])
    cfg = apply_numerics(stored, overrides, model_dir)
    # What the folder holds: the requested numerics with the folder's own adapters (if any).
    held = cfg.replace(**{k: getattr(stored, k) for k in LORA_FIELDS})
    state = restore_state(model_dir, apply.abstract_params(held), mesh, rules)
    if not lora.same_adapters(held, cfg):
        state = lora.retarget(held, state, cfg, mesh=mesh, rules=rules)
    return cfg, state


def load_vae(model_dir: str | os.PathLike, *, mesh: Any = None, rules: Any = None,
             **overrides: Any) -> tuple[Any, Any]:
    """Loads a BSQ-VAE tokenizer folder (`varejax convert vae`) -> (VAEConfig, nnx.State).

    Args:
      mesh: when given, parameters are restored onto the mesh as `rules` say (replicated by default:
        the tokenizer is data-parallel).
      **overrides: numerics to change (compute_dtype, matmul_precision, ...); architecture fields must
        match the folder's.
    """
    meta = read_meta(model_dir, "vae")
    cfg = apply_numerics(bsq_vae.VAEConfig.from_dict(meta["model"]), overrides, model_dir)
    return cfg, restore_state(model_dir, bsq_vae.abstract_vae_params(cfg), mesh, rules)


def load_t5(model_dir: str | os.PathLike, *, mesh: Any = None, rules: Any = None,
            **overrides: Any) -> tuple[Any, Any]:
    """Loads a T5 text-encoder folder (`varejax convert t5`) -> (T5Config, nnx.State).

    Args:
      mesh: when given, parameters are restored straight onto the mesh, sharded by `rules`.
      **overrides: numerics to change (compute_dtype, matmul_precision, ...); architecture fields must match.
    """
    meta = read_meta(model_dir, "t5")
    cfg = apply_numerics(t5.T5Config.from_dict(meta["model"]), overrides, model_dir)
    return cfg, restore_state(model_dir, t5.abstract_params(cfg), mesh, rules)
