"""Convert pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) into a varejax model folder.

    varejax convert inception --src pt_inception-2015-12-05-6726825d.pth --out models/fid_inception
    varejax convert inception --src pt_inception-2015-12-05-6726825d.pth --dry-run

`--src` is the file pytorch-fid downloads (a plain state_dict of torchvision's Inception3 with the FID
blocks: 566 tensors, fc included), read WITHOUT torch by `varejax.convert.torch_legacy` (legacy or zip
`torch.save` format, restricted unpickler). The key table is derived from `varejax.models.inception`:
every expected tensor must be present with its shape, no tensor may be left over, and the 94
`num_batches_tracked` counters are checked present and dropped. The folder holds the float32 parameters
(orbax) and config.json with the source's sha256 (the model hash FID statistics are keyed by).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from varejax import checkpoint
from varejax.convert import strict
from varejax.convert.common import ConversionReport, finish, plan_report
from varejax.convert.sources import CheckpointSource, source_fingerprint
from varejax.convert.torch_legacy import open_torch_file
from varejax.models import inception
from varejax.models.state import fill_state, flat_params

FORMAT = checkpoint.FORMATS["fid_inception"]
EXPECTED_FILE = "pt_inception-2015-12-05-6726825d.pth"
_LEAF_TO_TORCH = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight", ("bn", "bias"): "bn.bias",
                  ("bn", "mean"): "bn.running_mean", ("bn", "var"): "bn.running_var",
                  ("fc", "kernel"): "weight", ("fc", "bias"): "bias"}


def _torch_key(path: tuple[str, ...]) -> str:
    return ".".join(path[:-2] + (_LEAF_TO_TORCH[path[-2:]],)) if path[0] != "fc" else "fc." + _LEAF_TO_TORCH[path]


def inception_rules(cfg: inception.InceptionConfig = inception.DEFAULT_CONFIG
                    ) -> tuple[list[strict.KeyRule], list[strict.BufferRule]]:
    """The strict key table of the FID Inception state_dict, derived from the module's parameters."""
    rules, buffers = [], []
    for path, var in flat_params(inception.abstract_params(cfg)).items():
        shape = tuple(var.shape)
        if path[-1] == "kernel" and len(shape) == 4:  # ours [kh, kw, in, out] <- torch [out, in, kh, kw]
            rules.append(strict.KeyRule(_torch_key(path), path, (shape[3], shape[2], shape[0], shape[1]),
                                        strict.conv_to_hwio))
        elif path[-1] == "kernel":  # fc: ours [in, out] <- torch [out, in]
            rules.append(strict.KeyRule(_torch_key(path), path, (shape[1], shape[0]), strict.transpose_2d))
        else:
            rules.append(strict.KeyRule(_torch_key(path), path, shape))
        if path[-2:] == ("bn", "scale"):
            buffers.append(strict.BufferRule(".".join(path[:-2]) + ".bn.num_batches_tracked", ()))
    return rules, buffers


