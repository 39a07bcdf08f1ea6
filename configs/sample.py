"""Text-to-image sampling with converted Infinity models.

    varejax sample --config configs/sample.py --workdir runs/sample \
        --config.model.infinity=models/infinity_2b --config.model.vae=models/vae_d32 \
        --config.model.t5=models/flan_t5_xl --config.prompts="('a red fox in the snow', 'a lighthouse at dawn')"

`arg` picks defaults: `2b` (guidance 4, tau 0.5, 1M) or `8b` (guidance 3, tau 1), as upstream's scripts; `toy`
samples the embedded toy world (also what `varejax sample --workdir DIR` does without --config).
"""

from __future__ import annotations

import ml_collections

from varejax.sample.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return base_config(arg).lock()
