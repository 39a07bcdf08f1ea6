"""LoRA adapters on the Infinity blocks: the factor layout, merging, and moving a state between configs.

A Dense layer at `layer` (e.g. ('blocks', '3', 'sa', 'mat_qkv')) that `cfg.lora_modules()` names has
the leaves layer + ('kernel',) [in, out], layer + ('lora_a',) [in, r] and layer + ('lora_b',) [r, out],
and computes x W + b + (x A) B * s with s = cfg.lora_scale = alpha / r (`varejax.models.layers.Dense`).

Initialisation (`Infinity.__init__`, `retarget`): A = `lora_a_init(cfg.lora_seed, path)` (PEFT's
kaiming-uniform, U(+-1/sqrt(in))), B = 0, so a model with fresh adapters computes exactly what the base
model computes, and the gradient reaches B first (dL/dA = 0 while B = 0).

Merging (`merge`): delta = s * A @ B, formed on the host in float64 and rounded once to float32
(`factor_delta`), then kernel' = (float32(kernel) + delta) rounded to the parameter dtype. That is the
arithmetic of `varejax.erase.export.apply_delta`, so a merged model folder and "base model +
delta.safetensors" are the same parameters bit for bit.

`retarget(src_cfg, params, cfg)` turns the state of one config into that of another with the same
architecture: adapters that `cfg` keeps (same layer, same rank) are kept, adapters it drops are merged
into their kernels, new ones are initialised, and every leaf is cast to `cfg.param_dtype`.
`load_infinity` uses it to load a folder with or without adapters under any LoRA setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varejax.models import apply
from varejax.models.config import InfinityConfig, is_lora_path
from varejax.models.layers import lora_a_init

ParamPath = tuple[str, ...]


def host_array(x: Any) -> np.ndarray:
    """The full array on this host (a collective gather when it is sharded across processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def lora_layers(flat: Mapping[ParamPath, Any]) -> list[ParamPath]:
    """Paths of the layers (without the leaf name) that hold both LoRA factors, in `flat`'s order."""
    return [path[:-1] for path in flat if path[-1] == "lora_a" and path[:-1] + ("lora_b",) in flat]


def factor_delta(lora_a: Any, lora_b: Any, scale: float) -> np.ndarray:
    """scale * A @ B [in, out] as float32 (a float64 product on the host, rounded once)."""
    a = host_array(lora_a).astype(np.float64)
    b = host_array(lora_b).astype(np.float64)
    return (np.matmul(a, b) * float(scale)).astype(np.float32)


def add_delta(kernel: Any, delta: np.ndarray) -> jax.Array:
    """(float32(kernel) + delta) in the kernel's dtype, on the kernel's devices (apply_delta's arithmetic)."""
    if isinstance(kernel, jax.Array):
        delta = jax.device_put(delta, kernel.sharding)
    return (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)


def merged_deltas(cfg: InfinityConfig, params: Any) -> dict[ParamPath, np.ndarray]:
    """{kernel path: scale * A @ B} (float32, [in, out]) of every adapter in `params`."""
    flat = params if isinstance(params, Mapping) and not isinstance(params, nnx.State) else apply.flat_params(params)
    return {layer + ("kernel",): factor_delta(flat[layer + ("lora_a",)], flat[layer + ("lora_b",)], cfg.lora_scale)
            for layer in lora_layers(flat)}


def merge(cfg: InfinityConfig, params: Any) -> tuple[InfinityConfig, Any]:
    """(config without LoRA, parameters with every adapter merged into its kernel)."""
    flat = dict(apply.flat_params(params))
    for kernel, delta in merged_deltas(cfg, flat).items():
        flat[kernel] = add_delta(flat[kernel], delta)
    plain = cfg.without_lora()
    return plain, apply.state_from_flat(plain, {k: v for k, v in flat.items() if not is_lora_path(k)})


def initial_factor(cfg: InfinityConfig, path: ParamPath, shape: tuple[int, ...]) -> np.ndarray:
    """The initial value of a factor leaf: A from `lora_a_init`, B zeros (float32)."""
    if path[-1] == "lora_a":
        return lora_a_init(cfg.lora_seed, path, shape[0], shape[1])
    return np.zeros(shape, np.float32)


def reinitialise(cfg: InfinityConfig, params: Any) -> Any:
    """`params` with every factor back at its initial value (on the devices of the factor it replaces)."""
    out = []
    for path, var in nnx.to_flat_state(params):
        key = tuple(str(p) for p in path)
        if is_lora_path(key):
            old = var.get_value()
            value = initial_factor(cfg, key, tuple(old.shape)).astype(old.dtype)
            var = var.replace(jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(value))
        out.append((path, var))
    return nnx.from_flat_state(out)


def same_adapters(a: InfinityConfig, b: InfinityConfig) -> bool:
    """Whether two configs put the same factors (layers and rank) into the parameter tree."""
    return a.lora_modules() == b.lora_modules() and (a.lora_rank == b.lora_rank or not a.lora_modules())


def retarget(src_cfg: InfinityConfig, params: Any, cfg: InfinityConfig, *, mesh=None, rules=None) -> Any:
    """The parameters of `cfg` from `params` of `src_cfg` (same architecture; adapters and dtype may differ).

    Adapters of `src_cfg` that `cfg` has too (same layer and shapes) are kept as they are (`cfg`'s scale
    applies from then on); the others are merged into their kernels with `src_cfg`'s scale. Adapters only
    `cfg` has get their initial values (placed by `mesh`/`rules` when given). Every leaf is cast to the
    dtype of `cfg`.
    """
    if src_cfg.arch_dict() != cfg.arch_dict():
        raise ValueError(f"retarget keeps the architecture: {src_cfg.arch_dict()} != {cfg.arch_dict()}")
    flat = dict(apply.flat_params(params))
    abstract = apply.abstract_params(cfg)
    want = apply.flat_params(abstract)
    shardings = None
    if mesh is not None:
        from varejax.parallel import DEFAULT_RULES, param_shardings
        shardings = apply.flat_params(param_shardings(abstract, mesh, rules or DEFAULT_RULES))
    for layer in lora_layers(flat):
        a, b, kernel = layer + ("lora_a",), layer + ("lora_b",), layer + ("kernel",)
        kept = a in want and tuple(want[a].shape) == tuple(flat[a].shape) and tuple(want[b].shape) == tuple(
            flat[b].shape)
        if not kept:
            flat[kernel] = add_delta(flat[kernel], factor_delta(flat[a], flat[b], src_cfg.lora_scale))
            del flat[a], flat[b]
    out = {}
    for path, spec in want.items():
        if path in flat:
            value = flat[path]
        elif is_lora_path(path):
            value = initial_factor(cfg, path, tuple(spec.shape)).astype(spec.dtype)
            value = jax.device_put(value, shardings[path]) if shardings is not None else jnp.asarray(value)
        else:
            raise KeyError(f"parameter {'.'.join(path)} missing")
        if value.dtype != spec.dtype:
            value = value.astype(spec.dtype)
        out[path] = value
    extra = sorted(set(flat) - set(out))
    if extra:
        raise KeyError(f"parameters {extra[:5]} have no place in the target config")
    return apply.state_from_flat(cfg, out)
