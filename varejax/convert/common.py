"""The steps every converter shares: plan -> report -> (unless a dry run) load tensors -> write the folder.

A converter (`infinity.py`, `vae.py`, `t5.py`) opens its source, resolves the model config and checks
every key and shape into a `strict.Plan`; `finish` then does the rest the same way for all of them:
it reads the planned tensors in the storage dtype (with a progress bar on a terminal) and writes the
model folder with `varejax.checkpoint.save_model`, recording the source's path, layout and sha256s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from varejax import checkpoint
from varejax.convert import strict
from varejax.convert.sources import CheckpointError, CheckpointSource, open_checkpoint, source_fingerprint


@dataclasses.dataclass
class ConversionReport:
    """What a conversion (or a dry run) found and did; `summary()` is the line the CLI prints."""

    source: str
    layout: str
    target: str  # what the tensors were mapped for, e.g. "--arch 2b"
    tensors: int
    parameters: int
    dropped: int  # tensors checked and not stored (buffers, a tied copy)
    seconds: float = 0.0
    out: str | None = None
    what: str = "tensors"
    details: tuple[str, ...] = ()  # shown inside the parentheses after the parameter count
    notes: tuple[str, ...] = ()  # shown after the summary

    def summary(self) -> str:
        where = f"written to {self.out}" if self.out else "dry run: nothing written"
        inside = ", ".join((f"{self.parameters:,} parameters", *self.details))
        note = f"; note: {'; '.join(self.notes)}" if self.notes else ""
        return (f"{self.source} ({self.layout}): all {self.tensors} {self.what} mapped for {self.target} ({inside}) "
                f"in {self.seconds:.1f}s; {where}{note}")


def plan_report(src: str, source: CheckpointSource, p: strict.Plan, target: str, **fields: Any) -> ConversionReport:
    """The report of a successful plan of `src` (tensor and parameter counts), before anything is read."""
    return ConversionReport(str(src), source.layout, target, tensors=len(p.rules) + len(p.dropped),
                            parameters=int(sum(np.prod(r.shape) for r in p.rules)), dropped=len(p.dropped), **fields)


def storage_dtype(param_dtype: str) -> np.dtype:
    """The numpy dtype parameters are stored in ("float32" or "bfloat16")."""
    if param_dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(param_dtype)


def finish(kind: str, cfg: Any, source: CheckpointSource, p: strict.Plan, report: ConversionReport, *,
           out: str | None, dry_run: bool, param_dtype: str, overwrite: bool, progress: bool, start: float,
           source_meta: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
           files: Mapping[str, Any] | None = None) -> ConversionReport:
    """The shared tail of every converter: returns `report` for a dry run, else loads and writes the folder.

    Args:
      kind: the model-folder kind (`checkpoint.FORMATS`); `cfg` is stored as its "model".
      report: from `plan_report`; its `out` and `seconds` are filled in here.
      source_meta: more config.json "source" fields (beside path, layout, sha256 and tensors).
      extra, files: more config.json fields and files for the folder (`checkpoint.save_model`).
      start: `time.time()` when the conversion began.
    """
    if dry_run:
        report.seconds = time.time() - start
        return report
    if out is None:
        raise ValueError("--out is required unless --dry-run")
    wrap = None
    if progress:
        from tqdm import tqdm

        def wrap(stream: Iterable) -> Iterable:
            return tqdm(stream, total=report.tensors, desc="converting", unit="tensor")

    flat = strict.load_mapped(source, p, dtype=storage_dtype(param_dtype), progress=wrap)
    sha = source_fingerprint(source)
    sha.update((source_meta or {}).get("sha256", {}))
    record = {"path": report.source, "layout": source.layout, "tensors": report.tensors, **(source_meta or {}),
              "sha256": sha}
    checkpoint.save_model(out, kind, cfg, flat, source=record, extra=extra, files=files, overwrite=overwrite)
    report.out, report.seconds = out, time.time() - start
    return report


# ---- HF folders (T5, CLIP) ------------------------------------------------------------------------------

# In order of preference; an HF repo often carries several of them (and TF/Flax files, ignored).
WEIGHT_CANDIDATES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin")


def find_weights(folder: Path) -> Path:
    """The weights file (or shard index) of an HF folder, by WEIGHT_CANDIDATES preference."""
    for name in WEIGHT_CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise CheckpointError(f"{folder}: no PyTorch/safetensors weights; expected one of {list(WEIGHT_CANDIDATES)}, "
                          f"found {others}")


def read_hf_json(folder: Path, model: str, example: str) -> tuple[Path, dict[str, Any]]:
    """(path, dict) of `folder/config.json` of an HF `model` folder; CheckpointError naming the file when it is
    missing, not JSON, or not an object (`example`: a repo the user may have downloaded, for the message)."""
    import json

    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; --src must be a local HF {model} folder (config.json and "
                              f"weights, e.g. a download of {example})")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return path, hf


def open_hf_folder(src: str, model: str) -> tuple[Path, CheckpointSource]:
    """(folder, its weights opened lazily) of a local HF `model` folder ("T5", "CLIP"); one-line errors when `src`
    is remote, not a folder, or holds no weights."""
    from varejax.paths import require_local

    folder = Path(require_local(src, f"an HF {model} folder is read with torch.load / safetensors, which open "
                                     f"local files only"))
    if not folder.is_dir():
        raise CheckpointError(f"{src}: not a folder; --src must be a local HF {model} folder (config.json and "
                              f"weights)")
    return folder, open_checkpoint(find_weights(folder))
