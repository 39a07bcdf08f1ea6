"""TensorFlow Datasets (TFDS) as prompt and image sources: `TfdsSource` reads a prepared dataset, and
`write_tfds_dataset` writes one from a lab's own captions and images.

    source = TfdsSource.parse({"tfds": "coco_captions/2017", "split": "val", "data_dir": "/data/tfds"})
    rows = source.prompt_rows(count=500)

Datasets are read with `tfds.data_source` from a *prepared* ArrayRecord copy (never downloaded) through the
dataset's files alone, so neither TensorFlow nor the dataset's builder code is imported. tensorflow_datasets
itself is imported on first use, not with this module. `varejax.data.sources` (`read_prompt_rows`,
`iter_images`, `source_record`) takes these mappings next to files and arrays.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from varejax.data.sources import SourceError, _as_int, select_indices


def _tfds():
    """tensorflow_datasets, imported on first use (its import takes about a second; most runs never need it)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise SourceError(f"reading TFDS datasets needs tensorflow-datasets: pip install 'varejax[tfds]' ({err})"
                          ) from None
    return tfds


def _field(example: Mapping[str, Any], path: str, where: str) -> Any:
    """example[path], where `path` goes into nested features with "/" ("captions/text"); a key that itself holds a
    "/" (COCO's "image/id") is matched whole first."""
    if path in example:
        return example[path]
    head, sep, rest = path.partition("/")
    if sep and head in example and isinstance(example[head], Mapping):
        return _field(example[head], rest, where)
    raise SourceError(f"{where}: no field {path!r} (fields: {', '.join(sorted(example))})")


