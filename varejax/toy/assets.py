"""The shipped toy models: trained by `varejax toy train --config.install=True` (default config, seed 0).

    pipeline = load_toy_pipeline()                  # varejax.sample.pipeline.Pipeline
    images = pipeline.generate(["a red circle on a striped background"], [0], SamplingConfig(guidance=(4.0,),
                               tau=(1.0,), top_p=0.97), TOY_SCHEDULE)
    oracle_params = load_toy_oracle()               # varejax.toy.oracle.classify(oracle_params, images)

Layout of `asset_dir()`: `infinity/`, `vae/`, `t5/` (with tokenizer.json), `oracle/` (model folders:
orbax params + config.json) and `world.json` (world version, schedule, measured accuracies, train
times, the config used).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from varejax.toy.spec import TOY_MIN_VOCAB, TOY_SCHEDULE, WORLD_FILE

__all__ = ["TOY_MIN_VOCAB", "TOY_SCHEDULE", "asset_dir", "load_toy_oracle", "load_toy_pipeline", "toy_world_info"]


ASSETS_ENV = "VAREJAX_TOY_ASSETS"


def asset_dir() -> Path:
    """The folder of the shipped toy models (inside the installed package), or the folder the
    VAREJAX_TOY_ASSETS environment variable names: a `varejax toy train` run's WORKDIR/models, to run the
    toy jobs on a world before installing it."""
    override = os.environ.get(ASSETS_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"{ASSETS_ENV}={override}: no such folder (it must hold infinity/, vae/, "
                                    f"t5/, oracle/ and world.json, as WORKDIR/models of `varejax toy train`)")
        return path
    return package_asset_dir()


def package_asset_dir() -> Path:
    """The package's own assets folder (where `varejax toy train --config.install=True` installs)."""
    return Path(__file__).resolve().parent / "assets"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the toy assets are not installed (run `varejax toy train "
                                f"--config.install=True`, or reinstall varejax)")
    return path


# Training-config fields added after a world.json was written, with the value that reproduces what the code
# did before the field existed (a world trained then recorded no value for it).
CONFIG_FIELDS_ADDED = {("data", "pattern_phase"): "free"}


def with_added_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded training config with every later-added field filled in (`CONFIG_FIELDS_ADDED`)."""
    config = json.loads(json.dumps(config))
    for (*parents, name), value in CONFIG_FIELDS_ADDED.items():
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node.setdefault(name, value)
    return config


def toy_world_info() -> dict[str, Any]:
    """The shipped `world.json`: world version, schedule, accuracies, timings, training config (fields added
    to the config since it was written filled with the value the code used before them)."""
    info = json.loads(_require(asset_dir() / WORLD_FILE).read_text())
    if "config" in info:
        info["config"] = with_added_config_fields(info["config"])
    return info


def load_toy_pipeline(*, text_cache_dir: str | None = None, mesh: Any = None, rules: Any = None,
                      **numerics: Any):
    """`Pipeline.from_dirs` over the shipped infinity/, vae/ and t5/ folders (numerics: InfinityConfig
    fields such as compute_dtype or cond_drop_rate, passed to the transformer loader)."""
    from varejax.sample.pipeline import Pipeline

    root = asset_dir()
    return Pipeline.from_dirs(str(_require(root / "infinity")), str(_require(root / "vae")),
                              str(_require(root / "t5")), text_cache_dir=text_cache_dir, min_vocab=TOY_MIN_VOCAB,
                              mesh=mesh, rules=rules, **numerics)


def load_toy_oracle():
    """The shipped oracle's parameters (`varejax.toy.oracle.classify(params, images)`)."""
    from varejax.toy.oracle import load_oracle

    return load_oracle(str(_require(asset_dir() / "oracle")))
