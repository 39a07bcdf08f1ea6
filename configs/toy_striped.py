"""Erase the style "striped background" from the embedded toy Infinity (anchor: plain background).

    varejax erase --config configs/toy_striped.py --workdir runs/toy_striped
"""

from __future__ import annotations

import ml_collections

from varejax.toy.job import toy_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return toy_config(("striped",), size=arg or "full").lock()
