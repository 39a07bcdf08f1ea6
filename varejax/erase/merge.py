"""`varejax merge`: erasure deltas applied to a converted base model, written as a normal model folder.

    varejax merge --base models/infinity_2b runs/church/delta.safetensors --out models/infinity_2b_church
    varejax merge --base models/infinity_2b runs/a/delta.safetensors runs/b/lora.safetensors --out models/ab

Each DELTA is a `delta.safetensors` (`varejax-delta/1`: {upstream key: delta}, torch layout) or a LoRA run's
`lora.safetensors` (`varejax-lora/1`: factors, turned into the same deltas by `factor_deltas`). Several
deltas are summed in float32 in the order given, then added once: float32(param) + sum, rounded to the
parameter dtype (`export.add_deltas`, the arithmetic of the trainer's exports, so one delta on its own base
gives the erased model/ the run wrote, bit for bit where the delta says "exact"). The base is loaded in
the deltas' "param_dtype" (the dtype their runs trained in: a bf16 run's delta is merged onto the base
rounded to bf16, as that run saw it), which is also the merged folder's dtype.

Checks, each a one-line error (exit 2) before anything is written:
  * --out exists and --overwrite is not given;
  * a delta's keys or shapes do not fit the base (the first few are named);
  * a delta was made on another base: its metadata "base_params_sha256" differs from `params_sha256` of the
    base loaded in the delta's "param_dtype" (both hashes are named). `--force` merges anyway and config.json
    records it, as it does for a delta with no recorded base hash.

The output's config.json "source" records the base, every delta (path, file sha256, base hash, method),
whether --force was needed, and the merged parameters' own `params_sha256` (the base hash of a run
trained on it). A delta made on an erased model (a chain) is merged onto that model, not onto the base.
On several processes process 0 alone reads and writes; the others return its exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import numpy as np

from varejax.errors import UserError

_SHOWN = 3  # problems named in one error line


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity (holds arrays)
class Delta:
    """One delta file: its tensors as {upstream key: float32 delta (torch layout)} and its metadata."""
    path: str
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    file_sha256: str

    @property
    def base_sha256(self) -> str | None:
        return self.metadata.get("base_params_sha256")

    def record(self, forced: bool) -> dict[str, Any]:
        """What the merged folder's config.json says about this delta."""
        method = self.metadata.get("method")
        return {"path": self.path, "format": self.metadata.get("format"), "file_sha256": self.file_sha256,
                "base_params_sha256": self.base_sha256, "method": json.loads(method) if method else None,
                "exact": self.metadata.get("exact"), "forced": forced}


