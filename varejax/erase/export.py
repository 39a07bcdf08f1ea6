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
for a config without adapters). `lora.safetensors` (`write_lora_factors`) holds the factors themselves.

Exactness: "original + delta" (`apply_delta`, `varejax merge`) is the fine-tuned model bit for bit when
every float32 difference is exact: always for LoRA and bf16 parameters; for float32 parameters, for every
element that stayed within a factor 2 of its original value (Sterbenz). Elements that moved further (small
weights pushed near or across zero; more of them the larger the learning rate) can come back one float32
rounding of their delta away. `write_delta` counts the elements that do not come back exactly (metadata
"exact", "inexact_elements"); a float32 delta cannot be exact for them, whatever its value. So `export_run`
writes model/ as original + delta (rounded as `apply_delta` rounds): the folder that `varejax merge`
rebuilds from the base and delta.safetensors, bit for bit, for every dtype; it is the trained model up to
those roundings.

Metadata (str -> str, `read_metadata`), written by `export_run`:
  format                "varejax-delta/1" (`LORA_FORMAT` for lora.safetensors)
  base_params_sha256    `params_sha256` of the parameters the run trained from (what `varejax merge` checks)
  param_dtype           the dtype the run trained in (the base is loaded in it before hashing and merging)
  trainable, model      the trainable set; the architecture (JSON)
  method                JSON: erase_loss, mode, trainable, alpha, lr, steps, batch, seed, pairs, ...
  config                the whole erase config (JSON)
  varejax               the version that wrote it
  exact, inexact_elements  whether base + delta gives the trained tensors bit for bit, and where not
  lora (LoRA runs)      JSON: rank, alpha, scale, targets
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from varejax.convert.infinity_keys import upstream_key
from varejax.erase import optim
from varejax.models import apply, lora
from varejax.models.config import is_lora_path
from varejax.paths import as_path, load_safetensors, save_safetensors

DELTA_FORMAT = "varejax-delta/1"
LORA_FORMAT = "varejax-lora/1"
PARAMS_HASH = "varejax-params-sha256/1"  # the definition `params_sha256` implements; bump if it changes


