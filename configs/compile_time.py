"""Compile time against depth, blocks unrolled vs under `lax.scan` (`benchmarks/compile_time.py`).

    python benchmarks/compile_time.py --config configs/compile_time.py
    python benchmarks/compile_time.py --config configs/compile_time.py:tiny     # seconds
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown compile_time config argument {arg!r} (use nothing or 'tiny')")
    tiny = arg == "tiny"
    config = ml_collections.ConfigDict()
    config.model_preset = "tiny" if tiny else "small"   # width 256, 4 heads (issue 16's vs_upstream size)
    config.depths = (1, 2) if tiny else (2, 4, 8, 16)
    config.pn = "0.06M"          # the 7-scale 256 px schedule, L = 521
    config.batch = 2
    config.text_length = 20
    config.remat = True          # what training compiles (each block rematerialised)
    config.runs = 1 if tiny else 2   # compile time is the minimum over runs (fresh jit, no persistent cache)
    config.out = ""
    return config.lock()