def factor_deltas(factors: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """{kernel key: scale * B @ A} (torch layout, float32) of a lora.safetensors' factors.

    Formed exactly as the trainer forms a LoRA delta (`lora.factor_delta` on A [in, r] and B [r, out],
    C-contiguous), so the result equals delta.safetensors bit for bit.
    """
    from varejax.models import lora

    out = {}
    for a_key in sorted(k for k in factors if k.endswith(".lora_A.weight")):
        module = a_key.removesuffix(".lora_A.weight")
        b_key = f"{module}.lora_B.weight"
        if b_key not in factors:
            raise UserError(f"LoRA factors: {a_key} has no {b_key}")
        a = np.ascontiguousarray(factors[a_key].T)  # [in, r]
        b = np.ascontiguousarray(factors[b_key].T)  # [r, out]
        out[f"{module}.weight"] = np.ascontiguousarray(lora.factor_delta(a, b, scale).T)
    if len(out) * 2 != len(factors):
        stray = sorted(k for k in factors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
        raise UserError(f"LoRA factors: tensors that are not factors: {stray[:_SHOWN]}")
    return out


def read_delta(path: str | os.PathLike) -> Delta:
    """Reads a delta.safetensors or lora.safetensors (factors turned into deltas)."""
    from safetensors.numpy import load

    from varejax.erase.export import LORA_FORMAT, read_metadata
    from varejax.paths import as_path

    file = as_path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such delta file")
    data = file.read_bytes()
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise UserError(f"{path}: not a readable .safetensors file ({err})") from None
    metadata = read_metadata(file)
    if metadata.get("format") == LORA_FORMAT:
        scale = float(json.loads(metadata["lora"])["scale"])
        tensors = factor_deltas(tensors, scale)
    return Delta(str(path), {k: np.asarray(v, np.float32) for k, v in tensors.items()}, metadata,
                 hashlib.sha256(data).hexdigest())


def key_problems(cfg: Any, deltas: list[Delta]) -> list[str]:
    """Keys of the deltas that are not parameters of `cfg`'s model, or have another shape (shapes only: no
    parameters are read)."""
    from varejax.convert.infinity_keys import upstream_key
    from varejax.models import apply

    shapes = {}
    for path, spec in apply.flat_params(apply.abstract_params(cfg)).items():
        key, transpose = upstream_key(path, cfg)
        shapes[key] = tuple(spec.shape)[::-1] if transpose else tuple(spec.shape)
    problems = []
    for delta in deltas:
        for key, value in delta.tensors.items():
            if key not in shapes:
                problems.append(f"{delta.path}: {key} is not a parameter of the base")
            elif tuple(value.shape) != shapes[key]:
                problems.append(f"{delta.path}: {key} has shape {tuple(value.shape)}, the base {shapes[key]}")
    return problems


def summed(deltas: list[Delta]) -> dict[str, np.ndarray]:
    """{key: d1 + d2 + ...} in float32, added in the order given."""
    total: dict[str, np.ndarray] = {}
    for delta in deltas:
        for key, value in delta.tensors.items():
            total[key] = total[key] + value if key in total else value
    return total


def merge_deltas(base: str | os.PathLike, delta_paths: list[str], out: str | os.PathLike, *,
                 overwrite: bool = False, force: bool = False) -> dict[str, Any]:
    """Writes `out`: the base model folder plus the deltas (module doc); returns config.json "source"."""
    from varejax.checkpoint import load_infinity, read_meta, save_model
    from varejax.erase.export import add_deltas, params_sha256
    from varejax.models.config import InfinityConfig
    from varejax.paths import as_path

    if as_path(out).exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    if not delta_paths:
        raise UserError("give at least one DELTA file")
    deltas = [read_delta(p) for p in delta_paths]
    meta = read_meta(base, "infinity")
    overrides: dict[str, Any] = {}
    dtypes = sorted({d.metadata["param_dtype"] for d in deltas if "param_dtype" in d.metadata})
    if len(dtypes) > 1:
        raise UserError(f"the deltas were trained in different parameter dtypes {dtypes}; merge each group "
                        f"separately")
    if dtypes:  # the base as the runs saw it (its hash and the exact round trip are in that dtype)
        overrides["param_dtype"] = dtypes[0]
    stored = InfinityConfig.from_dict(meta["model"])
    if stored.lora_rank:
        overrides["lora_rank"] = 0  # a base holding adapters is merged with them first
    cfg = stored.replace(**overrides)
    problems = key_problems(cfg, deltas)
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise UserError(f"the deltas do not fit {base}: {'; '.join(problems[:_SHOWN])}{more}")

    cfg, params = load_infinity(str(base), **overrides)
    base_hash = params_sha256(params)
    foreign = [d for d in deltas if d.base_sha256 != base_hash]
    if foreign and not force:
        d = foreign[0]
        made_on = f"base {d.base_sha256}" if d.base_sha256 else "an unknown base (no base_params_sha256 recorded)"
        raise UserError(f"{d.path} was made on {made_on}, but {base} is {base_hash}"
                        f"{' in ' + overrides['param_dtype'] if 'param_dtype' in overrides else ''}; "
                        f"pass --force to merge anyway")
    merged = add_deltas(cfg, params, summed(deltas), "the deltas")
    source = {"merged": {"base": str(base), "base_params_sha256": base_hash, "base_source": meta.get("source"),
                         "deltas": [d.record(d in foreign) for d in deltas], "forced": bool(foreign)},
              "params_sha256": params_sha256(merged)}
    save_model(out, "infinity", cfg, merged, source=source, overwrite=overwrite)
    return source


# ---- the command -------------------------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="apply erasure deltas (delta.safetensors, lora.safetensors) to a converted base model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the converted base model folder the deltas were made on")
    parser.add_argument("deltas", nargs="+", metavar="DELTA", help="delta.safetensors or lora.safetensors files, "
                                                                   "summed in this order")
    parser.add_argument("--out", required=True, help="the merged model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--force", action="store_true",
                        help="merge deltas made on another base (or with no recorded base); config.json records it")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Runs `varejax merge`; on several processes process 0 alone works and every process returns its status."""
    from varejax.parallel.distributed import run_on_main

    if overrides:
        raise UserError("merge takes no --config.* overrides")
    return run_on_main(lambda: _merge_here(args), "merge")


def _merge_here(args: argparse.Namespace) -> int:
    try:
        source = merge_deltas(args.base, list(args.deltas), args.out, overwrite=args.overwrite, force=args.force)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    merged = source["merged"]
    forced = " (--force: made on another base)" if merged["forced"] else ""
    print(f"merged {len(merged['deltas'])} delta(s) into {args.base} -> {args.out}{forced}; "
          f"params sha256 {source['params_sha256']}")
    return 0
