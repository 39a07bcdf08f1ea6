"""The default configuration of an erasure run (the paper's recipe), shared by the files in configs/.

`base_config(pairs)` returns an unlocked ConfigDict; a config file adjusts it (concept pairs, sizes, the
toy world's extra fields) and locks it. Every field is documented where it is set.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from varejax import configlib


def base_config(pairs: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Erasure of Infinity with S-VARE as the official code runs it (50 pairs, 500 iterations, batch 2)."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.infinity = ""      # varejax convert infinity ...
    config.model.t5 = ""            # varejax convert t5 ... (with tokenizer.json)
    config.model.vae = ""           # varejax convert vae ... (only for validation images)
    config.model.min_vocab = 32100

    config.pairs = tuple(pairs)
    config.max_pairs_per_concept = 0  # 0 = all
    config.seed = 0
    config.h_div_w = 1.0
    config.pn = "1M"                  # 13 scales, 1024 px, L = 10521
    config.schedule = ()              # explicit ((1,1,1), ...) overrides h_div_w/pn

    config.prepare = ml_collections.ConfigDict()
    config.prepare.guidance = 4.0     # CFG on logits
    config.prepare.tau = 1.0
    config.prepare.top_k = 900        # a no-op for 2 classes, as upstream
    config.prepare.top_p = 0.97
    config.prepare.seed = 42
    config.prepare.same_seed_for_all_pairs = False  # True = official (seed 42 for every prompt)
    config.prepare.batch_size = 2
    # "" = WORKDIR/trajectories; sweeps point runs that share pairs and these settings at one folder
    config.prepare.trajectory_dir = ""

    config.train = ml_collections.ConfigDict()
    config.train.steps = 500
    config.train.batch_size = 2
    # official "alternating"; "summed" (L_FCE + summed_lambda * KL in one step); "erase_only" (no L_Pre)
    config.train.mode = "alternating"
    config.train.erase_loss = "fce"      # fce | plain_ce | vare_basic | esd | concept_ablation
    config.train.alpha = 0.25            # L_FCE keeps tokens with >= alpha of their bits wrong
    config.train.reg_lambda = 0.5
    config.train.summed_lambda = 1.0
    config.train.esd_eta = 1.0
    config.train.trainable = "ca_ffn"    # ca_ffn | ca_ffn_sa | all | lora
    # LoRA (only with trainable = "lora"; official optional LoRA: rank 4 on mat_qkv, mat_kv, proj).
    config.train.lora_rank = 4
    config.train.lora_alpha = 0.0        # scale = alpha / rank; 0 = alpha equals rank (scale 1)
    config.train.lora_targets = ("mat_qkv", "mat_kv", "proj")  # or sa.mat_qkv, ca.mat_q, ffn.fc1, ...
    # Upstream stores the fine-tuned weights AND the AdamW moments in bf16 (no fp32 master weights).
    config.train.bf16_params = False
    config.train.learning_rate = 2.34375e-5
    config.train.b1 = 0.9
    config.train.b2 = 0.97
    config.train.eps = 1e-8
    config.train.weight_decay = 0.005    # 2-D kernels only
    config.train.max_grad_norm = 5.0
    config.train.cond_drop_rate = 0.1    # official: active during fine-tuning (both passes)
    config.train.drop_path_rate = 0.1    # linear 0 -> 0.1 over the blocks
    config.train.remat = True
    config.train.checkpoint_every = 50

    config.validation = ml_collections.ConfigDict()
    config.validation.prompts = ()       # e.g. ("a church in the snow",); needs config.model.vae
    config.validation.every = 100
    config.validation.guidance = 4.0
    config.validation.tau = 0.5

    config.numerics = ml_collections.ConfigDict(
        {k: v for k, v in configlib.numerics_config(accelerator=True).items() if k not in ("remat",)})
    # Full L x L attention of a 1024 px sequence is 14 GB per layer; blocks of queries fit.
    config.numerics.attention_impl = "chunked"
    config.mesh = configlib.mesh_config()
    return config
