"""Style erasure ("Van Gogh") on Infinity-2B: artist prompts, style classified zero-shot by CLIP, CLIP score.

    varejax eval --config configs/eval_van_gogh.py --workdir runs/eval_van_gogh_base

Prompt file: configs/prompts/van_gogh.csv.
"""

from __future__ import annotations

import os

import ml_collections

from varejax.eval.run import base_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config("style/van_gogh", os.path.join(HERE, "prompts", "van_gogh.csv"),
                         {"clip_zero_shot": {}, "clip_score": {}},  # options: see varejax/eval/clip_metrics.py
                         arch=arg or "2b")
    return config.lock()
