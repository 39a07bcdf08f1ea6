"""Object erasure ("church") on Infinity-2B: church prompts, classified zero-shot by CLIP, plus CLIP score.

    varejax eval --config configs/eval_church.py --workdir runs/eval_church_base
    varejax eval --config configs/eval_church.py --workdir runs/eval_church_svare \
        --config.model.infinity=runs/church/model

Prompt file: configs/prompts/church.csv. Erasure rate: the share of images CLIP does not classify as a
church (scorer "clip_zero_shot"); prompt alignment: "clip_score".
"""

from __future__ import annotations

import os

import ml_collections

from varejax.eval.run import base_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config("object/church", os.path.join(HERE, "prompts", "church.csv"),
                         # options: see varejax/eval/clip_metrics.py (model_dir: `varejax convert clip` output)
                         {"clip_zero_shot": {"model_dir": "models/clip_vit_b_32", "protocol": "imagenette",
                                             "erased_class": "church", "class_column": "class", "topk": 1,
                                             "batch_size": 32},
                          "clip_score": {"model_dir": "models/clip_vit_b_32", "batch_size": 32}},
                         arch=arg or "2b")
    return config.lock()
