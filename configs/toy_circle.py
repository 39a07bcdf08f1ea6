"""The main job: erase the object "circle" from the embedded toy Infinity, on a laptop CPU.

    varejax erase --config configs/toy_circle.py --workdir runs/toy
    varejax erase --config configs/toy_circle.py:ci --workdir runs/toy_ci     # reduced (tests)

Pairs "... circle ..." -> "... cross ..." (the world's default anchor; why cross: see
`varejax.toy.world.default_anchor`); evaluated on seen prompts and unseen paraphrases ("disk", "round
form", ...). Writes results.json, report.md and figures/.
"""

from __future__ import annotations

import ml_collections

from varejax.toy.job import main_job_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return main_job_config(size=arg or "full").lock()
