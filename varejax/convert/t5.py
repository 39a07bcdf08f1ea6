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

import time
from pathlib import Path
from typing import Any

import numpy as np

from varejax.checkpoint import TOKENIZER_FILE
from varejax.convert import strict
from varejax.convert.common import ConversionReport, finish, open_hf_folder, plan_report, read_hf_json
from varejax.convert.sources import CheckpointError, CheckpointSource, sha256_file
from varejax.convert.t5_keys import DROPPED_PREFIXES, t5_rules
from varejax.models.t5 import T5Config


def read_hf_config(folder: Path, **overrides: Any) -> tuple[T5Config, dict[str, Any]]:
    """(T5Config, the raw dict) of `folder/config.json`; CheckpointError naming the file when it does not fit."""
    path, hf = read_hf_json(folder, "T5", "google/flan-t5-xl")
    try:
        return T5Config.from_hf_config(hf, **overrides), hf
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _blocks_in(keys) -> int:
    """Encoder blocks a key table holds (1 + the largest `encoder.block.{i}` index, 0 if none)."""
    found = [int(k.split(".")[2]) for k in keys if k.startswith("encoder.block.") and k.split(".")[2].isdigit()]
    return max(found) + 1 if found else 0


def _explain(p: strict.Plan, source: str, cfg: T5Config, keys=()) -> str:
    """A readable report of a failed plan, with the most likely cause first."""
    lines = [f"{source} does not match the T5 encoder its config.json describes ({cfg.num_layers} layers, "
             f"d_model {cfg.d_model}, {cfg.feed_forward_proj}): {len(p.missing)} missing, {len(p.unexpected)} "
             f"unexpected, {len(p.mismatched)} mis-shaped tensors."]
    prefix = strict.common_prefix(p.unexpected)
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
        lines.append(strict.TRUNCATED)
    elif p.mismatched and not p.missing and not p.unexpected:
        lines.append("Likely cause: config.json and the weights are of different T5 sizes (config.json from "
                     "another model?).")
    else:
        lines.append("Likely cause: config.json does not belong to these weights (layer count or feed-forward "
                     "type differ), or the weights are not an HF T5 checkpoint.")
    return "\n".join(lines + strict.problem_lines(p))


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
               overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Converts (or with `dry_run`, only checks) a local HF T5 folder.

    Raises:
      CheckpointError (ConversionError): unreadable files, an unsupported config, or keys/shapes that do not
        match the config.
    """
    start = time.time()
    folder, source = open_hf_folder(src, "T5")
    cfg, hf = read_hf_config(folder, param_dtype=param_dtype)
    p, decoder = plan_t5(source, cfg)
    tokenizer = folder / TOKENIZER_FILE
    notes = []
    if decoder:
        notes.append(f"{len(decoder)} decoder/lm_head tensors of a full T5 checkpoint dropped")
    if p.dropped:
        notes.append("encoder.embed_tokens.weight checked equal to shared.weight and dropped")
    if out and not dry_run and not tokenizer.is_file():
        notes.append(f"no {TOKENIZER_FILE} in the source folder: copy one into {out} before encoding text")
    target = (f"T5 {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}, "
              f"{cfg.feed_forward_proj}")
    report = plan_report(src, source, p, target, what="encoder tensors", notes=tuple(notes))
    sha = {"config.json": sha256_file(folder / "config.json")}
    files = {}
    if tokenizer.is_file():
        sha[TOKENIZER_FILE] = sha256_file(tokenizer)
        files[TOKENIZER_FILE] = tokenizer
    return finish("t5", cfg, source, p, report, out=out, dry_run=dry_run, param_dtype=param_dtype,
                  overwrite=overwrite, progress=progress, start=start,
                  source_meta={"sha256": sha, "dropped_decoder_tensors": len(decoder), "hf_config": hf},
                  extra={"tokenizer": TOKENIZER_FILE if tokenizer.is_file() else None}, files=files)
