"""Hot paths against upstream PyTorch Infinity on one machine (`benchmarks/vs_upstream.py`).

    VAREJAX_UPSTREAM_INFINITY=/path/to/Infinity python benchmarks/vs_upstream.py --config configs/vs_upstream.py
    python benchmarks/vs_upstream.py --config configs/vs_upstream.py:tiny      # seconds, ours only without torch

The default size is issue 16's: depth 4, width 256, 4 heads, text 256 (lengths 12 and 20), d = 32, batch 2,
the 7-scale 256 px schedule (L = 521), fp32, random weights. `numerics` are ours in fp32; `bf16=True` adds
our bf16-compute variant (upstream has no bf16 path on CPU).
"""

from __future__ import annotations

import ml_collections

SIZES = {
    # preset, pn, batch, text lengths, repeats per run
    "issue16": ("small", "0.06M", 2, (12, 20), 5),
    "tiny": ("tiny", "0.06M", 2, (5, 8), 2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "issue16"
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    preset, pn, batch, lengths, steps = SIZES[size]
    config = ml_collections.ConfigDict()
    config.size = size
    config.model_preset = preset
    config.codebook_dim = 32
    config.pn = pn
    config.h_div_w = 1.0
    config.batch = batch
    config.text_lengths = lengths
    config.steps = steps          # timed calls per run (median)
    config.runs = 3               # independent runs: the figure is the median, the spread min..max
    config.seed = 0
    config.attention_impl = "scales"   # ours; "xla" is the masked, padded path used for parity
    config.bf16 = True            # also time our bf16-compute variant
    config.paths = "forward,grad,grad_remat,svare,sample"
    config.guidance = 4.0
    config.tau = 0.5
    config.torch_threads = 0      # 0 = torch's default (the cores of this machine)
    config.out = ""               # write the JSON here too
    return config.lock()
