"""Convert a local HF T5 folder (Flan-T5-XL) into a varejax text-encoder folder.

    varejax convert t5 --src /data/flan-t5-xl --out models/flan_t5_xl
    varejax convert t5 --src /data/flan-t5-xl --dry-run

`--src` is an HF folder with `config.json` and weights: `model.safetensors`, `pytorch_model.bin`, or shards
with `model.safetensors.index.json` / `pytorch_model.bin.index.json` (safetensors preferred when a folder
holds both). Both `T5EncoderModel` and full `T5ForConditionalGeneration` checkpoints are accepted; the
decoder and `lm_head` tensors of the latter are dropped. The output holds the encoder parameters (orbax),
`config.json` (format, model config, sha256 of every source file) and a copy of `tokenizer.json`, so the
folder is all the text encoder needs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from varejax.convert import strict
from varejax.convert.sources import CheckpointError, CheckpointSource, open_checkpoint, sha256_file, source_fingerprint
from varejax.convert.t5_keys import DROPPED_PREFIXES, t5_rules
from varejax.models.t5 import T5Config

FORMAT = "varejax-t5/1"
TOKENIZER_FILE = "tokenizer.json"
# In order of preference; an HF repo often carries several of them (and TF/Flax files, ignored).
WEIGHT_CANDIDATES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin")


@dataclasses.dataclass
class T5ConversionReport:
    source: str
    layout: str
    config: T5Config
    tensors: int
    parameters: int
    dropped_decoder: int
    dropped_tied: int
    tokenizer: bool
    seconds: float
    out: str | None

    def summary(self) -> str:
        cfg = self.config
        where = f"written to {self.out}" if self.out else "dry run: nothing written"
        notes = []
        if self.dropped_decoder:
            notes.append(f"{self.dropped_decoder} decoder/lm_head tensors of a full T5 checkpoint dropped")
        if self.dropped_tied:
            notes.append("encoder.embed_tokens.weight checked equal to shared.weight and dropped")
        if self.out and not self.tokenizer:
            notes.append(f"no {TOKENIZER_FILE} in the source folder: copy one into {self.out} before encoding text")
        note = f"; note: {'; '.join(notes)}" if notes else ""
        return (f"{self.source} ({self.layout}): all {self.tensors} encoder tensors mapped for T5 "
                f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}, "
                f"{cfg.feed_forward_proj} ({self.parameters:,} parameters) in {self.seconds:.1f}s; {where}{note}")


def read_hf_config(folder: Path, **overrides: Any) -> tuple[T5Config, dict[str, Any]]:
    """(T5Config, the raw dict) of `folder/config.json`; CheckpointError naming the file when it does not fit."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; --src must be a local HF T5 folder (config.json and "
                              f"weights, e.g. a download of google/flan-t5-xl)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return T5Config.from_hf_config(hf, **overrides), hf
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def find_weights(folder: Path) -> Path:
    """The weights file (or shard index) of an HF folder, by WEIGHT_CANDIDATES preference."""
    for name in WEIGHT_CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise CheckpointError(f"{folder}: no PyTorch/safetensors weights; expected one of {list(WEIGHT_CANDIDATES)}, "
                          f"found {others}")


def _blocks_in(keys) -> int:
    """Encoder blocks a key table holds (1 + the largest `encoder.block.{i}` index, 0 if none)."""
    found = [int(k.split(".")[2]) for k in keys if k.startswith("encoder.block.") and k.split(".")[2].isdigit()]
    return max(found) + 1 if found else 0


def _explain(p: strict.Plan, source: str, cfg: T5Config, keys=()) -> str:
    """A readable report of a failed plan, with the most likely cause first."""
    lines = [f"{source} does not match the T5 encoder its config.json describes ({cfg.num_layers} layers, "
             f"d_model {cfg.d_model}, {cfg.feed_forward_proj}): {len(p.missing)} missing, {len(p.unexpected)} "
             f"unexpected, {len(p.mismatched)} mis-shaped tensors."]
    prefix = strict._common_prefix(p.unexpected)
    has_t5_keys = any(k.startswith("encoder.block.") for k in p.unexpected) or len(p.missing) < len(p.rules)
    if prefix and not has_t5_keys:
        lines.append(f"Likely cause: every key starts with {prefix!r} (a wrapper); save the inner model instead.")
    elif not has_t5_keys:
        lines.append("Likely cause: this is not a T5 encoder checkpoint (none of its keys is a T5 encoder key); "
                     "check --src.")
    elif 0 < _blocks_in(keys) != cfg.num_layers:
        lines.append(f"Likely cause: config.json says num_layers {cfg.num_layers} but the weights hold "
                     f"{_blocks_in(keys)} encoder blocks (config.json of another T5 size, or truncated weights).")
    elif {_ffn_kind(p.missing), _ffn_kind(p.unexpected)} == {"relu", "gated-gelu"}:
        lines.append(f"Likely cause: config.json says feed_forward_proj {cfg.feed_forward_proj!r} but the weights "
                     f"are {_ffn_kind(p.unexpected)!r} (config.json from another T5 family?).")
    elif p.missing and not p.unexpected and not p.mismatched:
        lines.append("Likely cause: the weights are truncated or a shard is missing (keys are missing, nothing else "
                     "is wrong); check file sizes/sha256 or the shard index.")
    elif p.mismatched and not p.missing and not p.unexpected:
        lines.append("Likely cause: config.json and the weights are of different T5 sizes (config.json from "
                     "another model?).")
    else:
        lines.append("Likely cause: config.json does not belong to these weights (layer count or feed-forward "
                     "type differ), or the weights are not an HF T5 checkpoint.")
    limit = 12
    for key, expected, found in p.mismatched[:limit]:
        lines.append(f"  shape  {key}: expected {list(expected)}, found {list(found)}")
    for key in p.missing[:limit]:
        lines.append(f"  missing  {key}")
    for key in p.unexpected[:limit]:
        lines.append(f"  unexpected  {key}")
    hidden = sum(max(0, len(x) - limit) for x in (p.mismatched, p.missing, p.unexpected))
    if hidden:
        lines.append(f"  ... and {hidden} more")
    return "\n".join(lines)


