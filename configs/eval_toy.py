"""Evaluation on the embedded toy world: the toy job's prompt sets, read by the toy oracle.

    varejax eval --config configs/eval_toy.py --workdir runs/eval_toy_base
    varejax eval --config configs/eval_toy.py --workdir runs/eval_toy_erased \
        --config.model.delta="('runs/toy/delta.safetensors',)" \
        --config.eval.options.toy_oracle.reference=runs/eval_toy_base
    varejax compare runs/eval_toy_base runs/eval_toy_erased --names base,erased

The prompt file (configs/prompts/toy_circle.csv) holds the toy job's sets for "circle" (seen prompts and
unseen paraphrases, column `concept`) and the prompts without it (preservation), with the toy job's seeds
(`varejax.eval.toy_scorer.toy_prompt_rows`). Models: the shipped toy assets; sampling: the toy job's.
"""

from __future__ import annotations

import os

import ml_collections

from varejax.eval.run import base_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    from varejax.toy.assets import asset_dir
    from varejax.toy.spec import TOY_MIN_VOCAB, TOY_SCHEDULE

    root = asset_dir()
    config = base_config("toy", os.path.join(HERE, "prompts", "toy_circle.csv"),
                         {"toy_oracle": {"oracle": "",      # "" = the shipped oracle
                                         "reference": "",   # images for the toy FID (e.g. the base model's workdir)
                                         "batch_size": 64}},
                         model={k: str(root / k) for k in ("infinity", "vae", "t5")}, arch="toy")
    config.model.min_vocab = TOY_MIN_VOCAB
    config.schedule = tuple(tuple(s) for s in TOY_SCHEDULE)
    config.sampling.top_k = 0          # as the toy job samples
    config.batch_size = 32
    config.numerics.compute_dtype = "float32"
    config.numerics.matmul_precision = "default"
    config.numerics.remat = False
    config.mesh.shape = (1, 1, 1)      # the toy model is tiny: one device (set (-1, 1, 1) to use them all)
    return config.lock()
