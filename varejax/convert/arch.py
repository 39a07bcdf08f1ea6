"""`--arch` of the converters: a preset name or a JSON file, resolved to a model config.

A JSON file may hold a model folder's `config.json` (`{"format": ..., "model": {...}}`, whose format must
be the converted model's), the bare field dict of our config, or an upstream fixture config
(`infinity_constructor_kwargs` + `vae_config`). Whatever is wrong with `--arch` (no such preset, an
unreadable file, a config of another model, invalid fields) is an `ArchError`, a user error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from varejax.checkpoint import FORMATS
from varejax.convert.sources import CheckpointError
from varejax.models.bsq_vae import VAEConfig, get_vae_preset
from varejax.models.config import InfinityConfig, get_preset
from varejax.paths import as_path


class ArchError(CheckpointError):
    """`--arch` names no preset, or its file cannot be read or holds no valid config of the model."""


@contextlib.contextmanager
def _arch_errors(spec: str) -> Iterator[None]:
    """Reports what goes wrong while resolving `spec` as an ArchError naming it."""
    try:
        yield
    except ArchError:
        raise
    except (KeyError, ValueError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ArchError(f"--arch {spec}: {message}") from None


def _read_json(spec: str, kind: str) -> dict[str, Any]:
    """The JSON object of `spec`, unwrapped from a model folder's config.json (format checked)."""
    data = json.loads(as_path(spec).read_text())
    if not isinstance(data, dict):
        raise ArchError(f"--arch {spec}: expected a JSON object")
    if isinstance(data.get("model"), dict):
        if data.get("format", FORMATS[kind]) != FORMATS[kind]:
            raise ArchError(f"--arch {spec}: a {data['format']!r} model config, not {FORMATS[kind]!r}")
        return data["model"]
    return data


def _resolve(spec: str, kind: str, preset: Callable[[str], Any], config_cls: Any,
             from_upstream: Callable[[str, dict[str, Any], dict[str, Any]], Any], overrides: dict[str, Any]) -> Any:
    """A preset, or a JSON file: upstream's config when `from_upstream` reads one (else None), or ours."""
    with _arch_errors(spec):
        if not spec.endswith(".json"):
            return preset(spec).replace(**overrides)
        data = _read_json(spec, kind)
        cfg = from_upstream(spec, data, overrides)
        return cfg if cfg is not None else config_cls.from_dict({**data, **overrides})


def _infinity_upstream(spec: str, data: dict[str, Any], overrides: dict[str, Any]) -> InfinityConfig | None:
    if "infinity_constructor_kwargs" not in data:
        return None
    codebook_dim = data.get("vae_config", {}).get("codebook_dim")
    if codebook_dim is None:
        raise ArchError(f"--arch {spec}: upstream config has no vae_config.codebook_dim (bits per token)")
    return InfinityConfig.from_upstream_kwargs(data["infinity_constructor_kwargs"], codebook_dim, **overrides)


def _vae_upstream(spec: str, data: dict[str, Any], overrides: dict[str, Any]) -> VAEConfig | None:
    return VAEConfig.from_upstream(data["vae_config"], **overrides) if "vae_config" in data else None


def infinity_arch(spec: str, **overrides: Any) -> InfinityConfig:
    """The transformer config of `--arch`: a preset (2b, 8b, infinity_2b, ...) or a JSON file."""
    return _resolve(spec, "infinity", get_preset, InfinityConfig, _infinity_upstream, overrides)


def vae_arch(spec: str, **overrides: Any) -> VAEConfig:
    """The tokenizer config of `--arch`: a preset (d32, d14, tiny, 2b, 8b) or a JSON file."""
    return _resolve(spec, "vae", get_vae_preset, VAEConfig, _vae_upstream, overrides)
