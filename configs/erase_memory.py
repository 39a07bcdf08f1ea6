"""AOT memory estimate of one S-VARE training iteration at real shapes, without weights.

    python benchmarks/erase_memory.py --config configs/erase_memory.py:2b --config.memory.out=mem.json
    python benchmarks/erase_memory.py --config configs/erase_memory.py:2b --config.train.bf16_params=True

`arg`: 2b (Infinity-2B, 1024 px, batch 2, one device), 8b (Infinity-8B, 1024 px, batch 2, 8 devices:
mesh (1, 2, 4) = FSDP 2 x tensor 4), or tiny (seconds, for tests).

The config IS the erase config (`varejax.erase.defaults.base_config`, what `varejax erase` runs): the
compiled program takes its numerics (bf16 compute, chunked attention), remat, trainable set, mode,
parameter dtype (`train.bf16_params`), batch size, resolution and mesh from the same fields training
reads, so an override that changes training (e.g. `--config.train.remat=False`) changes the estimate the
same way. `memory` holds what only the estimate needs: the model preset (there is no checkpoint to read
the architecture from), the text length, the device budget and the output file.
"""

from __future__ import annotations

import ml_collections

from varejax import configlib
from varejax.erase.defaults import base_config

SIZES = {
    # preset, pn, mesh (data, fsdp, tensor)
    "tiny": ("tiny", "0.06M", (1, 1, 1)),
    "2b": ("infinity_2b", "1M", (1, 1, 1)),
    # The recipe's global batch of 2 cannot be split 8 ways (training refuses it on an fsdp-8 mesh), so
    # 8 devices are 2-way FSDP (batch) x 4-way tensor parallel: every 2-D matrix is sharded 8 ways.
    "8b": ("infinity_8b", "1M", (1, 2, 4)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "2b"
    preset, pn, mesh_shape = SIZES[size]
    config = base_config(())
    config.pn = pn
    config.mesh = configlib.mesh_config(mesh_shape)
    config.memory = ml_collections.ConfigDict()
    config.memory.size = size
    config.memory.model_preset = preset
    config.memory.text_len = 64             # padded T5 rows of a batch (training: longest prompt, rounded to 8)
    config.memory.device_gib = 80.0         # one H100 / A100 80 GB
    # Part of the device the estimate may use: the rest is left for the CUDA context, cuBLAS/cuDNN
    # workspaces and allocator fragmentation, none of which the CPU compiler sees.
    config.memory.usable_fraction = 0.9
    # CPU scheduler of the compile: "memory_optimized" (closer to a GPU/TPU's memory-aware scheduling),
    # "concurrency_optimized" or "default" (XLA's CPU default, which keeps many more buffers live).
    config.memory.cpu_scheduler = "memory_optimized"
    # "steady": AdamW moments sharded like their parameters (what every step returns); "trainer_init": as
    # the trainer's init creates them (replicated on every device: the first step of a multi-device run).
    config.memory.opt_state_sharding = "steady"
    # Also compile the same program with one block (seconds) for the remat model of the peak.
    config.memory.block_probe = True
    config.memory.baseline_remat_toggled = False  # also compile with train.remat flipped (a second compile)
    config.memory.out = ""                  # write the JSON result here too ("" = stdout only)
    return config.lock()
