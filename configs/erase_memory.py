"""AOT memory estimate of one S-VARE iteration (official alternating step) at real shapes, no weights.

    python benchmarks/erase_memory.py --config configs/erase_memory.py:2b
    python benchmarks/erase_memory.py --config configs/erase_memory.py:2b --config.mesh.shape="(1, 8, 1)"

`arg`: 2b (Infinity-2B, 1024 px, batch 2, bf16 compute, remat), 8b, or tiny (seconds, for tests).
"""

from __future__ import annotations

import ml_collections

from varejax import configlib

SIZES = {
    # preset, pn, batch
    "tiny": ("tiny", "0.06M", 2),
    "2b": ("infinity_2b", "1M", 2),
    "8b": ("infinity_8b", "1M", 2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, pn, batch = SIZES[arg or "2b"]
    config = ml_collections.ConfigDict()
    config.size = arg or "2b"
    config.model_preset = preset
    config.pn = pn
    config.h_div_w = 1.0
    config.batch = batch
    config.text_len = 64
    config.mode = "alternating"
    config.trainable = "ca_ffn"
    config.baseline_remat_toggled = False   # also compile with remat flipped and print the ratio
    config.numerics = ml_collections.ConfigDict(configlib.numerics_config(accelerator=arg != "tiny"))
    config.mesh = configlib.mesh_config((1, 1, 1))
    return config.lock()
