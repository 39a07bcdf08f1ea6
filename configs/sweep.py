"""The Infinity-2B sweep: 3 concepts x 2 alphas x 2 learning rates = 12 S-VARE runs.

    varejax sweep --config configs/sweep.py --workdir runs/sweep \
        --config.base.model.infinity=models/infinity_2b --config.base.model.t5=models/flan_t5_xl \
        --config.base.model.vae=models/vae_d32

Every run is the paper's recipe (configs/erase.py) with its concept's pairs, alpha and learning rate.
Runs that share a concept share its VARE trajectories; all 12 differ only in per-run numbers, so they
train in stacks of `stack_size` (the run axis goes over the mesh's data axis: with 8 chips, data=8 and
one stack of 8, then one of 4). Each run is scored by its training metrics until the evaluation harness
scores images (`varejax eval`). On a pod: launch/tpu_pod.sh or launch/slurm.sbatch (README, "Pods and
clusters").
"""

from __future__ import annotations

import ml_collections

from varejax.erase.defaults import base_config

CONCEPTS = tuple({"name": name, "pairs": (f"pairs/{name}.jsonl",)} for name in ("nudity", "church", "van_gogh"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.base = base_config(("pairs/church.jsonl",))  # pair paths: relative to this folder
    config.base.mesh.shape = (-1, 1, 1)   # every device on the run axis (data)
    config.grid = (("concept", CONCEPTS), ("train.alpha", (0.25, 0.5)),
                   ("train.learning_rate", (2.34375e-5, 4.6875e-5)))
    config.stack_size = 8
    return config.lock()
