"""Convert an upstream Infinity transformer checkpoint into a varejax model folder.

    varejax convert infinity --src infinity_2b_reg.pth --arch 2b --out models/infinity_2b
    varejax convert infinity --src infinity_8b_weights/ --arch 8b --out models/infinity_8b --dry-run

`--src` is a plain state_dict `.pth`, a training checkpoint (`{'trainer': {'gpt_fsdp': ...}}`), or an
HF-style sharded folder. `--arch` is a preset (2b, 8b) or a JSON config (ours, or an upstream fixture
config with `infinity_constructor_kwargs`). The output holds the parameters (orbax) and `config.json`
with the model config and the sha256 of every source file.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from varejax.convert import strict
from varejax.convert.infinity_keys import infinity_rules
from varejax.convert.sources import CheckpointSource, open_checkpoint, source_fingerprint
from varejax.models.config import PRESETS, InfinityConfig, load_arch

WRAPPERS = (("trainer", "gpt_fsdp"), ("gpt_fsdp",), ("state_dict",), ("model",))
FORMAT = "varejax-infinity/1"


@dataclasses.dataclass
class ConversionReport:
    arch: str
    source: str
    layout: str
    tensors: int
    parameters: int
    buffers_dropped: int
    seconds: float
    out: str | None

    def summary(self) -> str:
        where = f"written to {self.out}" if self.out else "dry run: nothing written"
        return (f"{self.source} ({self.layout}): all {self.tensors} tensors mapped for --arch {self.arch} "
                f"({self.parameters:,} parameters, {self.buffers_dropped} buffers checked and dropped) "
                f"in {self.seconds:.1f}s; {where}")


def _alternative_plans(shapes, cfg: InfinityConfig) -> dict[str, strict.Plan]:
    """Plans of the other presets, to suggest the right --arch when the requested one fails."""
    out = {}
    for name, preset in PRESETS.items():
        if preset.arch_dict() == cfg.arch_dict():
            continue
        try:
            out[name] = strict.plan(shapes, *infinity_rules(preset))
        except Exception:  # a preset that cannot be built here is simply not suggested
            continue
    return out


def plan_infinity(source: CheckpointSource, cfg: InfinityConfig, arch: str) -> strict.Plan:
    """Checks every key and shape of `source` against `cfg`; raises ConversionError listing all problems."""
    shapes = source.shapes()
    p = strict.plan(shapes, *infinity_rules(cfg))
    if not p.ok:
        strict.check(p, source.path, arch, _alternative_plans(shapes, cfg))
    return p


def convert_infinity(src: str, arch: str, out: str | None, *, dry_run: bool = False, param_dtype: str = "float32",
                     overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Converts (or with `dry_run`, only checks) an upstream transformer checkpoint.

    Raises:
      CheckpointError (ConversionError): unreadable file, or keys/shapes that do not match `arch`.
    """
    start = time.time()
    cfg = load_arch(arch, param_dtype=param_dtype)
    source = open_checkpoint(src, WRAPPERS)
    p = plan_infinity(source, cfg, arch)
    n_params = int(sum(np.prod(r.shape) for r in p.rules))
    if dry_run:
        return ConversionReport(arch, src, source.layout, len(p.rules) + len(p.dropped), n_params, len(p.dropped),
                                time.time() - start, None)
    if out is None:
        raise ValueError("--out is required unless --dry-run")
    wrap = None
    if progress:
        from tqdm import tqdm

        def wrap(stream):
            return tqdm(stream, total=len(p.rules) + len(p.dropped), desc="converting", unit="tensor")

    flat = strict.load_mapped(source, p, dtype=np.dtype(param_dtype) if param_dtype != "bfloat16" else _bf16(),
                              progress=wrap)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": cfg.without_lora().to_dict(),  # the folder holds no adapters; load_infinity can add them
        "source": {"path": str(src), "layout": source.layout, "sha256": source_fingerprint(source),
                   "tensors": len(p.rules) + len(p.dropped), "dropped_buffers": len(p.dropped)},
    }
    from varejax.checkpoint import write_model_dir
    write_model_dir(out, flat, meta, overwrite=overwrite)
    return ConversionReport(arch, src, source.layout, len(p.rules) + len(p.dropped), n_params, len(p.dropped),
                            time.time() - start, out)


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def load_infinity(model_dir: str, *, mesh=None, rules=None, **overrides):
    """Loads a converted model folder -> (InfinityConfig, nnx.State).

    Args:
      model_dir: output of `varejax convert infinity` (or an erased model written by `varejax erase`).
      mesh: when given, parameters are restored straight onto the mesh, sharded by `rules`.
      **overrides: numerics to change (compute_dtype, param_dtype, ca_bf16_rounding, ...); architecture
        fields must match the folder's. LoRA fields are numerics too: `lora_rank=4` on a folder without
        adapters adds them (A from `lora_seed`, B = 0: the same model); adapters the folder holds are
        loaded when the requested config has them and merged into their kernels when it does not
        (`varejax.models.lora.retarget`).
    """
    from varejax.checkpoint import ModelDirError, apply_numerics, read_config, restore_state
    from varejax.models import apply
    from varejax.models.config import LORA_FIELDS

    meta = read_config(model_dir)
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{model_dir}: config.json format is {meta.get('format')!r}, expected {FORMAT!r}")
    stored = InfinityConfig.from_dict(meta["model"])
    cfg = apply_numerics(stored, overrides, model_dir)
    # What the folder holds: the requested numerics with the folder's own adapters (if any).
    src = cfg.replace(**{k: getattr(stored, k) for k in LORA_FIELDS})
    state = restore_state(model_dir, apply.abstract_params(src), mesh, rules)
    from varejax.models import lora
    if not lora.same_adapters(src, cfg):
        state = lora.retarget(src, state, cfg, mesh=mesh, rules=rules)
    return cfg, state
