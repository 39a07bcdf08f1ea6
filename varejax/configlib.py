"""Helpers for the experiment configs in `configs/`: mesh, sharding rules, numerics, and loading.

Config files are plain Python with `get_config(arg=None)`; they import helpers from here (not from
each other), so a config file works from any working directory. `parse_args` reads `--config FILE[:arg]`
and `--config.a.b=value` for the `varejax` command and every benchmark; `load_config("configs/x.py:arg",
["config.a=1", ...])` builds the config.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from varejax.errors import ConfigError, UserError


def mesh_config(shape: tuple[int, int, int] = (-1, 1, 1)) -> ml_collections.ConfigDict:
    """Mesh (data, fsdp, tensor) and the logical-axis rules table (override per experiment)."""
    from varejax.parallel.rules import DEFAULT_RULES

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
    config.attention_impl = "scales"   # exact block-causal attention without mask or padding (fastest here)
    config.remat = accelerator
    config.scan_blocks = False         # True: blocks under one lax.scan (compile time flat in depth)
    config.grad_boundaries = "auto"    # residual-gradient fusion boundaries: on for CPU (identity; faster there)
    return config


def rules_tuple(rules) -> tuple:
    """ConfigDict list of [name, axes] -> the hashable tuple form the code uses."""
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=value` overrides from the other command-line words.

    Returns (other words, overrides as "config.a.b=value"). Overrides are taken out before argparse sees
    the words, because argparse would read a value that holds spaces as a positional argument.

    Raises:
      ConfigError: an override without "=" (write `--config.a.b=value`).
    """
    rest, overrides = [], []
    for word in argv:
        if not word.startswith("--config."):
            rest.append(word)
            continue
        if "=" not in word:
            raise ConfigError(f"{word}: write the override as {word}=VALUE")
        overrides.append(word[2:])
    return rest, overrides


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """`parser.parse_args` for a command that takes `--config FILE[:arg]` and `--config.a.b=value` overrides.

    The one command-line parser of the `varejax` command and of every benchmark. Returns (the parsed
    arguments, the overrides as "config.a.b=value"), for `load_config(args.config, overrides)`. A bad
    override exits through `parser.error` (status 2, one line).
    """
    try:
        rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        parser.error(str(err))
    return parser.parse_args(rest), overrides


def parse_config_args(parser: argparse.ArgumentParser,
                      argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """`parse_args`, then the config of `--config` (the parser must define it) with the overrides applied.

    What a benchmark script calls; a bad config or override exits through `parser.error`.
    """
    args, overrides = parse_args(parser, argv)
    try:
        return args, load_config(args.config, overrides)
    except UserError as err:
        parser.error(str(err))


def load_config(spec: str | None, overrides: Sequence[str] = (),
                default: Callable[[], ml_collections.ConfigDict] | None = None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, calls `get_config(arg)`, then applies `config.a.b=value` overrides.

    Values are parsed as Python literals when possible (numbers, booleans, tuples, lists), else kept
    as strings; an unknown field is an error (configs are locked).

    Args:
      spec: "path.py" or "path.py:arg"; None = the config `default()` returns.
      overrides: "config.a.b=value" strings (see `parse_args`).
      default: builds the config used when `spec` is None (e.g. a command's embedded toy job).

    Raises:
      ConfigError: no such file, no get_config(), an unknown field or a value of the wrong type.
    """
    if spec is None:
        if default is None:
            raise ConfigError("no config given: pass --config FILE[:arg]")
        return apply_overrides(default(), overrides, "the embedded default config")
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"varejax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config()")
    config = module.get_config(arg or None)
    return apply_overrides(config, overrides, path)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str] = (),
                    source: str = "the config") -> ml_collections.ConfigDict:
    """Applies `config.a.b=value` overrides (Python literals when they parse, else strings).

    A float field given an integer gets the float, a tuple field given a list gets the tuple.

    Raises:
      ConfigError: a malformed override, an unknown field, or a value the field's type refuses.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("config."):
            raise ConfigError(f"override {item!r} must look like config.field=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        set_field(config, key[len("config."):], value, f"{key}: no such field in {source}", raw)
    return config


def set_field(config: ml_collections.ConfigDict, field: str, value: Any, where: str, raw: str | None = None) -> None:
    """Sets the dotted `field` ("train.learning_rate") of `config` to `value`.

    A float field given an integer gets the float, a tuple field given a list gets the tuple.

    Raises:
      ConfigError: the field does not exist (message `where` + the first missing part) or its type refuses
        the value.
    """
    node = config
    parts = field.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"{where} ({'.'.join(['config', *parts[:depth + 1]])} does not exist)")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.{field}={raw if raw is not None else repr(value)}: {err}") from None


def resolved_json(config: ml_collections.ConfigDict) -> str:
    """The config with every field resolved, as indented JSON (what `varejax config show` prints)."""
    return json.dumps(json.loads(config.to_json_best_effort()), indent=2)
