"""Exports of an erased model: a varejax model folder, and portable deltas in upstream's layout.

`delta.safetensors` holds, for every trained tensor, `finetuned - original` under the **upstream
state_dict key** and in **torch layout** (Linear weights [out, in]), so it can be added to the official
PyTorch checkpoint (`sd[k] += delta[k]`) as well as to ours (`apply_delta`). Deltas are float32 whatever
the parameter dtype (bf16 parameters give exact deltas: a difference of two bf16 values fits float32).

LoRA (trainable mode "lora"): the factors are not upstream tensors, so the exports hold MERGED weights.
The delta of a target kernel is scale * A @ B (minus the same for the original's factors, which is 0
for fresh adapters), float32, transposed to torch layout; the erased model folder holds the kernels
merged with exactly `apply_delta`'s arithmetic (`varejax.models.lora.merge`) and no factors, so it is a
plain model and "original folder + delta.safetensors" reproduces it bit for bit. `write_erased_model(...,
merge_lora=False)` keeps the factors instead (`load_infinity` then loads them, or merges them when asked
for a config without adapters).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath

from varejax.convert.infinity_keys import upstream_key
from varejax.erase import optim
from varejax.models import apply, lora
from varejax.paths import as_path, load_safetensors, save_safetensors

DELTA_FORMAT = "varejax-delta/1"


_host = lora.host_array


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def write_erased_model(out: str | os.PathLike, cfg: Any, params: Any, config: Any = None,
                       merge_lora: bool = True) -> epath.Path:
    """Writes the full erased transformer as a model folder (readable by `load_infinity`).

    A model with LoRA adapters is written merged (a plain model) unless `merge_lora` is False.
    """
    from varejax.checkpoint import save_model

    if cfg.lora_rank and merge_lora:
        cfg, params = lora.merge(cfg, params)
    flat = {path: _host(v) for path, v in apply.flat_params(params).items()}  # collective: every process
    if not _is_writer():
        return as_path(out)
    source = {"erased_from": str(getattr(getattr(config, "model", None), "infinity", "") or ""),
              "config": json.loads(config.to_json()) if config is not None else None}
    # Saved for sampling: the training-only switches (condition dropout, drop path, remat) off.
    served = cfg.replace(cond_drop_rate=0.0, drop_path_rate=0.0, remat=False)
    return save_model(out, "infinity", served, flat, source=source, overwrite=True)


def delta_tensors(cfg: Any, params: Any, original: Any, trainable: str = "ca_ffn") -> dict[str, np.ndarray]:
    """{upstream key: finetuned - original} of the trainable tensors, torch layout, float32.

    For trainable = "lora": {upstream kernel key: scale * (A B - A0 B0)} of every adapted kernel.
    """
    if trainable == "lora":
        return _lora_deltas(cfg, params, original)
    tuned = optim.trainable_params(params, trainable)
    base = optim.trainable_params(original, trainable)
    out = {}
    for path, value in tuned.items():
        key, transpose = upstream_key(path, cfg)
        delta = _host(value).astype(np.float32) - _host(base[path]).astype(np.float32)
        out[key] = np.ascontiguousarray(delta.T if transpose else delta)
    return out


def _lora_deltas(cfg: Any, params: Any, original: Any) -> dict[str, np.ndarray]:
    tuned = lora.merged_deltas(cfg, params)
    if not tuned:
        raise ValueError("trainable mode 'lora' but the model has no LoRA factors")
    base = lora.merged_deltas(cfg, original) if original is not None else {}
    out = {}
    for path, delta in tuned.items():
        if path in base:
            delta = delta - base[path]  # exact (and a no-op) for fresh adapters, whose B is 0
        key, transpose = upstream_key(path, cfg)
        out[key] = np.ascontiguousarray(delta.T if transpose else delta)
    return out


def write_delta(path: str | os.PathLike, cfg: Any, params: Any, original: Any, trainable: str = "ca_ffn") -> epath.Path:
    """Writes `delta_tensors` as safetensors (atomically) with format metadata."""
    path = as_path(path)
    tensors = delta_tensors(cfg, params, original, trainable)
    if not _is_writer():
        return path
    metadata = {"format": DELTA_FORMAT, "trainable": trainable, "model": json.dumps(cfg.arch_dict())}
    if trainable == "lora":
        metadata["lora"] = json.dumps({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank,
                                       "targets": list(cfg.lora_modules()), "merged": True})
    return save_safetensors(path, tensors, metadata)


def apply_delta(cfg: Any, params: Any, delta_file: str | os.PathLike) -> Any:
    """`params` + the deltas of a `delta.safetensors` (checked against the model's key table)."""
    import jax.numpy as jnp

    deltas = load_safetensors(delta_file)
    flat = apply.flat_params(params)
    by_key = {}
    for p in flat:
        key, transpose = upstream_key(p, cfg)
        by_key[key] = (p, transpose)
    unknown = sorted(set(deltas) - set(by_key))
    if unknown:
        raise KeyError(f"{delta_file}: tensors not in this model: {unknown[:5]}")
    updated = {}
    for key, delta in deltas.items():
        p, transpose = by_key[key]
        delta = delta.T if transpose else delta
        if delta.shape != tuple(flat[p].shape):
            raise ValueError(f"{delta_file}: {key} has shape {delta.shape}, the model {tuple(flat[p].shape)}")
        updated[p] = (jnp.asarray(flat[p], jnp.float32) + delta).astype(flat[p].dtype)
    return optim.merge_trainable(params, updated)
