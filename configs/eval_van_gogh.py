"""Style erasure ("Van Gogh") on Infinity-2B: artist prompts, style classified zero-shot by CLIP, CLIP score.

    varejax eval --config configs/eval_van_gogh.py --workdir runs/eval_van_gogh_base

Prompt file: configs/prompts/van_gogh.csv.
"""

from __future__ import annotations

import os

import ml_collections

from varejax.eval.run import base_config

HERE = os.path.dirname(os.path.abspath(__file__))
# The painters of configs/prompts/van_gogh.csv (column `class`), classified with the "artists" templates.
CLASSES = ("Van Gogh", "Claude Monet", "Pablo Picasso", "Andy Warhol", "Caravaggio", "Rembrandt", "Katsushika Hokusai")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config("style/van_gogh", os.path.join(HERE, "prompts", "van_gogh.csv"),
                         # options: see varejax/eval/clip_metrics.py (model_dir: `varejax convert clip` output)
                         {"clip_zero_shot": {"model_dir": "models/clip_vit_b_32", "protocol": "artists",
                                             "classes": CLASSES,  # the prompt file's `class` values
                                             "erased_class": "Van Gogh", "class_column": "class", "topk": 1,
                                             "batch_size": 32},
                          "clip_score": {"model_dir": "models/clip_vit_b_32", "batch_size": 32}},
                         arch=arg or "2b")
    return config.lock()
