"""Reads `torch.save` state_dict files without PyTorch: the legacy (pre-1.6) stream format and the zip format.

A `.pth` file is a pickle, and a pickle can run code, so this reader never lets pickle import anything
beyond the few names a state_dict needs (`ALLOWED_GLOBALS`: `collections.OrderedDict`, the tensor
rebuild functions of `torch._utils`, and the typed storage classes, all replaced by inert stand-ins);
any other global is refused with a `CheckpointError` naming the file. Tensor bytes are not read while
opening: each tensor is a `TensorRef` whose `load()` reads its storage and applies the stored size,
stride and offset.

Legacy layout (`torch.save(obj, f, _use_new_zipfile_serialization=False)`): five pickles in a row
(magic number, protocol version 1001, sys_info with the byte order, the object, the sorted list of
storage keys), then per key in that order an int64 element count and the storage's raw bytes. Tensors
appear in the object as `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, the storage being a
persistent id `('storage', <storage class>, key, location, numel, view_metadata)`.

Zip layout (the default since torch 1.6): `<name>/data.pkl` (the object, same persistent ids without
the view field) and `<name>/data/<key>` (each storage's raw bytes, little-endian unless
`<name>/byteorder` says otherwise).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from varejax.convert.sources import CheckpointError, CheckpointSource, TensorRef
from varejax.paths import require_local

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class -> (numpy dtype name, the dtype name `TensorRef.dtype` reports, as torch does).
STORAGE_DTYPES = {
    "FloatStorage": ("float32", "float32"), "DoubleStorage": ("float64", "float64"),
    "HalfStorage": ("float16", "float16"), "BFloat16Storage": ("bfloat16", "bfloat16"),
    "LongStorage": ("int64", "int64"), "IntStorage": ("int32", "int32"), "ShortStorage": ("int16", "int16"),
    "CharStorage": ("int8", "int8"), "ByteStorage": ("uint8", "uint8"), "BoolStorage": ("bool", "bool"),
}
REBUILD_FUNCTIONS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")
ALLOWED_GLOBALS = ({("collections", "OrderedDict")} | {("torch._utils", name) for name in REBUILD_FUNCTIONS}
                   | {("torch", name) for name in STORAGE_DTYPES})


def _numpy_dtype(name: str, byteorder: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16).newbyteorder(byteorder)
    return np.dtype(name).newbyteorder(byteorder)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only its element type matters."""

    name: str

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.name][0]


@dataclasses.dataclass(frozen=True)
class StorageRecord:
    """A storage the pickle refers to: its key, element type and element count (data read later)."""

    key: str
    dtype: str
    numel: int
    view: tuple[str, int, int] | None = None  # legacy views of a root storage: (root key, offset, size)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of the pickle: which storage, and the view into it (offset, size, stride in elements)."""

    storage: StorageRecord
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *unused: Any) -> LazyTensor:
    if not isinstance(storage, StorageRecord):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage reference")
    try:
        size_t = tuple(int(s) for s in size)
        stride_t = tuple(int(s) for s in stride)
        offset = int(storage_offset)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("a tensor with a malformed size, stride or offset") from None
    return LazyTensor(storage, offset, size_t, stride_t)


