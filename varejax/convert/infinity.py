"""Convert an upstream Infinity transformer checkpoint into a varejax model folder.

    varejax convert infinity --src infinity_2b_reg.pth --arch 2b --out models/infinity_2b
    varejax convert infinity --src infinity_8b_weights/ --arch 8b --out models/infinity_8b --dry-run

`--src` is a plain state_dict `.pth`, a training checkpoint (`{'trainer': {'gpt_fsdp': ...}}`), or an
HF-style sharded folder. `--arch` is a preset (2b, 8b) or a JSON config (ours, or an upstream fixture
config with `infinity_constructor_kwargs`). The output holds the parameters (orbax) and `config.json`
with the model config and the sha256 of every source file.
"""

from __future__ import annotations

import time

from varejax.convert import strict
from varejax.convert.arch import infinity_arch
from varejax.convert.common import ConversionReport, finish, plan_report
from varejax.convert.infinity_keys import infinity_rules
from varejax.convert.sources import CheckpointSource, open_checkpoint
from varejax.models.config import PRESETS, InfinityConfig

WRAPPERS = (("trainer", "gpt_fsdp"), ("gpt_fsdp",), ("state_dict",), ("model",))


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
    cfg = infinity_arch(arch, param_dtype=param_dtype)
    source = open_checkpoint(src, WRAPPERS)
    p = plan_infinity(source, cfg, arch)
    report = plan_report(src, source, p, f"--arch {arch}", details=(f"{len(p.dropped)} buffers checked and dropped",))
    # The folder holds no adapters; load_infinity can add them.
    return finish("infinity", cfg.without_lora(), source, p, report, out=out, dry_run=dry_run,
                  param_dtype=param_dtype, overwrite=overwrite, progress=progress, start=start,
                  source_meta={"dropped_buffers": len(p.dropped)})
