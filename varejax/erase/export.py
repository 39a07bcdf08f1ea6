"""Exports of an erased model: a varejax model folder, and portable deltas in upstream's layout.

`delta.safetensors` holds, for every trained tensor, `finetuned - original` under the **upstream
state_dict key** and in **torch layout** (Linear weights [out, in]), so it can be added to the official
PyTorch checkpoint (`sd[k] += delta[k]`) as well as to ours (`apply_delta`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from varejax.convert.infinity import FORMAT
from varejax.convert.infinity_keys import upstream_key
from varejax.erase import optim
from varejax.models import apply

DELTA_FORMAT = "varejax-delta/1"


def _host(x: Any) -> np.ndarray:
    """The full array on this host (a collective gather when it is sharded across processes)."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def write_erased_model(out: str | os.PathLike, cfg: Any, params: Any, config: Any = None) -> Path:
    """Writes the full erased transformer as a model folder (readable by `load_infinity`)."""
    from varejax.checkpoint import write_model_dir

    flat = {path: _host(v) for path, v in apply.flat_params(params).items()}
    if not _is_writer():
        return Path(out)
    meta = {"format": FORMAT, "model": cfg.replace(cond_drop_rate=0.0, drop_path_rate=0.0, remat=False).to_dict(),
            "source": {"erased_from": str(getattr(getattr(config, "model", None), "infinity", "") or ""),
                       "config": json.loads(config.to_json()) if config is not None else None}}
    return write_model_dir(out, flat, meta, overwrite=True)


def delta_tensors(cfg: Any, params: Any, original: Any, trainable: str = "ca_ffn") -> dict[str, np.ndarray]:
    """{upstream key: finetuned - original} of the trainable tensors, torch layout, float32."""
    tuned = optim.trainable_params(params, trainable)
    base = optim.trainable_params(original, trainable)
    out = {}
    for path, value in tuned.items():
        key, transpose = upstream_key(path, cfg)
        delta = _host(value).astype(np.float32) - _host(base[path]).astype(np.float32)
        out[key] = np.ascontiguousarray(delta.T if transpose else delta)
    return out


def write_delta(path: str | os.PathLike, cfg: Any, params: Any, original: Any, trainable: str = "ca_ffn") -> Path:
    """Writes `delta_tensors` as safetensors (atomically) with format metadata."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = delta_tensors(cfg, params, original, trainable)
    if not _is_writer():
        return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": DELTA_FORMAT, "trainable": trainable,
                                            "model": json.dumps(cfg.arch_dict())})
    os.replace(tmp, path)
    return path


def apply_delta(cfg: Any, params: Any, delta_file: str | os.PathLike) -> Any:
    """`params` + the deltas of a `delta.safetensors` (checked against the model's key table)."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    deltas = load_file(str(delta_file))
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
