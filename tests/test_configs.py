"""Every config in configs/ loads, is locked, and takes command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from varejax.configlib import load_config
from varejax.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_is_locked(path):
    config = load_config(str(path))
    assert config.is_locked
    with pytest.raises(ConfigError, match="no such field"):
        load_config(str(path), ["config.no_such_field_here=1"])


def test_overrides_parse_literals():
    path = Path(__file__).resolve().parents[1] / "configs" / "forward_benchmark.py"
    config = load_config(f"{path}:small", ["config.batch=7", "config.numerics.remat=True", "config.pn=0.25M"])
    assert (config.size, config.batch, config.numerics.remat, config.pn) == ("small", 7, True, "0.25M")
    with pytest.raises(ConfigError, match="config.field=value"):
        load_config(str(path), ["batch=7"])