def _explain(p: strict.Plan, source: str) -> str:
    lines = [f"{source} is not pytorch-fid's FID Inception state_dict: {len(p.missing)} missing, "
             f"{len(p.unexpected)} unexpected, {len(p.mismatched)} mis-shaped tensors."]
    prefix = strict.common_prefix(p.unexpected)
    if p.unexpected and all(k.startswith("blocks.") for k in p.unexpected):
        lines.append("Likely cause: the state_dict of pytorch_fid.inception.InceptionV3 (the wrapper, keys "
                     "blocks.N.M...); pass the original weights file pt_inception-2015-12-05-6726825d.pth instead.")
    elif any(k.startswith("AuxLogits.") for k in p.unexpected):
        lines.append("Likely cause: torchvision's ImageNet Inception-v3 (inception_v3_google), which FID does not "
                     "use; pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
    elif prefix:
        lines.append(f"Likely cause: every key starts with {prefix!r} (a wrapper); save the inner module's "
                     f"state_dict instead.")
    elif p.missing and not p.unexpected and not p.mismatched:
        lines.append(strict.TRUNCATED)
    return "\n".join(lines + strict.problem_lines(p))


def plan_inception(source: CheckpointSource, cfg: inception.InceptionConfig = inception.DEFAULT_CONFIG
                   ) -> strict.Plan:
    """Checks every key and shape of `source` (nothing is read); ConversionError listing every problem."""
    p = strict.plan(source.shapes(), *inception_rules(cfg))
    if not p.ok:
        raise strict.ConversionError(_explain(p, source.path))
    not_float = sorted(r.key for r in p.rules if not source.tensors[r.key].dtype.startswith(("float", "bfloat")))
    if not_float:
        found = source.tensors[not_float[0]].dtype
        raise strict.ConversionError(f"{source.path}: tensors {not_float[:5]} are {found}, expected floating-point "
                                     f"weights")
    return p


def _hash_note(src: str, sha256: str) -> tuple[str, ...]:
    """torch hub names its files `<name>-<first 8 hex digits of the sha256>.pth`: say when they disagree."""
    match = re.search(r"-([0-9a-f]{8,})\.pth$", os.path.basename(src))
    if match and not sha256.startswith(match.group(1)):
        return (f"the file name says sha256 {match.group(1)}..., the file's is {sha256[:8]}...: not the original "
                f"download (FID statistics made with it are not comparable with published ones)",)
    return ()


def convert_inception(src: str, out: str | None, *, dry_run: bool = False, param_dtype: str = "float32",
                      overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Converts (or with `dry_run`, only checks) pytorch-fid's Inception weights file, without torch.

    Raises:
      CheckpointError (ConversionError): unreadable file, unsafe pickle, or keys/shapes that do not match.
    """
    start = time.time()
    if param_dtype != "float32":
        raise strict.ConversionError(f"--param-dtype {param_dtype}: the FID Inception is stored in float32 only "
                                     f"(FID values depend on the numerics)")
    cfg = inception.InceptionConfig()
    source = open_torch_file(src)
    p = plan_inception(source, cfg)
    report = plan_report(src, source, p, "the FID Inception (pytorch-fid 0.3.0)",
                         details=(f"{len(p.dropped)} num_batches_tracked checked and dropped",))
    report.notes = _hash_note(src, next(iter(source_fingerprint(source).values())))
    fid = {"input_size": inception.INPUT_SIZE, "dims": inception.FEATURE_DIMS,
           "resize": "bilinear, align_corners=False, antialias=False (torch F.interpolate)",
           "normalisation": "2 * (uint8 / 255) - 1", "reference": "pytorch-fid 0.3.0 InceptionV3([3])"}
    return finish("fid_inception", cfg, source, p, report, out=out, dry_run=dry_run, param_dtype=param_dtype,
                  overwrite=overwrite, progress=progress, start=start, extra={"fid": fid})


def model_hash(meta: dict[str, Any]) -> str:
    """The sha256 of the weights file a converted folder came from (its config.json "source")."""
    return next(iter(meta["source"]["sha256"].values()))


def load_inception(model_dir: str | os.PathLike) -> tuple[inception.InceptionConfig, Any, dict[str, Any]]:
    """Loads a folder written by `varejax convert inception` -> (config, nnx.State, config.json dict).

    Raises ModelDirError naming the folder when it is missing, of another kind, or incomplete.
    """
    meta = checkpoint.read_meta(model_dir, "fid_inception")
    cfg = inception.InceptionConfig.from_dict(meta["model"])
    flat = checkpoint.restore_flat(model_dir)
    try:
        params = fill_state(inception.abstract_params(cfg), flat)
    except (KeyError, ValueError) as err:
        raise checkpoint.ModelDirError(f"{model_dir}: parameters do not match its config.json: {err}") from None
    return cfg, params, meta