_host = lora.host_array


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def params_sha256(params: Any) -> str:
    """A content hash of a transformer's parameters: what identifies the base a delta was made on.

    sha256 over the leaves sorted by path ("a/b/kernel"), each as its path, its shape and its values as
    little-endian float32 bytes (exact for bf16 and float16: a folder stored in bf16 hashes the same loaded
    in bf16 or float32), prefixed by `PARAMS_HASH`. LoRA factor leaves are left out: a run's fresh adapters
    are not part of its base. Computable from a model folder (`load_infinity`) and from the parameters a
    trainer holds; on several processes it gathers every leaf (collective: every process must call it).
    """
    import jax.numpy as jnp

    flat = params if _is_flat(params) else apply.flat_params(params)
    digest = hashlib.sha256(PARAMS_HASH.encode())
    for path in sorted(flat, key=lambda p: "/".join(map(str, p))):
        if is_lora_path(tuple(map(str, path))):
            continue
        value = _host(flat[path])
        if jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype("<f4")
        header = f"{'/'.join(map(str, path))}|{tuple(value.shape)}|{value.dtype.str}\n"
        digest.update(header.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _is_flat(params: Any) -> bool:
    """A flat {path tuple: array} dict (not an nnx.State, which is a mapping too)."""
    from flax import nnx

    return isinstance(params, Mapping) and not isinstance(params, nnx.State)


def run_metadata(config: Any, cfg: Any, base_sha256: str) -> dict[str, str]:
    """The metadata an erase run puts into its delta.safetensors and lora.safetensors (see module doc)."""
    import varejax

    t = config.train
    method = {"erase_loss": t.get("erase_loss"), "mode": t.get("mode"), "trainable": t.get("trainable"),
              "alpha": t.get("alpha"), "reg_lambda": t.get("reg_lambda"), "learning_rate": t.get("learning_rate"),
              "steps": t.get("steps"), "batch_size": t.get("batch_size"), "bf16_params": t.get("bf16_params"),
              "seed": config.get("seed"), "pairs": list(config.get("pairs", ()))}
    if method["mode"] == "summed":
        method["summed_lambda"] = t.get("summed_lambda")
    if method["erase_loss"] == "esd":
        method["esd_eta"] = t.get("esd_eta")
    if method["trainable"] == "lora":
        targets = t.get("lora_targets") or ()
        method.update(lora_rank=t.get("lora_rank"), lora_alpha=t.get("lora_alpha"),
                      lora_targets=targets if isinstance(targets, str) else list(targets))
    return {"base_params_sha256": base_sha256, "param_dtype": str(cfg.param_dtype),
            "method": json.dumps(method, default=str), "config": config.to_json(),
            "varejax": varejax.__version__}


def export_run(workdir: str | os.PathLike, cfg: Any, params: Any, original: Any, config: Any,
               trainable: str, base_sha256: str | None = None) -> None:
    """Every export of a finished erase run: model/, delta.safetensors, and lora.safetensors for LoRA runs.

    Every process takes part (gathering sharded arrays is collective); process 0 writes.

    Args:
      original: the parameters the run trained from (for LoRA: the base with the initial factors).
      base_sha256: `params_sha256(original)` when the caller knows it already (a sweep hashes its
        shared base once); computed here otherwise.
    """
    workdir = as_path(workdir)
    if base_sha256 is None:
        base_sha256 = params_sha256(original)
    metadata = run_metadata(config, cfg, base_sha256)
    served = params
    if trainable != "lora":
        # model/ is written as base + delta, rounded once as `apply_delta` and `varejax merge` round, so the
        # base folder plus delta.safetensors gives model/ bit for bit for every dtype. For float32 parameters
        # it differs from the trained tensors by one rounding where their float32 difference is not exact
        # (metadata "inexact_elements"; LoRA exports are built this way already).
        from varejax.parallel.distributed import to_local

        served = add_deltas(cfg, to_local(original), delta_tensors(cfg, params, original, trainable))
    write_erased_model(workdir / "model", cfg, served, config, base_sha256=base_sha256)
    write_delta(workdir / "delta.safetensors", cfg, params, original, trainable, metadata)
    if trainable == "lora":
        write_lora_factors(workdir / "lora.safetensors", cfg, params, original, metadata)


def write_erased_model(out: str | os.PathLike, cfg: Any, params: Any, config: Any = None,
                       merge_lora: bool = True, base_sha256: str | None = None) -> epath.Path:
    """Writes the full erased transformer as a model folder (readable by `load_infinity`).

    A model with LoRA adapters is written merged (a plain model) unless `merge_lora` is False;
    `base_sha256` (the base's `params_sha256`) goes into config.json "source".
    """
    from varejax.checkpoint import save_model

    if cfg.lora_rank and merge_lora:
        cfg, params = lora.merge(cfg, params)
    flat = {path: _host(v) for path, v in apply.flat_params(params).items()}  # collective: every process
    if not _is_writer():
        return as_path(out)
    source = {"erased_from": str(getattr(getattr(config, "model", None), "infinity", "") or ""),
              "config": json.loads(config.to_json()) if config is not None else None}
    if base_sha256:
        source["base_params_sha256"] = base_sha256
    # Saved for sampling: the training-only switches (condition dropout, drop path, remat) off.
    served = cfg.replace(cond_drop_rate=0.0, drop_path_rate=0.0, remat=False)
    return save_model(out, "infinity", served, flat, source=source, overwrite=True)


def delta_tensors(cfg: Any, params: Any, original: Any, trainable: str = "ca_ffn") -> dict[str, np.ndarray]:
    """{upstream key: finetuned - original} of the trainable tensors, torch layout, float32.

    For trainable = "lora": {upstream kernel key: scale * (A B - A0 B0)} of every adapted kernel.
    """
    return _deltas_and_misses(cfg, params, original, trainable)[0]


def _deltas_and_misses(cfg: Any, params: Any, original: Any, trainable: str) -> tuple[dict[str, np.ndarray], int]:
    """(`delta_tensors`, how many elements original + delta does not give back bit for bit)."""
    if trainable == "lora":  # the merged model is built with apply_delta's arithmetic: exact by construction
        return _lora_deltas(cfg, params, original), 0
    tuned = optim.trainable_params(params, trainable)
    base = optim.trainable_params(original, trainable)
    out, misses = {}, 0
    for path, value in tuned.items():
        key, transpose = upstream_key(path, cfg)
        value, before = _host(value), _host(base[path]).astype(np.float32)
        delta = value.astype(np.float32) - before
        rebuilt = (before + delta).astype(value.dtype)  # apply_delta's arithmetic
        misses += _differing_elements(rebuilt, value)
        out[key] = np.ascontiguousarray(delta.T if transpose else delta)
    return out, misses


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


def _differing_elements(a: np.ndarray, b: np.ndarray) -> int:
    """How many elements of two arrays of one dtype differ bit for bit (so -0.0 != 0.0, NaN == same NaN)."""
    bits = f"u{a.dtype.itemsize}"
    return int(np.count_nonzero(np.ascontiguousarray(a).view(bits) != np.ascontiguousarray(b).view(bits)))


def write_delta(path: str | os.PathLike, cfg: Any, params: Any, original: Any, trainable: str = "ca_ffn",
                metadata: Mapping[str, str] | None = None) -> epath.Path:
    """Writes `delta_tensors` as safetensors (atomically) with format metadata plus `metadata`
    (`run_metadata`: base hash, method, config)."""
    path = as_path(path)
    tensors, misses = _deltas_and_misses(cfg, params, original, trainable)
    if not _is_writer():
        return path
    meta = {**(metadata or {}), "format": DELTA_FORMAT, "trainable": trainable,
            "model": json.dumps(cfg.arch_dict()), "exact": str(misses == 0).lower(), "inexact_elements": str(misses)}
    if trainable == "lora":
        meta["lora"] = json.dumps(_lora_info(cfg) | {"merged": True})
    return save_safetensors(path, tensors, meta)


def _lora_info(cfg: Any) -> dict[str, Any]:
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank, "scale": repr(float(cfg.lora_scale)),
            "targets": list(cfg.lora_modules())}


