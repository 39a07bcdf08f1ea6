"""Convert an upstream BSQ-VAE tokenizer checkpoint into a varejax model folder.

    varejax convert vae --src infinity_vae_d32reg.pth --arch d32 --out models/vae_d32
    varejax convert vae --src infinity_vae_d56_f8_14_patchify.pth --arch d14 --out models/vae_d14 --dry-run

`--src` is upstream's `{'vae': state_dict}` file (also `{'ema': state_dict}` or a plain state_dict),
with keys in either naming upstream's `load_cnn` accepts (`X.conv.weight` / `X.norm.weight`, or plain
`X.weight`). `--arch` is a preset (d32 = Infinity-2B tokenizer, d14 = Infinity-8B, tiny) or a JSON
config (ours, or an upstream fixture config with `vae_config`). The output holds the parameters
(orbax) and `config.json` with the model config and the sha256 of the source file. Every key and
shape is checked before anything is read; the `lfq.mask` buffers are checked and dropped.
"""

from __future__ import annotations

import dataclasses
import time

from varejax.convert import strict
from varejax.convert.arch import vae_arch
from varejax.convert.common import ConversionReport, finish, plan_report
from varejax.convert.sources import CheckpointSource, open_checkpoint
from varejax.convert.vae_keys import normalise_key_names, vae_rules
from varejax.models.bsq_vae import VAE_PRESETS, VAEConfig

WRAPPERS = (("vae",), ("ema",), ("state_dict",))


def _plan_for(source: CheckpointSource, cfg: VAEConfig) -> tuple[strict.Plan, dict[str, str], list[str]]:
    rules, buffers = vae_rules(cfg)
    expected = {r.key for r in rules} | {b.key for b in buffers}
    mapping, problems = normalise_key_names(list(source.tensors), expected)
    shapes = {mapping[k]: ref.shape for k, ref in source.tensors.items()}
    return strict.plan(shapes, rules, buffers), mapping, problems


def _alternative_plans(source: CheckpointSource, cfg: VAEConfig) -> dict[str, strict.Plan]:
    """Plans of the other presets, to name the right --arch when the requested one fails."""
    out = {}
    for name, preset in VAE_PRESETS.items():
        if preset.arch_dict() == cfg.arch_dict():
            continue
        try:
            p, _, problems = _plan_for(source, preset)
        except Exception:  # a preset that cannot be built here is simply not suggested
            continue
        if not problems:
            out[name] = p
    return out


def plan_vae(source: CheckpointSource, cfg: VAEConfig, arch: str) -> tuple[strict.Plan, CheckpointSource]:
    """Checks every key and shape of `source` against `cfg`.

    Returns the plan and the source with its keys renamed to the module naming.

    Raises:
      ConversionError: listing every missing, unexpected, mis-shaped or duplicated tensor.
    """
    p, mapping, problems = _plan_for(source, cfg)
    if problems:
        raise strict.ConversionError(
            f"{source.path}: the same tensor appears under both upstream naming schemes (module `X.conv.weight` "
            f"and plain `X.weight`); keep one:\n" + "\n".join(problems[:12]))
    if not p.ok:
        strict.check(p, source.path, arch, _alternative_plans(source, cfg))
    renamed = {mapping[k]: dataclasses.replace(ref, key=mapping[k]) for k, ref in source.tensors.items()}
    return p, dataclasses.replace(source, tensors=renamed)


def convert_vae(src: str, arch: str, out: str | None, *, dry_run: bool = False, param_dtype: str = "float32",
                overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Converts (or with `dry_run`, only checks) an upstream tokenizer checkpoint.

    Raises:
      CheckpointError (ConversionError): unreadable file, or keys/shapes/buffers that do not match `arch`.
    """
    start = time.time()
    cfg = vae_arch(arch, param_dtype=param_dtype)
    source = open_checkpoint(src, WRAPPERS)
    p, source = plan_vae(source, cfg, arch)
    if dry_run:
        strict.check_buffers(source, p)  # two tiny int64 vectors: cheap, and a wrong one means a wrong file
    report = plan_report(src, source, p, f"--arch {arch}", details=(f"{len(p.dropped)} buffers checked and dropped",))
    return finish("vae", cfg, source, p, report, out=out, dry_run=dry_run, param_dtype=param_dtype,
                  overwrite=overwrite, progress=progress, start=start, source_meta={"dropped_buffers": len(p.dropped)})
