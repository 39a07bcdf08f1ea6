"""Evaluation prompts and image sets: CSV/JSONL files, Python lists, and TensorFlow Datasets (TFDS).

    rows = read_prompt_rows("configs/prompts/church.csv", require=("class",), count=20)
    rows = read_prompt_rows({"tfds": "coco_captions/2017", "split": "val", "data_dir": "/data/tfds"}, count=500)
    for batch in iter_images("runs/base/images", batch_size=16, size=(256, 256)):   # uint8 [B, H, W, 3]
        ...

**Prompt rows** are dicts with at least `case_number` (int), `prompt` (str) and `seed` (int), plus the
file's other columns unchanged (e.g. `class`, `categories`, `nudity_percentage`, `evaluation_guidance`;
CSV values stay strings, JSONL values keep their JSON types). Files follow the column schema of the
ESD / UCE / MACE / UnlearnDiffAtk prompt files, `case_number, prompt, evaluation_seed, ...`:

* `prompt` (required; `prompt_column=` names another, e.g. `caption`);
* the seed is the first column present of `evaluation_seed` (ESD and its successors), `seed`, `sd_seed` (I2P);
  that column becomes the row's `seed` (a `sd_seed` column next to `evaluation_seed` stays an ordinary
  column; a `seed` column next to it is replaced by the row's seed). Without any of them the file
  is refused, unless the caller gives `default_seed`: then row i (0-based, counted in the whole file) gets
  `default_seed + i`, so a row's seed does not depend on which rows were selected;
* `case_number` (optional; row i gets i without it); case numbers must be distinct integers.

**Selecting rows** happens after reading and before anything else: `count=N` keeps the first N rows, or with
`sample_seed=S` N rows drawn without replacement by `numpy.random.default_rng(S)`, kept in file order.

**TFDS** sources are mappings (a dict or an ml_collections ConfigDict) with the key `tfds` (see
`varejax.data.tfds_source.TfdsSource`, also importable from here, as is `write_tfds_dataset`). They are read
with `tfds.data_source` from a *prepared* ArrayRecord copy (never downloaded) through the dataset's files alone,
so neither TensorFlow nor the dataset's builder code is imported. tensorflow_datasets itself is imported only
when a TFDS source is used, and varejax.data.tfds_source only when a source is read (it imports this module).

**Image sets** are a folder of PNG/JPEG files (sorted by name), an .npz file (key `images`, or its only
array) of uint8 [N, H, W, 3], a TFDS source with an `image_field`, or an array. They come out as uint8 RGB
[B, H, W, 3] batches. With `size=(H, W)` every image must have that size, or with `resize=True` is resized to
cover it (LANCZOS) and centre-cropped, as `varejax.images.preprocess` does for real photos.

Bad input (a missing file or column, a bad seed, images of the wrong size) raises a one-line
`SourceError` (a `UserError`) that names the file, the line or image, and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from varejax.errors import UserError
from varejax.images import cover_size
from varejax.paths import as_path, load_npz

SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SourceError(UserError, ValueError):
    """A prompt or image source is missing or malformed; the one-line message names the file and the problem."""


def __getattr__(name: str) -> Any:
    """`TfdsSource` and `write_tfds_dataset` of varejax.data.tfds_source, which imports this module (so it is
    imported here on first use, not at the top)."""
    if name in ("TfdsSource", "write_tfds_dataset"):
        from varejax.data import tfds_source

        return getattr(tfds_source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Prompt rows
# ----------------------------------------------------------------------------------------------------------------


def _as_int(value: Any, where: str, column: str) -> int:
    """An integer cell; integral floats ("3.0", written by pandas next to empty cells) are accepted."""
    if isinstance(value, bool):
        raise SourceError(f"{where}: {column} must be an integer, got {value!r}")
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
    raise SourceError(f"{where}: {column} must be an integer, got {value!r}")


def _seed_column(columns: Sequence[str]) -> str | None:
    return next((name for name in SEED_COLUMNS if name in columns), None)


def _make_row(
    raw: Mapping[str, Any], position: int, where: str, *, prompt_column: str, seed_column: str | None,
    default_seed: int | None,
) -> dict[str, Any]:
    """One prompt row from a file's record: case_number, prompt, seed first, then the other columns."""
    prompt = raw.get(prompt_column)
    if not isinstance(prompt, str):
        raise SourceError(f"{where}: {prompt_column} must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise SourceError(f"{where}: empty {prompt_column}")
    if seed_column is not None:
        if raw.get(seed_column) in (None, ""):
            raise SourceError(f"{where}: empty {seed_column}")
        seed = _as_int(raw[seed_column], where, seed_column)
    else:
        seed = int(default_seed) + position  # type: ignore[arg-type]  # checked by the caller
    if "case_number" in raw and raw["case_number"] not in (None, ""):
        case_number = _as_int(raw["case_number"], where, "case_number")
    else:
        case_number = position
    row = {"case_number": case_number, "prompt": prompt.strip(), "seed": seed}
    for key, value in raw.items():
        if key not in (prompt_column, seed_column, "case_number", "prompt", "seed"):
            row[key] = value
    return row


def _check_columns(columns: Sequence[str], where: str, *, prompt_column: str, default_seed: int | None,
                   require: Sequence[str]) -> str | None:
    """The seed column to use; a SourceError naming the first needed column that `columns` lacks."""
    have = f"(columns: {', '.join(columns) or 'none'})"
    if prompt_column not in columns:
        raise SourceError(f"{where}: no {prompt_column!r} column {have}")
    seed_column = _seed_column(columns)
    if seed_column is None and default_seed is None:
        raise SourceError(f"{where}: no seed column; expected one of {', '.join(SEED_COLUMNS)} {have}")
    for name in require:
        if name not in columns:
            raise SourceError(f"{where}: no {name!r} column {have}")
    return seed_column


def _decoded_text(path: str) -> str:
    target = as_path(path)
    if not target.is_file():
        raise SourceError(f"{path}: no such file")
    raw = target.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a BOM, as spreadsheet programs write it, is not part of the header
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SourceError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None


def _read_csv(path: str, **options) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(_decoded_text(path), newline=""))
    columns = [name.strip() for name in reader.fieldnames or []]
    if not columns:
        raise SourceError(f"{path}: empty CSV (no header row)")
    if len(set(columns)) != len(columns):
        raise SourceError(f"{path}:1: repeated column names in the header ({', '.join(columns)})")
    reader.fieldnames = columns  # header names without surrounding spaces
    seed_column = _check_columns(columns, path, prompt_column=options["prompt_column"],
                                 default_seed=options["default_seed"], require=options["require"])
    rows = []
    for position, record in enumerate(reader):
        where = f"{path}:{reader.line_num}"
        if None in record:
            raise SourceError(f"{where}: more values than header columns")
        rows.append(_make_row(record, position, where, seed_column=seed_column,
                              prompt_column=options["prompt_column"], default_seed=options["default_seed"]))
    return rows


