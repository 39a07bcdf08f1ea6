"""Erase an object and a style at once (circle and striped) from the embedded toy Infinity.

    varejax erase --config configs/toy_multi.py --workdir runs/toy_multi

The pairs of both concepts are pooled and balanced in one run.
"""

from __future__ import annotations

import ml_collections

from varejax.toy.job import toy_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = toy_config(("circle", "striped"), size=arg or "full")
    config.train.steps = config.train.steps * 3 // 2
    return config.lock()
