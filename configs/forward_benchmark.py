"""Teacher-forced forward + gradient of the Infinity transformer: sizes for benchmarks and smoke runs.

    python benchmarks/forward.py --config configs/forward_benchmark.py:tiny
    python benchmarks/forward.py --config configs/forward_benchmark.py:2b --config.batch=2

`arg` picks a size preset: tiny (CPU, seconds), small, 2b, 8b (accelerators).
"""

from __future__ import annotations

import ml_collections

from varejax import configlib

SIZES = {
    # preset, schedule (template, pn), batch, text rows
    "tiny": ("tiny", (1.0, "0.06M"), 2, 16),
    "small": ("small", (1.0, "0.06M"), 4, 32),
    "2b": ("infinity_2b", (1.0, "1M"), 2, 128),
    "8b": ("infinity_8b", (1.0, "1M"), 1, 128),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "tiny"
    preset, (h_div_w, pn), batch, text_len = SIZES[size]
    config = ml_collections.ConfigDict()
    config.size = size
    config.model_preset = preset
    config.h_div_w = h_div_w
    config.pn = pn
    config.batch = batch
    config.text_len = text_len
    config.steps = 5
    config.seed = 0
    config.numerics = configlib.numerics_config(accelerator=size in ("2b", "8b"))
    config.mesh = configlib.mesh_config()
    return config.lock()
