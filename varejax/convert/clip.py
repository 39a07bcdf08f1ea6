"""Convert a local HF CLIP folder (e.g. openai/clip-vit-base-patch32) into a varejax CLIP folder, and load one.

    varejax convert clip --src /data/clip-vit-base-patch32 --out models/clip_vit_b_32
    varejax convert clip --src /data/clip-vit-base-patch32 --dry-run

`--src` is an HF `CLIPModel` folder: `config.json` and `model.safetensors` or `pytorch_model.bin` (or shards
with an index). Every tensor of the file is mapped to exactly one parameter (or is a `position_ids` buffer,
checked equal to 0..n-1 and dropped); a missing, unexpected or mis-shaped tensor stops the conversion with
a list of them. The output holds the parameters (orbax), `config.json` (format "varejax-clip/1", the model
config, the sha256 of every source file) and copies of the tokenizer files the source has (`tokenizer.json`,
`vocab.json` + `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`).

Key table (HF key -> our parameter path; torch Linear weights are transposed, the patch conv goes to HWIO):

  text_model.embeddings.{token,position}_embedding.weight   -> text.{token,position}_embedding
  {text,vision}_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
                                                            -> {text,vision}.layers.{i}.attn.{q,k,v,o}.{kernel,bias}
  ....layers.{i}.layer_norm{1,2}.{weight,bias}              -> ....layers.{i}.norm{1,2}.{scale,bias}
  ....layers.{i}.mlp.fc{1,2}.{weight,bias}                  -> ....layers.{i}.fc{1,2}.{kernel,bias}
  text_model.final_layer_norm                               -> text.final_norm
  vision_model.embeddings.class_embedding                   -> vision.class_embedding
  vision_model.embeddings.patch_embedding.weight            -> vision.patch_embedding ([p, p, 3, width])
  vision_model.embeddings.position_embedding.weight         -> vision.position_embedding
  vision_model.pre_layrnorm (sic), vision_model.post_layernorm -> vision.pre_norm, vision.post_norm
  text_projection.weight, visual_projection.weight          -> text_projection.kernel, visual_projection.kernel
  logit_scale                                               -> logit_scale
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from varejax import checkpoint
from varejax.convert import strict
from varejax.convert.common import ConversionReport, finish, open_hf_folder, plan_report, read_hf_json
from varejax.convert.sources import CheckpointError, CheckpointSource, sha256_file
from varejax.convert.strict import BufferRule, KeyRule, conv_to_hwio, transpose_2d
from varejax.models import clip

FORMAT = checkpoint.FORMATS["clip"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


# ---- key table --------------------------------------------------------------------------------------

def _linear(key: str, path: tuple[str, ...], n_in: int, n_out: int, bias: bool = True) -> list[KeyRule]:
    rules = [KeyRule(f"{key}.weight", path + ("kernel",), (n_out, n_in), transpose_2d)]
    if bias:
        rules.append(KeyRule(f"{key}.bias", path + ("bias",), (n_out,)))
    return rules


def _norm(key: str, path: tuple[str, ...], width: int) -> list[KeyRule]:
    return [KeyRule(f"{key}.weight", path + ("scale",), (width,)), KeyRule(f"{key}.bias", path + ("bias",), (width,))]


def _layers(prefix: str, tower: str, n: int, width: int, mlp: int) -> list[KeyRule]:
    rules = []
    for i in range(n):
        key, path = f"{prefix}.encoder.layers.{i}", (tower, "layers", str(i))
        for hf_name, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            rules += _linear(f"{key}.self_attn.{hf_name}", path + ("attn", name), width, width)
        rules += _norm(f"{key}.layer_norm1", path + ("norm1",), width)
        rules += _linear(f"{key}.mlp.fc1", path + ("fc1",), width, mlp)
        rules += _linear(f"{key}.mlp.fc2", path + ("fc2",), mlp, width)
        rules += _norm(f"{key}.layer_norm2", path + ("norm2",), width)
    return rules


def _arange_check(n: int):
    def check(value: np.ndarray) -> str | None:
        if np.array_equal(np.asarray(value).reshape(-1), np.arange(n)):
            return None
        return f"expected the positions 0..{n - 1} (a fixed buffer)"
    return check


def clip_rules(cfg: clip.CLIPConfig) -> tuple[list[KeyRule], list[BufferRule]]:
    """Key rules and buffer rules of the HF `CLIPModel` described by `cfg` (checked to cover our model)."""
    t, v, p = cfg.text_width, cfg.vision_width, cfg.patch_size
    rules = [
        KeyRule("text_model.embeddings.token_embedding.weight", ("text", "token_embedding"), (cfg.vocab_size, t)),
        KeyRule("text_model.embeddings.position_embedding.weight", ("text", "position_embedding"),
                (cfg.max_position_embeddings, t)),
        *_layers("text_model", "text", cfg.text_layers, t, cfg.text_mlp),
        *_norm("text_model.final_layer_norm", ("text", "final_norm"), t),
        KeyRule("vision_model.embeddings.class_embedding", ("vision", "class_embedding"), (v,)),
        KeyRule("vision_model.embeddings.patch_embedding.weight", ("vision", "patch_embedding"), (v, 3, p, p),
                conv_to_hwio),
        KeyRule("vision_model.embeddings.position_embedding.weight", ("vision", "position_embedding"),
                (cfg.num_patches + 1, v)),
        *_norm("vision_model.pre_layrnorm", ("vision", "pre_norm"), v),
        *_layers("vision_model", "vision", cfg.vision_layers, v, cfg.vision_mlp),
        *_norm("vision_model.post_layernorm", ("vision", "post_norm"), v),
        *_linear("text_projection", ("text_projection",), t, cfg.projection_dim, bias=False),
        *_linear("visual_projection", ("visual_projection",), v, cfg.projection_dim, bias=False),
        KeyRule("logit_scale", ("logit_scale",), ()),
    ]
    _check_covers_model(cfg, rules)
    # Older HF files saved the position ids as persistent buffers; newer ones do not.
    buffers = [BufferRule("text_model.embeddings.position_ids", (1, cfg.max_position_embeddings),
                          _arange_check(cfg.max_position_embeddings), required=False),
               BufferRule("vision_model.embeddings.position_ids", (1, cfg.num_patches + 1),
                          _arange_check(cfg.num_patches + 1), required=False)]
    return rules, buffers


def _stored_shape(rule: KeyRule) -> tuple[int, ...]:
    if rule.transform is transpose_2d:
        return rule.shape[::-1]
    if rule.transform is conv_to_hwio:
        o, i, kh, kw = rule.shape
        return (kh, kw, i, o)
    return rule.shape


def _check_covers_model(cfg: clip.CLIPConfig, rules: list[KeyRule]) -> None:
    from varejax.models.state import flat_params

    model = {k: tuple(v.shape) for k, v in flat_params(clip.abstract_params(cfg)).items()}
    table = {r.path: _stored_shape(r) for r in rules}
    if model != table:  # a bug in this table, not in the user's file
        raise AssertionError(f"CLIP key table and model differ: only in model {sorted(set(model) - set(table))[:5]}, "
                             f"only in table {sorted(set(table) - set(model))[:5]}")


# ---- the HF folder ----------------------------------------------------------------------------------

def read_hf_config(folder: Path, **overrides: Any) -> tuple[clip.CLIPConfig, dict[str, Any]]:
    """(CLIPConfig, the raw dict) of `folder/config.json`; CheckpointError naming the file when it does not fit."""
    path, hf = read_hf_json(folder, "CLIP", "openai/clip-vit-base-patch32")
    try:
        return clip.CLIPConfig.from_hf_config(hf, **overrides), hf
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _explain(p: strict.Plan, source: str, cfg: clip.CLIPConfig) -> str:
    lines = [f"{source} does not match the CLIP model its config.json describes (text {cfg.text_layers} layers x "
             f"{cfg.text_width}, vision {cfg.vision_layers} layers x {cfg.vision_width}, patch {cfg.patch_size}, "
             f"projection {cfg.projection_dim}): {len(p.missing)} missing, {len(p.unexpected)} unexpected, "
             f"{len(p.mismatched)} mis-shaped tensors."]
    prefix = strict.common_prefix(p.unexpected)
    if prefix and len(p.unexpected) >= len(p.rules):
        lines.append(f"Likely cause: every key starts with {prefix!r} (a wrapper); save the inner model instead.")
    elif p.missing and not p.unexpected and not p.mismatched:
        lines.append(strict.TRUNCATED)
    elif p.mismatched and not p.missing and not p.unexpected:
        lines.append("Likely cause: config.json and the weights are of different CLIP sizes (config.json from "
                     "another model?).")
    elif p.missing or p.unexpected:
        lines.append("Likely cause: config.json does not belong to these weights (layer counts differ), or the "
                     "weights are not an HF CLIPModel checkpoint (a CLIPTextModel / open_clip file?).")
    return "\n".join(lines + strict.problem_lines(p))


def plan_clip(source: CheckpointSource, cfg: clip.CLIPConfig) -> strict.Plan:
    """Checks every key and shape of `source` against `cfg`; ConversionError listing every problem."""
    p = strict.plan(source.shapes(), *clip_rules(cfg))
    if not p.ok:
        raise strict.ConversionError(_explain(p, source.path, cfg))
    return p


def convert_clip(src: str, out: str | None, *, dry_run: bool = False, param_dtype: str = "float32",
                 overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Converts (or with `dry_run`, only checks) a local HF CLIP folder.

    Raises:
      CheckpointError (ConversionError): unreadable files, an unsupported config, or keys/shapes that do not
        match the config.
    """
    start = time.time()
    folder, source = open_hf_folder(src, "CLIP")
    cfg, hf = read_hf_config(folder, param_dtype=param_dtype)
    p = plan_clip(source, cfg)
    tokenizer_files = {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
    notes = []
    if p.dropped:
        notes.append(f"{len(p.dropped)} position_ids buffers checked and dropped")
    if not ("tokenizer.json" in tokenizer_files or {"vocab.json", "merges.txt"} <= set(tokenizer_files)):
        notes.append("no tokenizer.json or vocab.json + merges.txt in the source folder: copy them into the output "
                     "before encoding text")
    target = (f"CLIP text {cfg.text_layers}x{cfg.text_width}, vision {cfg.vision_layers}x{cfg.vision_width} "
              f"patch {cfg.patch_size} at {cfg.image_size}px, projection {cfg.projection_dim}")
    report = plan_report(src, source, p, target, notes=tuple(notes))
    config_sha = {name: sha256_file(path) for name, path in {"config.json": folder / "config.json",
                                                             **tokenizer_files}.items()}
    return finish("clip", cfg, source, p, report, out=out, dry_run=dry_run, param_dtype=param_dtype,
                  overwrite=overwrite, progress=progress, start=start,
                  source_meta={"hf_config": hf, "sha256": config_sha},
                  extra={"tokenizer_files": sorted(tokenizer_files)}, files=dict(tokenizer_files))


# ---- loading a converted folder ---------------------------------------------------------------------

def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a converted CLIP folder; ModelDirError when the folder holds something else."""
    return checkpoint.read_meta(model_dir, "clip")


def load_clip(model_dir: str | os.PathLike, **overrides: Any) -> tuple[clip.CLIPConfig, Any]:
    """Loads a CLIP folder (`varejax convert clip`) -> (CLIPConfig, nnx.State).

    Args:
      **overrides: numerics to change (compute_dtype, matmul_precision, ...); architecture fields must match.
    """
    meta = read_meta(model_dir)
    cfg = checkpoint.apply_numerics(clip.CLIPConfig.from_dict(meta["model"]), overrides, model_dir)
    return cfg, checkpoint.restore_state(model_dir, clip.abstract_params(cfg))


def model_fingerprint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What identifies a CLIP folder's numbers: sha256 of its config.json and of the source weights it records."""
    meta = read_meta(model_dir)
    config_sha = sha256_file(Path(model_dir) / checkpoint.CONFIG_FILE)
    sources = meta.get("source", {}).get("sha256", {})
    weights = {k: v for k, v in sources.items() if k.endswith((".safetensors", ".bin", ".json"))
               and k not in TOKENIZER_FILES and k != "config.json"}
    return {"model_dir": str(model_dir), "config_sha256": config_sha, "source_weights_sha256": weights}
