"""Sampling speed: the KV-cache CFG sampler (transformer) and the tokenizer decoder.

    python benchmarks/sample.py --config configs/sample_benchmark.py:tiny
    VAREJAX_UPSTREAM_INFINITY=/path/to/Infinity python benchmarks/sample.py --config configs/sample_benchmark.py:small

`arg`: tiny / small (CPU) or 2b (accelerators). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import ml_collections

SIZES = {
    # transformer preset, tokenizer preset, pn, batch
    "tiny": ("tiny", "tiny", "0.06M", 2),
    "small": ("small", "tiny", "0.06M", 2),
    "2b": ("infinity_2b", "d32", "1M", 4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "tiny"
    preset, vae_preset, pn, batch = SIZES[size]
    config = ml_collections.ConfigDict()
    config.size = size
    config.model_preset = preset
    config.vae_preset = vae_preset
    config.pn = pn
    config.h_div_w = 1.0
    config.batch = batch
    config.text_len = 32
    config.guidance = 4.0   # classifier-free guidance scale
    config.tau = 0.5
    config.repeats = 3
    config.seed = 0
    config.compute_dtype = "bfloat16" if size == "2b" else "float32"
    config.torch_threads = 0   # 0 = torch default
    return config.lock()
