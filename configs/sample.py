"""Text-to-image sampling with converted Infinity models.

    varejax sample --config configs/sample.py --workdir runs/sample \
        --config.model.infinity=models/infinity_2b --config.model.vae=models/vae_d32 \
        --config.model.t5=models/flan_t5_xl --config.prompts="('a red fox in the snow', 'a lighthouse at dawn')"

`arg` picks defaults: `2b` (cfg 4, tau 0.5, 1M) or `8b` (cfg 3, tau 1), as upstream's scripts.
"""

from __future__ import annotations

import ml_collections

from varejax import configlib

DEFAULTS = {"2b": (4.0, 0.5), "8b": (3.0, 1.0)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    cfg_scale, tau = DEFAULTS[arg or "2b"]
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.infinity = ""      # folder written by `varejax convert infinity`
    config.model.vae = ""           # folder written by `varejax convert vae`
    config.model.t5 = ""            # folder written by `varejax convert t5` (holds tokenizer.json)
    config.model.min_vocab = 32100  # refuse smaller tokenizers (an offline HF fallback builds empty ones)

    config.prompts = ("a photo of a red fox standing in fresh snow",)
    config.negative_prompt = ""
    config.images_per_prompt = 1
    config.seed = 0                 # image k gets seed + k
    config.h_div_w = 1.0            # nearest of the 15 aspect templates is used
    config.pn = "1M"                # 0.06M | 0.25M | 0.60M | 1M
    config.batch_size = 1

    config.sampling = ml_collections.ConfigDict()
    config.sampling.cfg = (cfg_scale,)   # one value, or one per scale
    config.sampling.tau = (tau,)
    config.sampling.top_k = 900          # clamped to the 2 classes of a bit: a no-op, as upstream
    config.sampling.top_p = 0.97
    config.sampling.greedy = False

    config.text_cache_dir = ""      # default: WORKDIR/text_cache
    config.numerics = ml_collections.ConfigDict(
        {k: v for k, v in configlib.numerics_config(accelerator=True).items() if k != "param_dtype"})
    config.mesh = configlib.mesh_config()
    return config.lock()
