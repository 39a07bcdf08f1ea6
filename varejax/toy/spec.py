"""The toy world's fixed model layout, shared by training (`train.py`), the shipped assets (`assets.py`),
evaluation and the main job: schedules, text length and the names of the files a run writes.

Kept apart so that loading the shipped models never imports the trainer.
"""

from __future__ import annotations

# Transformer scales. Each token holds a 2x2 patch of latents (Infinity 8B's spatial patchify, 4 x 16 = 64
# bits), so the tokenizer's scales are twice as large (TOY_VAE_SCHEDULE: 2, 4, 6, 8): a training sequence
# has 30 tokens instead of the 121 of scales (1, 2, 4, 6, 8) on the same 8x8 latent grid, and a training
# step costs a quarter as much (measured 0.24 s vs 0.96 s at batch 32 on 2 CPU cores).
TOY_SCHEDULE = ((1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4))
TOY_PATCHIFY = True
TOY_VAE_SCHEDULE = tuple((1, 2 * h, 2 * w) for _, h, w in TOY_SCHEDULE)
TOY_MIN_VOCAB = 32         # the toy tokenizer has ~100 entries (T5Tokenizer refuses < min_vocab)
TEXT_LENGTH = 32           # training pads prompts to this many tokens (every world prompt fits)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
MODEL_NAMES = ("infinity", "vae", "t5", "oracle")
WORLD_FILE = "world.json"
EVAL_FILE = "evaluation.json"
