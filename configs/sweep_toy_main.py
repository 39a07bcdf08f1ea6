"""The main job's settings searched: erase circle (full size, as configs/toy_circle.py) over learning rate x
preservation weight x filter threshold, 12 runs in one stack.

    varejax sweep --config configs/sweep_toy_main.py --workdir runs/sweep_toy_main

What it answers: whether any S-VARE setting of the main job meets issue 15's targets at once (erasure >= 0.95
seen and >= 0.9 paraphrased, preservation drop <= 0.02, toy FID <= 2x its noise floor); README, "The main job
and its report", quotes it.
"""

from __future__ import annotations

import ml_collections

from varejax.toy.job import toy_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.base = toy_config(("circle",), size=arg or "full")
    config.base.train.checkpoint_every = 50
    config.grid = (("train.learning_rate", (5e-4, 1e-3)), ("train.reg_lambda", (0.5, 2.0, 5.0)),
                   ("train.alpha", (0.0, 0.25)))
    config.stack_size = 12
    return config.lock()
