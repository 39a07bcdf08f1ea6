"""Hot paths against upstream PyTorch Infinity on one machine (`benchmarks/vs_upstream.py`).

    VAREJAX_UPSTREAM_INFINITY=/path/to/Infinity python benchmarks/vs_upstream.py --config configs/vs_upstream.py
    python benchmarks/vs_upstream.py --config configs/vs_upstream.py:tiny      # seconds, ours only without torch

The default size is issue 16's: depth 4, width 256, 4 heads, text 256 (lengths 12 and 20), d = 32, batch 2,
the 7-scale 256 px schedule (L = 521), fp32, random weights. `numerics` are ours in fp32; `bf16=True` adds
our bf16-compute variant (upstream has no bf16 path on CPU).

The codec paths (`vae_encode`, `vae_decode`, `t5_encode`) use the sizes of CODEC_SIZES: the real d32
tokenizer's layout (patch 16, ch_mult 1,2,4,4,4, 2 ResnetBlocks per level, d = 32) and the real Flan-T5
encoder's layout (gated-GELU, 32 relative-position buckets, vocab 32128), both narrower than the released
models so that a call takes well under a second on 2 CPU cores.
"""

from __future__ import annotations

import ml_collections

SIZES = {
    # preset, pn, batch, text lengths, repeats per run
    "issue16": ("small", "0.06M", 2, (12, 20), 5),
    "tiny": ("tiny", "0.06M", 2, (5, 8), 2),
}

CODEC_SIZES = {
    # issue16: the d32 tokenizer with base width 32 instead of 128 (channels 32, 64, 128, 128, 128: 1/16 of
    # the convolution FLOPs), on 256 px images (16 x 16 latents, the schedule's last scale); a Flan-T5
    # encoder at d_model 512, 4 layers, 8 heads of 64, d_ff 1024, full vocab (Flan-T5-XL: 2048, 24, 32, 5120).
    "issue16": {"vae": dict(base_ch=32, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2, patch_size=16, image_size=256),
                "t5": dict(vocab_size=32128, d_model=512, num_layers=4, num_heads=8, d_kv=64, d_ff=1024)},
    # tiny (tests): the tokenizer's 5 levels and patch 16 at width 32, one ResnetBlock per level, 32 px images
    # (2 x 2 latents); a 64-wide 2-layer T5 with a 256-token vocabulary. Compiles and runs in seconds.
    "tiny": {"vae": dict(base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, patch_size=16, image_size=32),
             "t5": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=96)},
}
ALL_PATHS = "forward,grad,grad_remat,svare,sample,vae_encode,vae_decode,t5_encode"


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
    config.paths = ALL_PATHS
    config.vae = ml_collections.ConfigDict(CODEC_SIZES[size]["vae"])  # codebook_dim is config.codebook_dim
    config.t5 = ml_collections.ConfigDict(CODEC_SIZES[size]["t5"])
    # With an upstream checkout, the codec paths first load upstream's random torch weights into ours (through
    # varejax/convert's key tables) and check that both sides compute the same outputs: max abs error over
    # the valid outputs at most these (fp32 both sides; the run stops when a check fails).
    config.check_outputs = True
    config.vae_tolerance = 1e-4   # encoder raw features and decoded images
    config.t5_tolerance = 1e-4    # last hidden states of the valid tokens
    config.guidance = 4.0
    config.tau = 0.5
    config.torch_threads = 0      # 0 = torch's default (the cores of this machine)
    config.out = ""               # write the JSON here too
    return config.lock()
