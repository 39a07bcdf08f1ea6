"""Every file path of varejax: local folders and remote URIs (gs://, s3://, ...), all through `etils.epath`.

    out = as_path("gs://bucket/run") / "images"   # an epath.Path; local paths come back absolute
    write_text_atomic(out / "00000.json", text)
    save_npz(out / "000000.npz", x=x); arrays = load_npz(out / "000000.npz")

`as_path` keeps a URI intact (a `pathlib.Path("gs://b/run")` would be the local folder `gs:/b/run`). epath
routes gs://, s3://, az:// and hf:// to fsspec (install `gcsfs`, `s3fs`, ... for each) or to TensorFlow's
gfile when TensorFlow is installed. The helpers cover what the code does repeatedly: writes that never leave a
half-written file under the final name, appends, .npz and .safetensors files through file objects or bytes
(numpy and safetensors only open local names), whole-folder copies, and a local copy for readers that need a
real file. Inputs that are local by nature (a PyTorch .pth for `torch.load`, a config file run as Python) go
through `require_local`, which names the path and why instead of failing somewhere deeper.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from varejax.errors import UserError

# The URI schemes epath routes to a remote backend (etils.epath.gpath); anything else with "://" is refused.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URI such as gs://bucket/x (any "scheme://"), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URI kept intact, a local path made absolute (`~` expanded).

    Raises:
      UserError: a URI whose scheme epath cannot open (e.g. http:// or memory://).
    """
    text = os.fspath(path)
    if is_remote(text):
        if not text.startswith(REMOTE_SCHEMES):
            raise UserError(f"{text}: unsupported URI scheme; remote paths may be {', '.join(REMOTE_SCHEMES)}")
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def require_local(path: PathLike, why: str) -> str:
    """`path` as a local path string, or a UserError naming it when it is a URI (`why`: what needs a local file)."""
    text = os.fspath(path)
    if is_remote(text):
        raise UserError(f"{text}: must be a local path ({why}); copy it to this machine first")
    return text


def orbax_path(path: PathLike) -> epath.Path:
    """A folder for orbax: local, or gs:// (orbax writes arrays through tensorstore's own drivers, which know
    local files and GCS only; other schemes would fail deep inside tensorstore)."""
    text = os.fspath(path)
    if is_remote(text) and not text.startswith("gs://"):
        raise UserError(f"{text}: model folders and training checkpoints (orbax) must be local or gs:// paths")
    return as_path(text)


def _temporary_sibling(path: epath.Path) -> epath.Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_bytes_atomic(path: PathLike, data: bytes) -> epath.Path:
    """Writes `data` so that readers of `path` see the old file or the new one, never a partial file.

    Local: a temporary sibling renamed over `path` (an atomic rename). Remote: written straight to `path`, as
    an object store publishes an object only once its upload completes, and its "rename" is a copy and a delete.
    """
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return path
    tmp = _temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
    """`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def append_text(path: PathLike, text: str) -> None:
    """Appends `text` to a (log) file. Object stores cannot append: there the file is read and rewritten, which
    is fine for the small logs this is used for."""
    path = as_path(path)
    if not is_remote(path):
        with path.open("a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)


def save_npz(path: PathLike, **arrays: Any) -> epath.Path:
    """`np.savez` to any path, atomically (`write_bytes_atomic`)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def load_npz(path: PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (only `keys` when given, without reading the others), no pickles."""
    with as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in (data.files if keys is None else keys)}


def save_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> epath.Path:
    """A .safetensors file of numpy arrays (with string metadata) to any path, atomically."""
    from safetensors.numpy import save

    return write_bytes_atomic(path, save(dict(tensors), metadata=dict(metadata) if metadata else None))


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file at any path, as numpy arrays."""
    from safetensors.numpy import load

    return load(as_path(path).read_bytes())


def copy_tree(src: PathLike, dest: PathLike) -> None:
    """Copies the folder `src` to `dest` (replaced if it exists), file by file, across backends."""
    src, dest = as_path(src), as_path(dest)
    if dest.exists():
        dest.rmtree()
    dest.mkdir(parents=True, exist_ok=True)
    # iterdir, not walk: epath's fsspec walk yields bucket paths without their scheme.
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dest / child.name)
        else:
            child.copy(dest / child.name, overwrite=True)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """Yields a local file name holding `path`'s bytes: `path` itself when local (or absent, so that the reader
    reports it), else a temporary download (for readers that only open local names, such as
    `tokenizers.Tokenizer.from_file`)."""
    path = as_path(path)
    if not is_remote(path) or not path.exists():
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="varejax-") as tmp:
        local = os.path.join(tmp, path.name)
        with open(local, "wb") as f:
            f.write(path.read_bytes())
        yield local
