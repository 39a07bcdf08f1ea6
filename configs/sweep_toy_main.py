"""The main job's settings searched: erase circle (full size, as configs/toy_circle.py) over condition dropout x
learning rate x preservation weight (filter threshold 0.25), 18 runs in two stacks (one per dropout rate).

    varejax sweep --config configs/sweep_toy_main.py --workdir runs/sweep_toy_main

What it answers: whether an S-VARE setting of the main job meets issue 15's targets at once (erasure >= 0.95
seen and >= 0.9 paraphrased, preservation drop <= 0.02, toy FID <= 2x its noise floor), and which one
`varejax.toy.job.main_job_config` uses; README, "The main job and its report", quotes it.
"""

from __future__ import annotations

import ml_collections

from varejax.toy.job import main_job_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.base = main_job_config(size=arg or "full")
    config.base.attacks.enabled = False  # the sweep's evaluation measures erasure, preservation and toy FID
    config.base.train.checkpoint_every = 50
    config.grid = (("train.cond_drop_rate", (0.1, 0.0)), ("train.learning_rate", (5e-5, 3e-4, 1e-3)),
                   ("train.reg_lambda", (0.5, 2.0, 10.0)))
    config.stack_size = 9
    return config.lock()
