"""Safe, lazy readers for upstream checkpoint files.

A checkpoint is data, never code: `.pth`/`.bin` files are read with `torch.load(weights_only=True)`
(memory-mapped when the file is a zip archive, so shapes are known without reading tensor bytes), and
`.safetensors` with the safetensors package. Supported layouts:

* a single file holding a plain state_dict (`infinity_2b_reg.pth`), or a dict around one
  (`{'trainer': {'gpt_fsdp': sd}}` training checkpoints, `{'vae': sd}` tokenizers): the caller names
  the wrappers to look through;
* an HF-style sharded folder: `*.index.json` with a `weight_map`, plus `.bin` or `.safetensors` shards
  (or the index file itself, when a folder holds several);
* a folder holding exactly one weights file.

Every problem raises `CheckpointError` with the path and what to do, never a raw traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.paths import require_local

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not match the expected model; the message says why."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint: its shape and dtype, and how to read it (lazily)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    load: Callable[[], np.ndarray]


@dataclasses.dataclass
class CheckpointSource:
    """All tensors of a checkpoint, by upstream key, with where they came from."""

    path: str
    layout: str  # 'state_dict', 'trainer', 'wrapped:<key>', 'sharded', ...
    files: list[str]
    tensors: dict[str, TensorRef]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(source: CheckpointSource) -> dict[str, str]:
    """sha256 of every file the checkpoint was read from (index included)."""
    return {os.path.relpath(f, source.path) if os.path.isdir(source.path) else os.path.basename(f): sha256_file(f)
            for f in source.files}


# ---- torch files -----------------------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "reading .pth/.bin checkpoints needs PyTorch (CPU is enough): pip install 'varejax[torch]' "
            "or pip install torch; .safetensors files need no torch") from err
    return torch


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    torch = _import_torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def _torch_load(path: str) -> Any:
    torch = _import_torch()
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    is_zip = zipfile.is_zipfile(path)
    try:
        # mmap keeps tensor bytes on disk until a tensor is used: a dry run reads only the pickle.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # torch raises many types; all mean "not a readable checkpoint"
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in type(err).__name__:
            raise CheckpointError(
                f"{path}: the file holds Python objects other than tensors, which cannot be loaded safely "
                f"(torch.load weights_only=True refused: {text.splitlines()[0][:300]}). Re-save only the "
                f"state_dict, e.g. torch.save(ckpt['trainer']['gpt_fsdp'], 'slim.pth').") from None
        if is_zip or "zip" in text.lower() or "central directory" in text.lower() or "EOF" in text:
            raise CheckpointError(
                f"{path}: could not read the checkpoint ({type(err).__name__}: {text.splitlines()[0][:200]}); "
                f"the file looks truncated or corrupt: compare its size and sha256 with the original") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: "
                              f"{text.splitlines()[0][:200] if text else ''})") from None


def _is_tensor(x: Any) -> bool:
    torch = _import_torch()
    return isinstance(x, torch.Tensor)


def _tensor_refs_from_dict(state: dict, file: str) -> dict[str, TensorRef]:
    refs = {}
    for key, value in state.items():
        if not _is_tensor(value):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  f"is this a state_dict?")
        refs[key] = TensorRef(key, tuple(int(s) for s in value.shape), str(value.dtype).replace("torch.", ""),
                              file, (lambda v=value: _torch_to_numpy(v)))
    return refs


def _unwrap(obj: Any, path: str, wrappers: Sequence[Sequence[str]]) -> tuple[dict, str]:
    """Finds the state_dict inside a loaded object: the object itself or one of the `wrappers` paths."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)")
    if obj and all(_is_tensor(v) for v in obj.values()):
        return obj, "state_dict"
    for wrapper in wrappers:
        inner = obj
        for part in wrapper:
            inner = inner.get(part) if isinstance(inner, dict) else None
        if isinstance(inner, dict) and inner and all(_is_tensor(v) for v in inner.values()):
            return inner, ".".join(wrapper)
    top = sorted(obj)[:12]
    raise CheckpointError(
        f"{path}: no state_dict found. Top-level keys: {top}. Expected tensors at the top level or under "
        f"{[list(w) for w in wrappers]}")


# ---- safetensors ----------------------------------------------------------------------------------

def _safetensors_refs(path: str) -> dict[str, TensorRef]:
    try:
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover
        raise CheckpointError("reading .safetensors needs the safetensors package: pip install safetensors") from err
    try:
        handle = safe_open(path, framework="numpy")
        keys = list(handle.keys())
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); "
                              f"truncated or corrupt?") from None
    refs = {}
    for key in keys:
        sl = handle.get_slice(key)
        refs[key] = TensorRef(key, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()).lower(), path,
                              (lambda k=key, p=path: _read_safetensor(p, k)))
    return refs


