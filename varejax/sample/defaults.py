"""The default configuration of `varejax sample`, shared by configs/sample.py and the embedded toy world.

With every `config.model.*` folder empty, the stage samples the shipped toy world instead (its own
schedule; `pn` and `h_div_w` are ignored there).
"""

from __future__ import annotations

import ml_collections

from varejax import configlib

DEFAULTS = {"2b": (4.0, 0.5), "8b": (3.0, 1.0), "toy": (4.0, 1.0)}
TOY_PROMPTS = ("a red circle on a striped background", "a blue square", "a green triangle on a dotted background",
               "a yellow star in front of a checkered background")


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Sampling settings of upstream's scripts for `arg` = 2b (guidance 4, tau 0.5) or 8b (guidance 3, tau 1), or
    the toy world's (`toy`: guidance 4, tau 1, its prompts)."""
    guidance, tau = DEFAULTS[arg or "2b"]
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
    config.sampling.guidance = (guidance,)   # classifier-free guidance: one value, or one per scale
    config.sampling.tau = (tau,)
    config.sampling.top_k = 900          # clamped to the 2 classes of a bit: a no-op, as upstream
    config.sampling.top_p = 0.97
    config.sampling.greedy = False

    config.text_cache_dir = ""      # default: WORKDIR/text_cache
    config.numerics = ml_collections.ConfigDict(
        {k: v for k, v in configlib.numerics_config(accelerator=True).items() if k != "param_dtype"})
    config.mesh = configlib.mesh_config()
    if arg == "toy":
        config.prompts = TOY_PROMPTS
    return config
