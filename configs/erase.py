"""S-VARE concept erasure of a converted Infinity model (the paper's recipe by default).

    varejax erase --config configs/erase.py:church --workdir runs/church \
        --config.model.infinity=models/infinity_2b --config.model.t5=models/flan_t5_xl \
        --config.model.vae=models/vae_d32
    varejax erase prepare --config configs/erase.py:nudity ...      # only the VARE trajectories

`arg`: nudity | church | van_gogh | multi (church and Van Gogh in one run, pairs pooled and balanced).
Pair files are under configs/pairs/ (paths relative to this folder). Official recipe: 50 pairs,
500 iterations, batch 2, alternating erase/preserve AdamW steps, lr 2.34375e-5, clip 5, 1024 px.

The whole recipe, every field resolved (with any --config.x=y applied), is printed by

    varejax config show --config configs/erase.py:church

Its fields are set and documented in varejax/erase/defaults.py (`base_config`), which the toy world's
erasure jobs share: they run from the installed package, without this folder.

Options the official code has but does not use by default:
    --config.train.trainable=lora [--config.train.lora_rank=4 --config.train.lora_targets="('mat_qkv','mat_kv','proj')"]
    --config.train.bf16_params=True     # pure-bf16 parameters and AdamW state, as upstream trains
"""

from __future__ import annotations

import ml_collections

from varejax.erase.defaults import base_config

CONCEPTS = {
    "nudity": ("pairs/nudity.jsonl",),
    "church": ("pairs/church.jsonl",),
    "van_gogh": ("pairs/van_gogh.jsonl",),
    "multi": ("pairs/church.jsonl", "pairs/van_gogh.jsonl"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return base_config(CONCEPTS[arg or "church"]).lock()