def _scalar(value: Any, index: int = 0) -> Any:
    """A plain Python value from a TFDS feature value: element `index` of a sequence, bytes decoded as UTF-8."""
    if (isinstance(value, np.ndarray) and value.ndim > 0) or isinstance(value, list | tuple):
        value = value[index] if len(value) > index else None
    if isinstance(value, np.ndarray | np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord files, no TensorFlow).

    Fields (the keys of the mapping a config gives, next to `tfds`):
      tfds: the dataset name, with config and version as TFDS writes them: "coco_captions/2017:1.1.0".
      split: a TFDS split, slices included ("val", "validation[:1000]").
      data_dir: the folder holding prepared datasets (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      prompt_field: the text feature, "/" for nested features; for a sequence (COCO's five captions) element
        `prompt_index` is used.
      image_field: the image feature (for image sets), or None.
      id_field: a feature giving `case_number` (e.g. "image/id"); None: the example's index in the split.
      seed: rows get seed + (index in the split), so a row's seed does not depend on the selection.
      extra_fields: more row columns, {column: feature path} (e.g. {"filename": "image/filename"}).
    """

    tfds: str
    split: str = "train"
    data_dir: str | None = None
    prompt_field: str = "captions/text"
    prompt_index: int = 0
    image_field: str | None = "image"
    id_field: str | None = None
    seed: int = 0
    extra_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, source: Any) -> TfdsSource | None:
        """A TfdsSource from a mapping or ConfigDict with a `tfds` key; None for any other source."""
        if isinstance(source, TfdsSource):
            return source
        if hasattr(source, "to_dict"):  # ml_collections.ConfigDict
            source = source.to_dict()
        if not isinstance(source, Mapping) or "tfds" not in source:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(source) - known)
        if unknown:
            raise SourceError(f"TFDS source {source['tfds']!r}: unknown keys {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        return cls(**{**source, "extra_fields": dict(source.get("extra_fields") or {})})

    @property
    def where(self) -> str:
        """How error messages name this source."""
        return f"TFDS {self.tfds} split {self.split} in {self.data_dir or 'the default TFDS data_dir'}"

    def data_source(self, skip_decoding: Sequence[str] = ()):
        """The split as a random-access sequence of examples; features in `skip_decoding` stay encoded bytes."""
        tfds = _tfds()
        kwargs = {} if self.data_dir is None else {"data_dir": self.data_dir}
        try:
            builder = tfds.core.read_only_builder.builder_from_files(self.tfds, **kwargs)
        except tfds.core.registered.DatasetNotFoundError:
            raise SourceError(f"{self.where}: no prepared dataset (varejax never downloads; prepare it with "
                              "`tfds build --file_format=array_record` or copy it there)") from None
        decoders = {name: tfds.decode.SkipDecoding() for name in skip_decoding} or None
        try:
            return builder.as_data_source(split=self.split, decoders=decoders)
        except NotImplementedError:
            raise SourceError(f"{self.where}: stored as {builder.info.file_format.value}, but tfds.data_source reads "
                              "ArrayRecord only: `tfds convert_format --out_file_format=array_record`") from None
        except ValueError as err:  # an unknown split or a bad slice
            raise SourceError(f"{self.where}: {str(err).splitlines()[0]}") from None

    def prompt_rows(self, count: int | None = None, sample_seed: int | None = None) -> list[dict[str, Any]]:
        """Prompt rows of the selected examples (images are not decoded)."""
        source = self.data_source(skip_decoding=[self.image_field] if self.image_field else [])
        rows = []
        for index in select_indices(len(source), count, sample_seed):
            example = source[index]
            where = f"{self.where}, example {index}"
            prompt = _scalar(_field(example, self.prompt_field, where), self.prompt_index)
            if not isinstance(prompt, str) or not prompt.strip():
                raise SourceError(f"{where}: {self.prompt_field} gives no text ({prompt!r})")
            case_number = index if self.id_field is None else _as_int(
                _scalar(_field(example, self.id_field, where)), where, self.id_field)
            row = {"case_number": case_number, "prompt": prompt.strip(), "seed": int(self.seed) + index}
            for column, path in self.extra_fields.items():
                row[column] = _scalar(_field(example, path, where))
            rows.append(row)
        if not rows:
            raise SourceError(f"{self.where}: no examples")
        numbers = [row["case_number"] for row in rows]
        if len(set(numbers)) != len(numbers):
            raise SourceError(f"{self.where}: {self.id_field} repeats a value; case numbers must be distinct")
        return rows

    def record(self) -> dict[str, Any]:
        """What identifies the data, for results files: name, version, split, data_dir, fields."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": "tfds", **fields, "extra_fields": dict(self.extra_fields)}


def write_tfds_dataset(
    name: str,
    data_dir: str | os.PathLike,
    features: Any,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    version: str = "1.0.0",
) -> str:
    """Writes examples as a prepared TFDS dataset in ArrayRecord files, without TensorFlow; returns its folder.

    How a lab turns its own captions and images into a dataset `TfdsSource` reads (and how the tests build
    one). `features` is a `tfds.features.FeaturesDict`; image features may be given as uint8 [H, W, 3]
    arrays (written as PNG with Pillow: TFDS's own array encoder needs TensorFlow) or as encoded bytes.
    Examples keep their order (shuffling off), so example i of a split is the i-th one given.
    """
    from PIL import Image

    tfds = _tfds()
    image_keys = [key for key, feature in features.items() if isinstance(feature, tfds.features.Image)]

    def encoded(example: Mapping[str, Any]) -> dict[str, Any]:
        example = dict(example)
        for key in image_keys:
            if isinstance(example.get(key), np.ndarray):
                buffer = io.BytesIO()
                Image.fromarray(example[key]).save(buffer, format="PNG")
                example[key] = buffer.getvalue()
        return example

    # A builder class made here, unregistered: tfds's adhoc builder imports TensorFlow to test its inputs.
    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        # No source file to find checksums next to (tfds's lookup of one needs importlib_resources, which
        # tensorflow-datasets 4.9.10 does not install on Python >= 3.9).
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {split: ((i, encoded(ex)) for i, ex in enumerate(examples)) for split, examples in splits.items()}

        def _generate_examples(self):
            raise NotImplementedError  # every split comes from _split_generators

    Builder.name = name
    builder = Builder(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)