def _read_safetensor(path: str, key: str) -> np.ndarray:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="numpy") as handle:
            return handle.get_tensor(key)
    except TypeError:
        # numpy has no bfloat16: read through flax's loader, which maps it to ml_dtypes.
        from safetensors.flax import load_file
        return np.asarray(load_file(path)[key])


# ---- entry point ----------------------------------------------------------------------------------

def _file_refs(path: str, wrappers: Sequence[Sequence[str]]) -> tuple[dict[str, TensorRef], str]:
    if path.endswith(".safetensors"):
        return _safetensors_refs(path), "safetensors"
    state, layout = _unwrap(_torch_load(path), path, wrappers)
    return _tensor_refs_from_dict(state, path), layout


def _find_index(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files {[p.name for p in indexes]}; keep one")
    return indexes[0] if indexes else None


def open_checkpoint(path: str | os.PathLike, wrappers: Sequence[Sequence[str]] = ()) -> CheckpointSource:
    """Opens a checkpoint file or folder lazily.

    Args:
      path: a weights file, a folder (sharded with an index, or holding one weights file), or a shard
        index `*.index.json` (its shards are looked up next to it).
      wrappers: key paths under which a wrapped state_dict may sit, e.g. [("trainer", "gpt_fsdp")].

    Raises:
      CheckpointError: missing or unreadable files, unsafe pickles, an index naming absent shards, ...
    """
    path = require_local(path, "upstream checkpoints are read memory-mapped by torch.load and safetensors, which "
                               "open local files only")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isfile(path) and path.endswith(".index.json"):
        # One index of a folder that holds several (e.g. both .bin and .safetensors shards).
        return _open_sharded(Path(path).parent, Path(path))
    if os.path.isfile(path):
        if not path.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(f"{path}: unknown weights file type; expected one of {WEIGHT_SUFFIXES}")
        refs, layout = _file_refs(path, wrappers)
        return CheckpointSource(path, layout, [path], refs)

    folder = Path(path)
    index = _find_index(folder)
    if index is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        if len(files) != 1:
            raise CheckpointError(
                f"{path}: a checkpoint folder needs an *.index.json (sharded) or exactly one weights file; "
                f"found {[p.name for p in files] or 'none'}")
        refs, layout = _file_refs(str(files[0]), wrappers)
        return CheckpointSource(path, f"folder/{layout}", [str(files[0])], refs)
    return _open_sharded(folder, index)


def _open_sharded(folder: Path, index: Path) -> CheckpointSource:
    """An HF-style sharded checkpoint: `index` (a `weight_map`) and the shards it names in `folder`."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object): {err}") from None
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shards that are not in {folder}: {missing}")
    refs: dict[str, TensorRef] = {}
    for name in shard_names:
        shard_refs, _ = _file_refs(str(folder / name), ())
        listed = {k for k, v in weight_map.items() if v == name}
        extra = sorted(set(shard_refs) - listed)
        absent = sorted(listed - set(shard_refs))
        if absent:
            raise CheckpointError(f"{folder / name}: the index places {len(absent)} tensors in this shard that it "
                                  f"does not hold, e.g. {absent[:5]} (truncated or mismatched shard?)")
        if extra:
            raise CheckpointError(f"{folder / name}: holds {len(extra)} tensors the index does not list, "
                                  f"e.g. {extra[:5]} (index from another checkpoint?)")
        dup = sorted(set(shard_refs) & set(refs))
        if dup:
            raise CheckpointError(f"{folder / name}: tensors also present in another shard: {dup[:5]}")
        refs.update(shard_refs)
    files = [str(index)] + [str(folder / name) for name in shard_names]
    return CheckpointSource(str(folder), "sharded", files, refs)


def iter_loaded(source: CheckpointSource, keys: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Loads the given tensors one at a time (peak memory: one tensor beyond what the caller keeps)."""
    for key in keys:
        ref = source.tensors[key]
        try:
            value = ref.load()
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{ref.file}: could not read tensor {key!r} ({type(err).__name__}: {err}); "
                                  f"the file looks truncated or corrupt") from None
        if tuple(value.shape) != ref.shape:
            raise CheckpointError(f"{ref.file}: tensor {key!r} read with shape {value.shape}, header says {ref.shape}")
        yield key, value