def _rebuild_parameter(data: Any, *unused: Any) -> LazyTensor:
    if not isinstance(data, LazyTensor):
        raise pickle.UnpicklingError("a Parameter that does not wrap a tensor")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS, to inert stand-ins, and records storage references."""

    def __init__(self, file: Any, source: str, legacy: bool):
        super().__init__(file)
        self.source = source
        self.legacy = legacy
        self.storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise CheckpointError(
                f"{self.source}: refuses to load {module}.{name}: the file holds Python objects other than tensors "
                f"and dicts (only a plain state_dict is read, never code); re-save only the state_dict")
        if module == "collections":
            return OrderedDict
        if module == "torch":
            return _StorageType(name)
        return _rebuild_parameter if name == "_rebuild_parameter" else _rebuild_tensor

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid[:5]
        view = pid[5] if self.legacy and len(pid) > 5 else None
        key = str(key)
        record = self.storages.get(key)
        if record is None:
            record = StorageRecord(key, storage_type.dtype, int(numel))
            self.storages[key] = record
        if view is not None:
            view_key, view_offset, view_size = view
            return StorageRecord(str(view_key), storage_type.dtype, int(view_size), (key, int(view_offset),
                                                                                     int(view_size)))
        return record


def _load_pickle(unpickler: _RestrictedUnpickler, path: str, what: str) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: could not read the {what} ({type(err).__name__}: {str(err)[:200]}); "
                              f"not a torch.save file, or truncated/corrupt") from None


def _strided(flat: np.ndarray, tensor: LazyTensor, path: str, key: str) -> np.ndarray:
    """The tensor's view of its storage, as a C-contiguous copy; CheckpointError if it reaches outside."""
    if any(s < 0 for s in tensor.size) or any(s < 0 for s in tensor.stride) or tensor.offset < 0:
        raise CheckpointError(f"{path}: tensor {key!r} has a negative size, stride or offset")
    if len(tensor.size) != len(tensor.stride):
        raise CheckpointError(f"{path}: tensor {key!r}: size {tensor.size} and stride {tensor.stride} differ in "
                              f"length")
    count = int(np.prod(tensor.size, dtype=np.int64))
    if count == 0:
        return np.zeros(tensor.size, flat.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
    if last >= flat.size:
        raise CheckpointError(f"{path}: tensor {key!r} (offset {tensor.offset}, size {list(tensor.size)}, stride "
                              f"{list(tensor.stride)}) reaches element {last} of a storage of {flat.size}: corrupt "
                              f"file")
    view = np.lib.stride_tricks.as_strided(flat[tensor.offset:], shape=tensor.size,
                                           strides=tuple(s * flat.itemsize for s in tensor.stride), writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")  # a copy (also of a 0-d tensor)


def _collect_tensors(obj: Any, path: str) -> dict[str, LazyTensor]:
    """The state_dict inside the unpickled object: a mapping of tensors, or one under a 'state_dict' key."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping) and not any(
            isinstance(v, LazyTensor) for v in obj.values()):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, LazyTensor):
            raise CheckpointError(f"{path}: entry {str(key)!r} is a {type(value).__name__}, not a tensor; is this a "
                                  f"state_dict?")
        out[str(key)] = value
    return out


def _refs(tensors: Mapping[str, LazyTensor], path: str,
          read_storage: Callable[[StorageRecord], np.ndarray]) -> dict[str, TensorRef]:
    refs = {}
    for key, tensor in tensors.items():
        def load(tensor: LazyTensor = tensor, key: str = key) -> np.ndarray:
            return _strided(read_storage(tensor.storage), tensor, path, key)
        refs[key] = TensorRef(key, tensor.size, tensor.storage.dtype, path, load)
    return refs


# ---- legacy stream format ------------------------------------------------------------------------------

def _open_legacy(path: str) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    with open(path, "rb") as f:
        magic = _load_pickle(_RestrictedUnpickler(f, path, True), path, "header")
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch.save file (no legacy magic number, not a zip archive)")
        version = _load_pickle(_RestrictedUnpickler(f, path, True), path, "header")
        if version != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: legacy torch.save protocol {version!r}, expected {LEGACY_PROTOCOL}")
        sys_info = _load_pickle(_RestrictedUnpickler(f, path, True), path, "header")
        if not isinstance(sys_info, dict):
            raise CheckpointError(f"{path}: malformed legacy header (sys_info is a {type(sys_info).__name__})")
        byteorder = "<" if sys_info.get("little_endian", True) else ">"
        unpickler = _RestrictedUnpickler(f, path, True)
        obj = _load_pickle(unpickler, path, "state_dict pickle")
        keys = _load_pickle(_RestrictedUnpickler(f, path, True), path, "storage key list")
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(unpickler.storages):
            raise CheckpointError(f"{path}: the storage key list does not match the storages the state_dict "
                                  f"refers to (corrupt file?)")
        # Where each storage's bytes are: skip through the file once, reading only the element counts.
        offsets: dict[str, int] = {}
        size = os.fstat(f.fileno()).st_size
        for key in map(str, keys):
            record = unpickler.storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{path}: the file ends before the data of storage {key} (truncated)")
            numel = struct.unpack(byteorder + "q", header)[0]
            if numel != record.numel:
                raise CheckpointError(f"{path}: storage {key} holds {numel} elements, the pickle says {record.numel} "
                                      f"(corrupt file?)")
            offsets[key] = f.tell()
            end = f.tell() + numel * _numpy_dtype(record.dtype, byteorder).itemsize
            if end > size:
                raise CheckpointError(f"{path}: the file ends inside the data of storage {key} (truncated: "
                                      f"{size} bytes, needs {end})")
            f.seek(end)
    roots = unpickler.storages

    def read_storage(record: StorageRecord) -> np.ndarray:
        root_key, start, count = (record.key, 0, record.numel) if record.view is None else record.view
        root = roots[root_key]
        dtype = _numpy_dtype(root.dtype, byteorder)
        data = np.fromfile(path, dtype=dtype, count=root.numel, offset=offsets[root_key])
        return data[start:start + count]

    tensors = _collect_tensors(obj, path)
    return _refs(tensors, path, read_storage), {"storages": len(roots), "byteorder": byteorder}


# ---- zip format --------------------------------------------------------------------------------------

def _open_zip(path: str) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: a zip file without exactly one data.pkl: not a torch.save file")
            prefix = pickles[0][:-len("data.pkl")]
            byteorder = "<"
            if f"{prefix}byteorder" in names:
                byteorder = "<" if archive.read(f"{prefix}byteorder").strip() == b"little" else ">"
            with archive.open(pickles[0]) as f:
                unpickler = _RestrictedUnpickler(f, path, False)
                obj = _load_pickle(unpickler, path, "data.pkl")
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"{path}: a damaged zip archive ({err}); truncated download?") from None
    missing = [key for key in unpickler.storages if f"{prefix}data/{key}" not in names]
    if missing:
        raise CheckpointError(f"{path}: the archive lacks the data of storages {missing[:5]} (truncated?)")

    def read_storage(record: StorageRecord) -> np.ndarray:
        dtype = _numpy_dtype(record.dtype, byteorder)
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(f"{prefix}data/{record.key}")
        if len(raw) < record.numel * dtype.itemsize:
            raise CheckpointError(f"{path}: storage {record.key} has {len(raw)} bytes, needs "
                                  f"{record.numel * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype, count=record.numel)

    tensors = _collect_tensors(obj, path)
    return _refs(tensors, path, read_storage), {"storages": len(unpickler.storages), "byteorder": byteorder}


def open_torch_file(path: str | os.PathLike) -> CheckpointSource:
    """Opens a `torch.save`d state_dict (legacy or zip format) without torch, lazily.

    Returns a `CheckpointSource` (layout "torch-legacy" or "torch-zip") whose tensors read their bytes on
    `load()`. Raises CheckpointError naming the file when it is missing, empty, truncated, not a torch
    file, or holds anything but tensors in (ordered) dicts.
    """
    path = require_local(path, "a torch file is read from local disk")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    if zipfile.is_zipfile(path):
        refs, extras = _open_zip(path)
        layout = "torch-zip"
    else:
        refs, extras = _open_legacy(path)
        layout = "torch-legacy"
    return CheckpointSource(path, layout, [path], refs, extras)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a `torch.save`d state_dict as numpy arrays (C-contiguous, native byte order), in file
    order."""
    source = open_torch_file(path)
    return {key: ref.load() for key, ref in source.tensors.items()}