def _ffn_kind(keys: list[str]) -> str | None:
    if any(k.endswith("DenseReluDense.wi.weight") for k in keys):
        return "relu"
    if any(k.endswith("DenseReluDense.wi_0.weight") for k in keys):
        return "gated-gelu"
    return None


def _tied_check(source: CheckpointSource):
    def check(value: np.ndarray) -> str | None:
        shared = source.tensors["shared.weight"].load()
        if np.array_equal(np.asarray(value), np.asarray(shared)):
            return None
        return "differs from shared.weight (the two are tied in T5; the file mixes two checkpoints?)"
    return check


def plan_t5(source: CheckpointSource, cfg: T5Config) -> tuple[strict.Plan, list[str]]:
    """Checks every encoder key and shape; returns the plan and the dropped decoder/lm_head keys."""
    shapes = source.shapes()
    decoder = sorted(k for k in shapes if k.startswith(DROPPED_PREFIXES))
    encoder_shapes = {k: v for k, v in shapes.items() if not k.startswith(DROPPED_PREFIXES)}
    p = strict.plan(encoder_shapes, *t5_rules(cfg, _tied_check(source)))
    if not p.ok:
        raise strict.ConversionError(_explain(p, source.path, cfg, encoder_shapes))
    return p, decoder


def convert_t5(src: str, out: str | None, *, dry_run: bool = False, param_dtype: str = "float32",
               overwrite: bool = False, progress: bool = True) -> T5ConversionReport:
    """Converts (or with `dry_run`, only checks) a local HF T5 folder.

    Raises:
      CheckpointError (ConversionError): unreadable files, an unsupported config, or keys/shapes that do not
        match the config.
    """
    start = time.time()
    folder = Path(src)
    if not folder.is_dir():
        raise CheckpointError(f"{src}: not a folder; --src must be a local HF T5 folder (config.json and weights)")
    cfg, hf = read_hf_config(folder, param_dtype=param_dtype)
    source = open_checkpoint(find_weights(folder))
    p, decoder = plan_t5(source, cfg)
    n_params = int(sum(np.prod(r.shape) for r in p.rules))
    tokenizer = folder / TOKENIZER_FILE
    report = T5ConversionReport(src, source.layout, cfg, len(p.rules) + len(p.dropped), n_params, len(decoder),
                                len(p.dropped), tokenizer.is_file(), 0.0, None)
    if dry_run:
        report.seconds = time.time() - start
        return report
    if out is None:
        raise ValueError("--out is required unless --dry-run")
    wrap = None
    if progress:
        from tqdm import tqdm

        def wrap(stream):
            return tqdm(stream, total=len(p.rules) + len(p.dropped), desc="converting", unit="tensor")

    dtype = np.dtype(param_dtype) if param_dtype != "bfloat16" else _bf16()
    flat = strict.load_mapped(source, p, dtype=dtype, progress=wrap)
    sha = source_fingerprint(source)
    sha["config.json"] = sha256_file(folder / "config.json")
    if tokenizer.is_file():
        sha[TOKENIZER_FILE] = sha256_file(tokenizer)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": cfg.to_dict(),
        "tokenizer": TOKENIZER_FILE if tokenizer.is_file() else None,
        "source": {"path": str(src), "layout": source.layout, "sha256": sha, "tensors": report.tensors,
                   "dropped_decoder_tensors": len(decoder), "hf_config": hf},
    }
    _write(out, flat, meta, tokenizer if tokenizer.is_file() else None, overwrite)
    report.out, report.seconds = out, time.time() - start
    return report


def _write(out: str, flat, meta: dict[str, Any], tokenizer: Path | None, overwrite: bool) -> None:
    """Atomically writes params/, config.json and tokenizer.json (as checkpoint.write_model_dir, plus the file)."""
    import varejax
    from varejax.checkpoint import CONFIG_FILE, PARAMS_SUBDIR, atomic_directory, save_params

    meta = dict(meta)
    meta.setdefault("varejax", varejax.__version__)
    meta.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    with atomic_directory(out, overwrite) as tmp:
        save_params(tmp / PARAMS_SUBDIR, flat)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def read_t5_config(model_dir: str) -> dict[str, Any]:
    """config.json of a converted T5 folder (format checked)."""
    from varejax.checkpoint import ModelDirError, read_config

    meta = read_config(model_dir)
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{model_dir}: config.json format is {meta.get('format')!r}, expected {FORMAT!r} "
                            f"(a folder written by `varejax convert t5`)")
    return meta


def load_t5(model_dir: str, *, mesh=None, rules=None, **overrides) -> tuple[T5Config, Any]:
    """Loads a converted T5 folder -> (T5Config, nnx.State).

    Args:
      model_dir: output of `varejax convert t5`.
      mesh: when given, parameters are restored straight onto the mesh, sharded by `rules`.
      **overrides: numerics to change (compute_dtype, matmul_precision, ...); architecture fields must match.
    """
    from varejax.checkpoint import apply_numerics, restore_state
    from varejax.models import t5

    meta = read_t5_config(model_dir)
    cfg = apply_numerics(T5Config.from_dict(meta["model"]), overrides, model_dir)
    state = restore_state(model_dir, t5.abstract_params(cfg), mesh, rules)
    return cfg, state