def _read_jsonl(path: str, **options) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(_decoded_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((f"{path}:{number}", record))
    return _rows_from_records(records, **options)


def _rows_from_records(records: Sequence[tuple[str, Mapping[str, Any]]], **options) -> list[dict[str, Any]]:
    """Rows from (where, record) pairs whose fields may differ from record to record (JSONL, lists of dicts)."""
    rows = []
    for position, (where, record) in enumerate(records):
        seed_column = _check_columns(list(record), where, prompt_column=options["prompt_column"],
                                     default_seed=options["default_seed"], require=options["require"])
        rows.append(_make_row(record, position, where, seed_column=seed_column,
                              prompt_column=options["prompt_column"], default_seed=options["default_seed"]))
    return rows


def _rows_from_list(items: Sequence[Any], **options) -> list[dict[str, Any]]:
    """A Python list of prompt strings (seeds default_seed + i, default 0) or of row dicts."""
    kind = str if items and isinstance(items[0], str) else Mapping  # the first item decides: all strings or dicts
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise SourceError(f"prompts[{i}]: expected a {'prompt string' if kind is str else 'dict'} like "
                              f"prompts[0], got {type(item).__name__}")
    if kind is str:
        seed = 0 if options["default_seed"] is None else int(options["default_seed"])
        records = [(f"prompts[{i}]", {"prompt": text, "seed": seed + i}) for i, text in enumerate(items)]
        return _rows_from_records(records, **{**options, "prompt_column": "prompt", "require": ()})
    return _rows_from_records([(f"prompts[{i}]", dict(item)) for i, item in enumerate(items)], **options)


def select_indices(total: int, count: int | None = None, sample_seed: int | None = None) -> list[int]:
    """Which of `total` items to keep: all, the first `count`, or `count` drawn with `sample_seed` (sorted).

    The draw is `numpy.random.default_rng(sample_seed).choice(total, count, replace=False)`: the same
    seed and sizes give the same items on every machine.
    """
    if count is None or count >= total:
        return list(range(total))
    if count < 0:
        raise SourceError(f"count must be >= 0, got {count}")
    if sample_seed is None:
        return list(range(count))
    picked = np.random.default_rng(int(sample_seed)).choice(total, size=count, replace=False)
    return sorted(int(i) for i in picked)


def read_prompt_rows(
    source: Any,
    *,
    count: int | None = None,
    sample_seed: int | None = None,
    require: Sequence[str] = (),
    prompt_column: str = "prompt",
    default_seed: int | None = None,
) -> list[dict[str, Any]]:
    """Prompt rows from a .csv or .jsonl file, a list, or a TFDS source (see the module docstring).

    Args:
      source: a path (local or remote; the extension picks the reader), a list of prompt strings or of row
        dicts, or a mapping with a `tfds` key (`TfdsSource` fields).
      count: keep this many rows (None: all); `sample_seed` draws them instead of taking the first ones.
      require: columns the task needs besides prompt and seed (e.g. ("class",)); a file without one is refused.
      prompt_column: the column holding the prompt text (files and row dicts).
      default_seed: base seed for sources without a seed column (row i gets default_seed + i); None refuses
        such files. TFDS sources take theirs from the source's own `seed` field.

    Raises:
      SourceError: the source is missing, unreadable, lacks a needed column, or has a bad row.
    """
    from varejax.data.tfds_source import TfdsSource

    options = {"prompt_column": prompt_column, "default_seed": default_seed, "require": tuple(require)}
    tfds_source = TfdsSource.parse(source)
    if tfds_source is not None:
        rows = tfds_source.prompt_rows(count=count, sample_seed=sample_seed)
        missing = [name for name in require if rows and name not in rows[0]]
        if missing:
            raise SourceError(f"{tfds_source.where}: no {missing[0]!r} field in the rows (add it to extra_fields)")
        return rows
    if isinstance(source, list | tuple):
        rows = _rows_from_list(source, **options)
        where = "the prompt list"
    elif isinstance(source, str | os.PathLike):
        where = os.fspath(source)
        suffix = os.path.splitext(where)[1].lower()
        if suffix == ".csv":
            rows = _read_csv(where, **options)
        elif suffix == ".jsonl":
            rows = _read_jsonl(where, **options)
        else:
            raise SourceError(f"{where}: unknown prompt file type {suffix!r}; use .csv or .jsonl")
    else:
        raise SourceError(f"cannot read prompts from a {type(source).__name__}; give a .csv/.jsonl path, a list, "
                          "or a mapping with a 'tfds' key")
    if not rows:
        raise SourceError(f"{where}: no prompt rows")
    first_row: dict[int, int] = {}
    for i, row in enumerate(rows):
        number = row["case_number"]
        if number in first_row:
            raise SourceError(f"{where}: case_number {number} appears twice (data rows {first_row[number] + 1} and "
                              f"{i + 1})")
        first_row[number] = i
    return [rows[i] for i in select_indices(len(rows), count, sample_seed)]


# ----------------------------------------------------------------------------------------------------------------
# Image sets
# ----------------------------------------------------------------------------------------------------------------


def _pil():
    from PIL import Image

    return Image


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H, W, 3] (grey and RGBA converted)."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:  # Pillow's UnidentifiedImageError is an OSError
        raise SourceError(f"{where}: not a readable image ({err})") from None


