"""Helpers for the experiment configs in `configs/`: mesh, sharding rules, numerics, and loading.

Config files are plain Python with `get_config(arg=None)`; they import helpers from here (not from
each other), so a config file works from any working directory. `load_config("configs/x.py:arg",
["config.a=1", ...])` is what every `varejax <stage> --config ...` command uses.
"""

from __future__ import annotations

import ml_collections

from varejax.parallel.rules import DEFAULT_RULES


def mesh_config(shape: tuple[int, int, int] = (-1, 1, 1)) -> ml_collections.ConfigDict:
    """Mesh (data, fsdp, tensor) and the logical-axis rules table (override per experiment)."""
    config = ml_collections.ConfigDict()
    config.shape = shape
    # Each entry: (logical name, mesh axes). The one place where logical names meet mesh axes.
    config.rules = [(name, axes) for name, axes in DEFAULT_RULES]
    return config


def numerics_config(accelerator: bool = False) -> ml_collections.ConfigDict:
    """Parameter/compute dtypes: fp32 everywhere for parity on CPU, bf16 compute on accelerators."""
    config = ml_collections.ConfigDict()
    config.param_dtype = "float32"
    config.compute_dtype = "bfloat16" if accelerator else "float32"
    config.ca_bf16_rounding = False
    config.matmul_precision = "default" if accelerator else "highest"
    config.attention_impl = "xla"
    config.remat = accelerator
    return config


def rules_tuple(rules) -> tuple:
    """ConfigDict list of [name, axes] -> the hashable tuple form the code uses."""
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, calls `get_config(arg)`, then applies `config.a.b=value` overrides.

    Values are parsed as Python literals when possible (numbers, booleans, tuples, lists), else kept
    as strings; an unknown field is an error (configs are locked).
    """
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"varejax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config()")
    config = module.get_config(arg or None)
    return apply_overrides(config, overrides, path)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str] | tuple[str, ...] = (),
                    source: str = "the config") -> ml_collections.ConfigDict:
    """Applies `config.a.b=value` overrides (Python literals when they parse, else strings)."""
    import ast

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("config."):
            raise ValueError(f"override {item!r} must look like config.field=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        parts = key.split(".")[1:]
        for part in parts[:-1]:
            node = node[part]
        if parts[-1] not in node:
            raise KeyError(f"{key}: no such field in {source}")
        current = node[parts[-1]]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        node[parts[-1]] = value
    return config