def lora_factor_keys(kernel_key: str) -> tuple[str, str]:
    """The lora.safetensors names of a target's factors, from its kernel's upstream key ("...mat_qkv.weight"):
    ("...mat_qkv.lora_A.weight" [rank, in], "...mat_qkv.lora_B.weight" [out, rank]), PEFT's names and layout."""
    module = kernel_key.removesuffix(".weight")
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def write_lora_factors(path: str | os.PathLike, cfg: Any, params: Any, original: Any,
                       metadata: Mapping[str, str] | None = None) -> epath.Path | None:
    """Writes the trained LoRA factors as safetensors: per target `lora_factor_keys` (torch layout, float32).

    The delta of a target is scale * B @ A in this layout (= (scale * A @ B).T in ours), with scale, rank,
    alpha and targets in the metadata "lora"; `varejax.erase.merge.factor_deltas` forms it with
    `lora.factor_delta`'s arithmetic, so it equals delta.safetensors bit for bit. That holds when the run
    started from fresh adapters (B = 0, as `varejax erase` does); when the original factors are not fresh
    nothing is written (returns None) and delta.safetensors alone describes the run.
    """
    flat, before = apply.flat_params(params), apply.flat_params(original)
    layers = lora.lora_layers(flat)
    if not layers:
        raise ValueError("trainable mode 'lora' but the model has no LoRA factors")
    fresh = all(not np.any(_host(before[layer + ("lora_b",)])) for layer in layers)
    tensors = {}
    for layer in layers:
        key, transpose = upstream_key(layer + ("kernel",), cfg)
        assert transpose, key  # every LoRA target is a Linear kernel
        a_key, b_key = lora_factor_keys(key)
        tensors[a_key] = np.ascontiguousarray(_host(flat[layer + ("lora_a",)]).astype(np.float32).T)
        tensors[b_key] = np.ascontiguousarray(_host(flat[layer + ("lora_b",)]).astype(np.float32).T)
    if not _is_writer() or not fresh:
        return None
    meta = {**(metadata or {}), "format": LORA_FORMAT, "trainable": "lora", "model": json.dumps(cfg.arch_dict()),
            "lora": json.dumps(_lora_info(cfg))}
    return save_safetensors(path, tensors, meta)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The str -> str metadata of a .safetensors file (empty when it has none), without reading its tensors."""
    with as_path(path).open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return dict(header.get("__metadata__") or {})


def apply_delta(cfg: Any, params: Any, delta_file: str | os.PathLike) -> Any:
    """`params` + the deltas of a `delta.safetensors` (checked against the model's key table)."""
    return add_deltas(cfg, params, load_safetensors(delta_file), str(delta_file))


def add_deltas(cfg: Any, params: Any, deltas: Mapping[str, np.ndarray], name: str = "deltas") -> Any:
    """`params` + {upstream key: delta (torch layout, float32)}: float32(param) + delta, rounded once to the
    parameter's dtype (the arithmetic of `lora.merge`). Raises KeyError / ValueError naming a key that is
    not in the model or has another shape."""
    import jax.numpy as jnp

    flat = apply.flat_params(params)
    by_key = {}
    for p in flat:
        key, transpose = upstream_key(p, cfg)
        by_key[key] = (p, transpose)
    unknown = sorted(set(deltas) - set(by_key))
    if unknown:
        raise KeyError(f"{name}: tensors not in this model: {unknown[:5]}")
    updated = {}
    for key, delta in deltas.items():
        p, transpose = by_key[key]
        delta = delta.T if transpose else delta
        if delta.shape != tuple(flat[p].shape):
            raise ValueError(f"{name}: {key} has shape {delta.shape}, the model {tuple(flat[p].shape)}")
        updated[p] = (jnp.asarray(flat[p], jnp.float32) + delta).astype(flat[p].dtype)
    return optim.merge_trainable(params, updated)
