"""Image quality on COCO-style captions: FID against reference images and CLIP score.

    varejax eval --config configs/eval_quality.py --workdir runs/eval_quality_base
    varejax eval --config configs/eval_quality.py --workdir runs/eval_quality_mine \
        --config.prompts.file=my_captions.csv --config.prompts.limit=1000

Prompt file: configs/prompts/coco_style.csv, or a user's own CSV / JSONL with a `prompt` column (and
`evaluation_seed`; rows without one get config.prompts.seed + row number).
"""

from __future__ import annotations

import os

import ml_collections

from varejax.eval.run import base_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config("quality", os.path.join(HERE, "prompts", "coco_style.csv"),
                         # options: varejax/eval/fid.py, varejax/eval/clip_metrics.py
                         {"fid": {"model_dir": "models/inception",         # `varejax convert inception` output
                                  "reference": "data/coco_val_images",     # stats .npz, image folder or images .npz
                                  "cache_dir": None, "batch_size": 32},
                          "clip_score": {"model_dir": "models/clip_vit_b_32", "batch_size": 32}},
                         arch=arg or "2b")
    return config.lock()
