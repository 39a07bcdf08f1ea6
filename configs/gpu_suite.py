"""The one-GPU benchmark suite (benchmarks/gpu_suite.py): sizes, numerics and the time budget.

    bash benchmarks/gpu_suite.sh                 # on the GPU machine: Infinity-2B shapes, 1024 px
    bash benchmarks/gpu_suite.sh --size tiny     # the CPU rehearsal (tiny preset, 256 px, well under a minute)
    python benchmarks/gpu_suite.py --size 2b --config.svare.batch=1

`arg`: 2b (random weights of the released 2B shapes, d32 tokenizer, 1024 px) or tiny (the same code path
at test sizes). Random weights everywhere: speed and memory do not depend on them.
"""

from __future__ import annotations

import ml_collections

SIZES = {
    # transformer preset, tokenizer preset, pn (1M = 1024 px), scales kept (0 = all), sampling batches,
    # S-VARE batch, time budget (s)
    "tiny": ("tiny", "tiny", "0.06M", 4, (1, 4), 2, 240),
    "2b": ("infinity_2b", "d32", "1M", 0, (1, 4), 2, 450),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "2b"
    if size not in SIZES:
        raise ValueError(f"unknown gpu_suite size {size!r}; choose from {sorted(SIZES)}")
    preset, vae_preset, pn, num_scales, batches, svare_batch, budget_s = SIZES[size]
    config = ml_collections.ConfigDict()
    config.size = size
    config.model_preset = preset
    config.vae_preset = vae_preset
    config.pn = pn
    config.h_div_w = 1.0
    config.num_scales = num_scales   # the first scales of the pn schedule only (tiny: 4 scales, 96 px); 0 = all
    config.seed = 0
    config.repeats = 3               # timed runs after the compile; the median is reported
    config.budget_s = budget_s       # the suite skips what no longer fits (the shell script also kills at its limit)
    config.min_stage_s = 30          # a stage (or one sampling batch) starts only with this much budget left
    config.require_accelerator = size != "tiny"   # 2B on a CPU would only burn the time limit: stop instead

    config.sampling = ml_collections.ConfigDict()
    config.sampling.batches = batches
    config.sampling.deferred_batches = batches[1:]   # run after the S-VARE stage, so a slow compile cannot starve it
    config.sampling.text_len = 32
    config.sampling.guidance = 4.0   # upstream's 2B defaults: cfg 4, tau 0.5, top_p 0.97
    config.sampling.tau = 0.5
    config.sampling.top_p = 0.97
    config.sampling.param_dtype = "bfloat16"   # inference reads bf16 weights (half the bytes of fp32)
    config.sampling.compute_dtype = "bfloat16"
    config.sampling.attention_impl = "auto"    # auto: cudnn on GPU, xla elsewhere
    config.sampling.fallback_attention_impl = "xla"
    config.sampling.decode = True              # the tokenizer decode is part of the per-image latency
    config.sampling.vae_compute_dtype = "bfloat16"

    config.svare = ml_collections.ConfigDict()
    config.svare.batch = svare_batch
    config.svare.text_len = 64
    config.svare.mode = "alternating"          # the official iteration: erase step, then preserve step
    config.svare.trainable = "ca_ffn"
    config.svare.param_dtype = "float32"       # the erase config's numerics: fp32 weights, bf16 compute, remat
    config.svare.compute_dtype = "bfloat16"
    config.svare.matmul_precision = "default"
    config.svare.remat = True
    config.svare.attention_impl = "auto"       # auto: cudnn on GPU, chunked elsewhere (what erase.py uses)
    config.svare.fallback_attention_impl = "chunked"

    config.upstream = ml_collections.ConfigDict()
    config.upstream.enabled = True             # runs only where $VAREJAX_UPSTREAM_INFINITY is an Infinity checkout
    config.upstream.batch = 1
    config.upstream.sdpa_fallback = False      # without flash-attn: run upstream through torch SDPA shims (else skip)

    # Trace (not run) the cudnn variants with cuDNN's version check faked, to catch shape/dtype errors of the
    # cudnn path on a CPU machine before a GPU is spent on them. Only where no GPU is present.
    config.cudnn_trace_check = True
    return config.lock()
