"""Training of the toy world's models (`varejax toy train`): oracle, BSQ-VAE tokenizer, T5 + Infinity.

    varejax toy train --workdir runs/toy                          # ~2 h 10 min on 2 CPU cores
    varejax toy train --workdir runs/toy --config.install=True    # and replace varejax/toy/assets/
    varejax toy train --workdir /tmp/t --config configs/toy_train.py:smoke   # tiny models, seconds
    varejax toy eval --workdir runs/toy_eval [--models runs/toy/models]     # only the evaluation (config.eval)

The shipped assets are what this config (seed 0) produces with `--config.install=True`; world.json records
the config and every stage's time. Two choices make the training fit on a CPU (README, "The toy world"):
the tokenizer packs 2x2 pixels into channels (`vae.pixel_unshuffle=2`: its convolutions run at 32x32), and
the transformer's tokens hold 2x2 latent patches (`spec.TOY_PATCHIFY`, Infinity 8B's spatial patchify:
30 tokens per image instead of 121), so the text-to-image stage gets four times the samples per second.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown toy_train config argument {arg!r} (use nothing or 'smoke')")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.install = False          # copy the trained folders into varejax/toy/assets/
    config.quiet = False
    config.reuse_dir = ""           # a finished run's models/ folder: copy its oracle and tokenizer (same seed
                                    # and config give the same ones) instead of retraining them
    config.reuse_t2i = False        # with reuse_dir: copy its T5 + Infinity too (they see only the encoder's
                                    # bits, which the decoder refinement does not change)

    config.data = ml_collections.ConfigDict()
    config.data.n_train = 64 if smoke else 32000   # oracle and tokenizer
    config.data.n_latent = 64 if smoke else 32000   # the first n_latent of them train T5 + Infinity
    config.data.n_heldout = 32 if smoke else 1000
    config.data.pattern_phase = "grid"  # dots and stripes aligned to the last scale's tokens ("free": any phase)
    config.data.eval_batch = 16 if smoke else 128   # batch of the tokenizer/oracle passes over data sets

    config.oracle = ml_collections.ConfigDict()
    config.oracle.channels = (8, 8, 8) if smoke else (16, 32, 64, 128, 128)
    config.oracle.feature_dim = 16 if smoke else 128
    config.oracle.steps = 2 if smoke else 1200
    config.oracle.batch_size = 8 if smoke else 64
    config.oracle.learning_rate = 2e-3
    config.oracle.warmup = 50
    config.oracle.weight_decay = 1e-4
    config.oracle.noise = 0.08      # Gaussian pixel noise of std U(0, noise) (robustness to decoded images)
    config.oracle.blur = 1.2        # Gaussian blur of std U(0, blur) px (decoded images are smoother)
    config.oracle.log_every = 100
    # Optional adaptation to decoded images (after the tokenizer): fine-tune on tokenizer round trips of
    # labelled training images mixed 1:1 with the originals. Off for the shipped oracle: on the previous world
    # (unpatchified, full-resolution tokenizer) 600 steps raised its shape accuracy on reconstructions from
    # 0.742 to 0.863 but lowered it on rendered held-out images to 0.986 (< 0.99), and it read the base
    # model's soft shapes as hearts and stars instead of circles.
    config.oracle.adapt_images = 16 if smoke else 4000
    config.oracle.adapt_steps = 2 if smoke else 0
    config.oracle.adapt_learning_rate = 1e-3

    config.vae = ml_collections.ConfigDict()
    config.vae.codebook_dim = 16 if smoke else 32  # bits per latent: 16 lost the shape of 1 round trip in 11
    config.vae.patch_size = 8
    config.vae.base_ch = 24 if smoke else 48   # 48: GroupNorm keeps 2 channels per group (24 groups)
    config.vae.ch_mult = (1, 1, 1)
    config.vae.num_res_blocks = 1
    config.vae.pixel_unshuffle = 2  # f > 1: f x f pixels packed into channels, convolutions at 1/f resolution
    config.vae.steps = 2 if smoke else 3000
    config.vae.batch_size = 4 if smoke else 8
    config.vae.learning_rate = 2e-3
    config.vae.warmup = 30
    config.vae.weight_decay = 0.0
    config.vae.commit_weight = 0.05
    # Optional decoder refinement: the decoder alone on (summed codes -> image) of the n_latent images, encoder
    # frozen. Off for the shipped assets: on the previous world's tokenizer, 100 steps at batch 16 left the
    # reconstruction loss where the joint training ended (0.1835): its limit was its bits, not the decoder.
    config.vae.refine_steps = 2 if smoke else 0
    config.vae.refine_batch_size = 4 if smoke else 16
    config.vae.refine_learning_rate = 1e-3
    config.vae.log_every = 50

    config.t2i = ml_collections.ConfigDict()
    config.t2i.steps = 2 if smoke else 6000
    config.t2i.batch_size = 4 if smoke else 32
    config.t2i.learning_rate = 1e-3
    config.t2i.restarts = () if smoke else (8000, 8000, 8000)   # warm restarts after the first cycle (steps each)
    config.t2i.restart_learning_rate = 5e-4
    config.t2i.warmup = 60
    config.t2i.b2 = 0.97
    config.t2i.weight_decay = 0.05
    config.t2i.noise_strength = 0.3     # bitwise self-correction (upstream 0.3)
    config.t2i.log_every = 50
    config.t2i.t5 = ml_collections.ConfigDict()
    config.t2i.t5.d_model = 128         # Infinity's text pool needs text width >= 128
    config.t2i.t5.num_layers = 1 if smoke else 2
    config.t2i.t5.num_heads = 4
    config.t2i.t5.d_kv = 32
    config.t2i.t5.d_ff = 64 if smoke else 256
    config.t2i.infinity = ml_collections.ConfigDict()
    config.t2i.infinity.depth = 1 if smoke else 4
    config.t2i.infinity.embed_dim = 64 if smoke else 128
    config.t2i.infinity.num_heads = 4
    config.t2i.infinity.mlp_ratio = 4.0 if smoke else 2.0
    config.t2i.infinity.text_maxlen = 32
    config.t2i.infinity.block_chunks = 1
    config.t2i.infinity.pad_to_multiplier = 1
    config.t2i.infinity.cond_drop_rate = 0.1
    config.t2i.infinity.drop_path_rate = 0.0

    config.eval = ml_collections.ConfigDict()
    config.eval.n = 4 if smoke else 128          # prompts per family (all three attributes said)
    config.eval.n_circle = 4 if smoke else 64    # "circle" prompts per family
    config.eval.batch_size = 4 if smoke else 64
    config.eval.cfg = 4.0           # cfg 3-4 (tau 1): the best shape and colour following of the toy model
    config.eval.tau = 1.0
    config.eval.top_p = 0.97
    config.eval.greedy = False
    return config.lock()
