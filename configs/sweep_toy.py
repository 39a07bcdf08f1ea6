"""A sweep on the embedded toy world: 2 concepts x 3 methods x 2 learning rates x 2 seeds = 24 runs.

    varejax sweep --config configs/sweep_toy.py --workdir runs/sweep_toy
    varejax sweep --config configs/sweep_toy.py:ci --workdir runs/sweep_toy_ci    # fewer steps and prompts

Methods: S-VARE (filtered CE + the preservation step, alternating), and two baselines of the toy
ablation, the ESD-style loss and concept ablation (erase steps only). Each method's 8 runs (concepts x
learning rates x seeds) differ only in per-run numbers, so they train as one stack of 8.
"""

from __future__ import annotations

import ml_collections

from varejax.toy.job import toy_config

CONCEPTS = ({"name": "circle", "toy.concepts": ("circle",), "toy.anchors": ("",)},
            {"name": "striped", "toy.concepts": ("striped",), "toy.anchors": ("plain",)})
METHODS = ({"name": "svare", "train.erase_loss": "fce", "train.mode": "alternating"},
           {"name": "esd", "train.erase_loss": "esd", "train.mode": "erase_only"},
           {"name": "ablation", "train.erase_loss": "concept_ablation", "train.mode": "erase_only"})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "full"
    config = ml_collections.ConfigDict()
    # The erase config every run starts from (its fields: `varejax config show --config configs/toy_circle.py`).
    config.base = toy_config(("circle",), size=size)
    config.base.train.checkpoint_every = 25
    # Axes of (field, values) or (name, dicts of fields): the runs are their product.
    config.grid = (("concept", CONCEPTS), ("method", METHODS), ("train.learning_rate", (3e-4, 1e-3)),
                   ("seed", (0, 1)))
    config.stack_size = 8  # runs trained together in one vmapped step (1 = one after another)
    return config.lock()