def fit_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 `size` (H, W): LANCZOS resize to cover `size`, then the centre crop.

    The same geometry as `varejax.images.preprocess` (upstream Infinity's transform), kept in uint8.
    """
    tgt_h, tgt_w = int(size[0]), int(size[1])
    if image.shape[:2] == (tgt_h, tgt_w):
        return image
    Image = _pil()
    new_w, new_h = cover_size(image.shape[1], image.shape[0], tgt_h, tgt_w)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.LANCZOS))
    top, left = (new_h - tgt_h) // 2, (new_w - tgt_w) // 2
    return resized[top: top + tgt_h, left: left + tgt_w]


def _image_folder(path: str) -> list[str]:
    folder = as_path(path)
    names = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise SourceError(f"{path}: no PNG or JPEG images in this folder")
    return [os.path.join(path, name) for name in names]


def _npz_images(path: str) -> np.ndarray:
    try:
        arrays = load_npz(path)
    except (OSError, ValueError) as err:
        raise SourceError(f"{path}: not a readable .npz file ({err})") from None
    if "images" in arrays:
        images = arrays["images"]
    elif len(arrays) == 1:
        images = next(iter(arrays.values()))
    else:
        raise SourceError(f"{path}: no 'images' array (arrays: {', '.join(sorted(arrays))})")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SourceError(f"{path}: images must be [N, H, W, 3] RGB, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise SourceError(f"{path}: images must be uint8, got {images.dtype}")
    return images


class _ImageItems:
    """An image set as (where, loader) pairs: each image is read only when its batch is."""

    def __init__(self, source: Any):
        from varejax.data.tfds_source import TfdsSource, _field

        tfds_source = TfdsSource.parse(source)
        if tfds_source is not None:
            if not tfds_source.image_field:
                raise SourceError(f"{tfds_source.where}: no image_field given")
            data = tfds_source.data_source(skip_decoding=[tfds_source.image_field])
            field, name = tfds_source.image_field, tfds_source.where
            self.count = len(data)
            self.item = lambda i: (f"{name}, example {i}", lambda: _decode_image(
                _field(data[i], field, f"{name}, example {i}"), f"{name}, example {i}"))
            return
        if isinstance(source, np.ndarray):
            if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
                raise SourceError(f"image array must be uint8 [N, H, W, 3], got {source.dtype} {source.shape}")
            self.count = len(source)
            self.item = lambda i: (f"image {i} of the array", lambda: source[i])
            return
        if not isinstance(source, str | os.PathLike):
            raise SourceError(f"cannot read images from a {type(source).__name__}; give a folder, an .npz file, "
                              "an array or a mapping with a 'tfds' key")
        path = os.fspath(source)
        if path.lower().endswith(".npz"):
            if not as_path(path).is_file():
                raise SourceError(f"{path}: no such file")
            images = _npz_images(path)
            self.count = len(images)
            self.item = lambda i: (f"{path}[{i}]", lambda: images[i])
        elif as_path(path).is_dir():
            files = _image_folder(path)
            self.count = len(files)
            self.item = lambda i: (files[i], lambda: _decode_image(as_path(files[i]).read_bytes(), files[i]))
        else:
            raise SourceError(f"{path}: no such folder or .npz file of images")


def count_images(source: Any) -> int:
    """How many images `source` holds (no image is decoded)."""
    return _ImageItems(source).count


def iter_images(
    source: Any,
    *,
    batch_size: int = 32,
    size: tuple[int, int] | None = None,
    resize: bool = False,
    count: int | None = None,
    sample_seed: int | None = None,
) -> Iterator[np.ndarray]:
    """uint8 RGB batches [B, H, W, 3] of an image set (the last batch may be smaller).

    Args:
      source: a folder of PNG/JPEG files, an .npz file, a uint8 array, or a TFDS source with an image_field.
      size: (H, W) every image must have; None: the size of the first image (all must match it).
      resize: resize and centre-crop images to `size` instead of refusing other sizes (needs `size`).
      count, sample_seed: which images, as for prompt rows (`select_indices`).

    Raises:
      SourceError: the source is missing or unreadable, or an image has the wrong size (naming the image).
    """
    if resize and size is None:
        raise SourceError("resize=True needs a size=(H, W)")
    if batch_size < 1:
        raise SourceError(f"batch_size must be >= 1, got {batch_size}")
    items = _ImageItems(source)
    indices = select_indices(items.count, count, sample_seed)
    expected = None if size is None else (int(size[0]), int(size[1]))
    for start in range(0, len(indices), batch_size):
        batch = []
        for index in indices[start: start + batch_size]:
            where, load = items.item(index)
            image = load()
            if resize:
                image = fit_image(image, expected)
            if expected is None:
                expected = image.shape[:2]
            if image.shape[:2] != expected:
                raise SourceError(f"{where}: image is {image.shape[0]}x{image.shape[1]}, expected "
                                  f"{expected[0]}x{expected[1]} (pass resize=True to resize and crop)")
            batch.append(image)
        yield np.stack(batch)


def read_images(source: Any, **options) -> np.ndarray:
    """The whole (selected) image set as one uint8 [N, H, W, 3] array; options as for `iter_images`."""
    batches = list(iter_images(source, **options))
    if not batches:
        raise SourceError("no images selected")
    return np.concatenate(batches)


# ----------------------------------------------------------------------------------------------------------------
# Records for results files
# ----------------------------------------------------------------------------------------------------------------


def source_record(source: Any) -> dict[str, Any]:
    """What identifies a prompt or image source in a results file: path + sha256 of a file, the file names +
    a sha256 over their bytes for a folder, the TFDS fields, or the count and a sha256 of a list/array."""
    from varejax.data.tfds_source import TfdsSource

    tfds_source = TfdsSource.parse(source)
    if tfds_source is not None:
        return tfds_source.record()
    digest = hashlib.sha256()
    if isinstance(source, np.ndarray):
        digest.update(np.ascontiguousarray(source).tobytes())
        return {"kind": "array", "shape": list(source.shape), "sha256": digest.hexdigest()}
    if isinstance(source, list | tuple):
        digest.update(json.dumps(list(source), sort_keys=True, ensure_ascii=False, default=str).encode())
        return {"kind": "list", "count": len(source), "sha256": digest.hexdigest()}
    path = os.fspath(source)
    target = as_path(path)
    if target.is_dir():
        files = _image_folder(path)
        for file in files:
            digest.update(os.path.basename(file).encode() + b"\0")
            digest.update(hashlib.sha256(as_path(file).read_bytes()).digest())
        return {"kind": "folder", "path": path, "count": len(files), "sha256": digest.hexdigest()}
    if not target.is_file():
        raise SourceError(f"{path}: no such file or folder")
    digest.update(target.read_bytes())
    return {"kind": "file", "path": path, "sha256": digest.hexdigest()}
