"""`varejax toy train`: trains the toy world's models from scratch in JAX, deterministically from a seed.

Stages (each timed; `run` writes model folders to WORKDIR/models and logs to WORKDIR/train.log):

1. data: `world.dataset` images for training and a held-out set (disjoint seeds).
2. oracle: the attribute classifier (`oracle.py`), AdamW on the three cross entropies; its held-out
   accuracy is measured on fresh images and stored in its config.json.
3. tokenizer: a small BSQ-VAE (`VAEConfig`) trained on reconstruction (L1 + L2) through the multi-scale
   BSQ quantiser of TOY_VAE_SCHEDULE with straight-through gradients (`quantize_st`), plus a small
   commitment term; the oracle's accuracy on decoded reconstructions (encode -> `multiscale_quantize`
   -> decode, the sampler's path) is measured.
4. text-to-image: the T5 encoder (own WordLevel tokenizer.json over the world's vocabulary) and the
   Infinity transformer trained jointly with the bitwise loss (`bit_loss.loss_fn`, reweighted by scale)
   on (prompt, image) pairs: the frozen tokenizer's raw features (computed once) ->
   `bitwise.transformer_inputs` with bitwise self-correction and 2x2 spatial patchify (TOY_SCHEDULE) ->
   teacher-forced loss; gradients reach the T5 too. A fresh prompt (random family, random subset of the
   attributes said) is drawn for each image every time it is used. Condition dropout (cond_drop_rate)
   makes classifier-free guidance work.
5. evaluation: the written folders are loaded with `Pipeline.from_dirs` and sampled with CFG; the oracle
   reads the attributes of the images (prompt following per family and attribute, and how often
   "circle" prompts give circles).

The folders are those `varejax convert` writes (formats varejax-infinity/1, varejax-vae/1, varejax-t5/1
with tokenizer.json), plus the oracle (varejax-toy-oracle/1) and `world.json` (world version, schedules,
accuracies, timings, config). `--config.install=True` copies them into varejax/toy/assets/.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varejax.toy import oracle, world
from varejax.toy.spec import (
    MODEL_NAMES,
    SPECIAL_TOKENS,
    TEXT_LENGTH,
    TOY_MIN_VOCAB,
    TOY_PATCHIFY,
    TOY_SCHEDULE,
    TOY_VAE_SCHEDULE,
    WORLD_FILE,
)

# ---- small helpers -----------------------------------------------------------------------------------

class Logger:
    """Prints and appends to WORKDIR/train.log."""

    def __init__(self, path: Path | None, quiet: bool = False):
        self.path, self.quiet = path, quiet
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def _schedule_fn(lr: float, warmup: int, steps: int) -> optax.Schedule:
    warmup = max(1, min(warmup, steps - 1)) if steps > 1 else 1
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05)


def _adamw(lr: float, warmup: int, steps: int, weight_decay: float, b2: float = 0.99,
           clip: float = 1.0) -> optax.GradientTransformation:
    """Clipping + AdamW (decoupled decay on the >= 2-D tensors only, as optax.adamw with a mask),
    flattened into one vector: a handful of large ops instead of a few per parameter (faster on CPU,
    and much faster to compile)."""
    from jax.flatten_util import ravel_pytree

    def init(params):
        return {"decay_mask": jnp.zeros_like(params)}

    def update(updates, state, params):
        return updates + weight_decay * state["decay_mask"] * params, state

    inner = optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(b1=0.9, b2=b2),
                        optax.GradientTransformation(init, update),
                        optax.scale_by_learning_rate(_schedule_fn(lr, warmup, steps)))
    flat_tx = optax.flatten(inner)

    def init_with_mask(params):
        state = flat_tx.init(params)
        mask = ravel_pytree(jax.tree.map(lambda v: jnp.full(v.shape, float(v.ndim >= 2), v.dtype), params))[0]
        # the decay mask lives in the optimiser state (no large constant in the compiled step)
        state = list(state)
        state[2] = {"decay_mask": mask}
        return tuple(state)

    return optax.GradientTransformation(init_with_mask, flat_tx.update)


def _flat(state) -> dict[tuple[str, ...], jax.Array]:
    from varejax.models.apply import flat_params
    return {k: jnp.asarray(v) for k, v in flat_params(state).items()}


def _host(flat: dict) -> dict[tuple[str, ...], np.ndarray]:
    return {k: np.asarray(v) for k, v in flat.items()}


def params_sha256(flat: dict[tuple[str, ...], Any]) -> str:
    """sha256 over the parameter names, shapes, dtypes and bytes (identifies trained weights)."""
    h = hashlib.sha256()
    for key in sorted(flat):
        value = np.ascontiguousarray(np.asarray(flat[key]))
        h.update(".".join(key).encode() + str(value.shape).encode() + str(value.dtype).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _batches(rng: np.random.Generator, n: int, batch: int):
    """Endless shuffled epochs of index batches."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def _to_float(images_u8: jax.Array) -> jax.Array:
    x = images_u8.astype(jnp.float32) / 255.0
    return x + x - 1.0


# ---- tokenizer for text ------------------------------------------------------------------------------

def build_tokenizer():
    """The toy T5's WordLevel `tokenizers.Tokenizer` over the world's vocabulary.

    <pad>=0, </s>=1, <unk>=2, then the words in sorted order; lowercase normaliser, `Whitespace`
    pre-tokenizer (words and punctuation runs), and T5's "$A </s>" post-processor.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    pre = pre_tokenizers.Whitespace()
    words = set()
    for word in world.vocabulary():
        words.update(piece.lower() for piece, _ in pre.pre_tokenize_str(word))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


# ---- oracle ------------------------------------------------------------------------------------------

def train_oracle(config, data: world.Dataset, log: Callable[[str], None], seed: int = 0, init: Any = None,
                 steps: int | None = None, learning_rate: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Trains the classifier on `data` (images, labels) -> (parameter state, record).

    init: parameters to start from (fine-tuning); steps / learning_rate override the config's.
    """
    cfg = oracle.OracleConfig(channels=tuple(config.channels), feature_dim=config.feature_dim)
    state = oracle.init_params(cfg, seed=seed) if init is None else init
    flat = _flat(state)
    steps = int(config.steps if steps is None else steps)
    lr = float(config.learning_rate if learning_rate is None else learning_rate)
    tx = _adamw(lr, config.warmup, steps, config.weight_decay)
    opt_state = tx.init(flat)
    noise, blur = float(config.noise), float(config.blur)

    def loss_fn(flat, images, labels, key):
        params = oracle.state_from_flat(cfg, flat)
        x = _to_float(images)
        k_sigma, k_noise, k_blur = jax.random.split(key, 3)
        x = _random_blur(x, blur * jax.random.uniform(k_blur, (x.shape[0],)))
        sigma = noise * jax.random.uniform(k_sigma, (x.shape[0], 1, 1, 1))
        x = x + sigma * jax.random.normal(k_noise, x.shape)
        logits = oracle.logits(params, x)
        losses = [optax.softmax_cross_entropy_with_integer_labels(logits[n], labels[n]).mean()
                  for n in world.ATTRIBUTE_NAMES]
        return sum(losses)

    @jax.jit
    def step(flat, opt_state, images, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(flat, images, labels, key)
        updates, opt_state = tx.update(grads, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    batches = _batches(rng, len(data.images), config.batch_size)
    start, losses = time.time(), []
    for i in range(steps):
        idx = next(batches)
        labels = {n: jnp.asarray(data.labels[n][idx], jnp.int32) for n in world.ATTRIBUTE_NAMES}
        flat, opt_state, loss = step(flat, opt_state, data.images[idx], labels, jax.random.fold_in(key, i))
        losses.append(loss)
        if (i + 1) % config.log_every == 0 or i + 1 == steps:
            log(f"oracle step {i + 1}/{steps} loss {float(np.mean(jax.device_get(losses))):.4f} "
                f"({time.time() - start:.0f}s)")
            losses = []
    return oracle.state_from_flat(cfg, flat), {"steps": steps, "batch_size": config.batch_size, "learning_rate": lr}


def adapt_oracle(config, oracle_params, vae_cfg, vae_params, raw: np.ndarray, data: world.Dataset,
                 log: Callable[[str], None], seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Fine-tunes the oracle on tokenizer round trips of labelled images, mixed 1:1 with the originals.

    Everything the erased and original models draw comes out of the tokenizer's decoder, whose images are
    smoother than rendered ones (rounded corners, soft star points): an oracle trained on renders only
    reads a decoded square as a circle. `raw` are the encoder features of `data.images[:len(raw)]`; the
    first `config.adapt_images` of them are decoded through the sampler's path (bits -> summed codes).
    """
    n = min(int(config.adapt_images), len(raw))
    decoded = decode_codes(vae_cfg, vae_params, summed_codes(raw[:n]))
    mixed = world.Dataset(np.concatenate([decoded, data.images[:n]]),
                          {k: np.concatenate([v[:n], v[:n]]) for k, v in data.labels.items()},
                          list(data.prompts[:n]) * 2, list(data.families[:n]) * 2,
                          np.concatenate([data.mentions[:n], data.mentions[:n]]))
    params, record = train_oracle(config, mixed, log, seed + 7, init=oracle_params, steps=config.adapt_steps,
                                  learning_rate=config.adapt_learning_rate)
    return params, {**record, "images": n, "mixed_with_originals": True}


def _random_blur(x_BHWC: jax.Array, sigma_B: jax.Array, radius: int = 2) -> jax.Array:
    """Separable Gaussian blur with a per-image std (0 = identity), edges replicated (augmentation: decoded
    images are smoother than rendered ones)."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * jnp.square(taps[None, :] / jnp.maximum(sigma_B[:, None], 1e-3)))
    w = w / jnp.sum(w, axis=1, keepdims=True)                                     # [B, taps]
    H, W = x_BHWC.shape[1:3]
    xp = jnp.pad(x_BHWC, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    x = sum(w[:, k, None, None, None] * xp[:, k:k + H] for k in range(2 * radius + 1))
    xp = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w[:, k, None, None, None] * xp[:, :, k:k + W] for k in range(2 * radius + 1))


# ---- tokenizer (BSQ-VAE) -----------------------------------------------------------------------------

def quantize_st(raw_BHWd: jax.Array, schedule) -> tuple[jax.Array, jax.Array]:
    """Multi-scale BSQ of `bitwise.multiscale_quantize` with straight-through gradients.

    Forward values equal `multiscale_quantize(raw).z_quantized` (up to float rounding); each scale's
    code passes the gradient to its own (area-downsampled, l2-normalised) residual, as upstream's
    `u + (zhat - u).detach()`, and the residual update is detached. Returns (z, commitment loss), the
    commitment being the mean squared distance of each normalised residual to its code (summed over
    the channels, averaged over positions and scales).
    """
    from varejax.models import bitwise

    sizes = bitwise.scale_sizes(schedule)
    final = tuple(raw_BHWd.shape[1:3])
    d = raw_BHWd.shape[-1]
    s = float(bitwise.codebook_scale(d))
    residual = raw_BHWd.astype(jnp.float32)
    z = jnp.zeros_like(residual)
    commit = 0.0
    for hw in sizes:
        r = bitwise.area_resize(residual, hw) if hw != final else residual
        u = r / jnp.maximum(jnp.sqrt(jnp.sum(r * r, axis=-1, keepdims=True)), 1e-12)
        zhat = jnp.where(u > 0, s, -s)
        q = u + jax.lax.stop_gradient(zhat - u)
        commit = commit + jnp.mean(jnp.sum(jnp.square(u - jax.lax.stop_gradient(zhat)), axis=-1))
        q = bitwise.bilinear_resize(q, final) if hw != final else q
        residual = residual - jax.lax.stop_gradient(q)
        z = z + q
    return z, commit / len(sizes)


def train_vae(config, data: world.Dataset, log: Callable[[str], None], seed: int = 0
              ) -> tuple[Any, Any, dict[str, Any]]:
    """Trains the BSQ-VAE on `data` images -> (VAEConfig, parameter state, record)."""
    from varejax.models import bsq_vae

    cfg = bsq_vae.VAEConfig(codebook_dim=config.codebook_dim, patch_size=config.patch_size,
                            ch_mult=tuple(config.ch_mult), base_ch=config.base_ch,
                            num_res_blocks=config.num_res_blocks, pixel_unshuffle=config.pixel_unshuffle,
                            matmul_precision="default")
    state = bsq_vae.init_vae_params(cfg, seed=seed + 1)
    flat = _flat(state)
    tx = _adamw(config.learning_rate, config.warmup, config.steps, config.weight_decay)
    opt_state = tx.init(flat)
    schedule = TOY_VAE_SCHEDULE

    def loss_fn(flat, images):
        model = bsq_vae.bind_vae(bsq_vae.vae_state_from_flat(cfg, flat), cfg)
        x = _to_float(images)
        raw = model.encoder(x)
        z, commit = quantize_st(raw, schedule)
        y = model.decoder(z)
        rec = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x))
        return rec + config.commit_weight * commit, (rec, commit)

    @jax.jit
    def step(flat, opt_state, images):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(flat, images)
        updates, opt_state = tx.update(grads, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, aux

    rng = np.random.default_rng(seed + 1)
    batches = _batches(rng, len(data.images), config.batch_size)
    start, recs, commits = time.time(), [], []
    for i in range(config.steps):
        flat, opt_state, (rec, commit) = step(flat, opt_state, data.images[next(batches)])
        recs.append(rec)
        commits.append(commit)
        if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
            log(f"vae step {i + 1}/{config.steps} rec {float(np.mean(jax.device_get(recs))):.4f} "
                f"commit {float(np.mean(jax.device_get(commits))):.4f} ({time.time() - start:.0f}s)")
            recs, commits = [], []
    saved = cfg.replace(matmul_precision="highest")  # the converter's default numerics (same on CPU)
    return saved, bsq_vae.vae_state_from_flat(saved, flat), {"steps": config.steps, "batch_size": config.batch_size}


def map_batches(fn: Callable[[jax.Array], jax.Array], array: np.ndarray, batch: int = 128) -> np.ndarray:
    """`fn` over `array` in full batches of `batch` (the last one padded by repetition: one compiled shape),
    results concatenated as numpy, padding dropped."""
    out = []
    for start in range(0, len(array), batch):
        chunk = array[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(fn(jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


def summed_codes(raw_NhwD: np.ndarray, batch: int = 128) -> np.ndarray:
    """The decoder's inputs on the sampler's path: raw features -> multi-scale bits -> summed codes."""
    from varejax.models import bitwise

    return map_batches(lambda raw: bitwise.decode_bits_jit(
        bitwise.multiscale_quantize_jit(raw, TOY_VAE_SCHEDULE).bits, TOY_VAE_SCHEDULE), raw_NhwD, batch)


def refine_decoder(config, vae_cfg, vae_params, codes: np.ndarray, images_u8: np.ndarray,
                   log: Callable[[str], None], seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Trains the decoder alone on (summed codes -> image), encoder frozen -> (parameter state, record).

    The bits of every image are unchanged (the encoder is untouched), so the transformer's training
    data does not depend on this stage; the joint training is short on 2 cores and leaves the decoder
    the weaker half (blurred star points and heart lobes), which this cheaper stage fixes.
    """
    from varejax.models import bsq_vae

    flat = _flat(vae_params)
    decoder = {k: v for k, v in flat.items() if k[0] == "decoder"}
    frozen = {k: v for k, v in flat.items() if k[0] != "decoder"}
    work_cfg = vae_cfg.replace(matmul_precision="default")
    tx = _adamw(config.refine_learning_rate, config.warmup, config.refine_steps, config.weight_decay)
    opt_state = tx.init(decoder)

    def loss_fn(decoder, codes, images):
        model = bsq_vae.bind_vae(bsq_vae.vae_state_from_flat(work_cfg, {**frozen, **decoder}), work_cfg)
        x = _to_float(images)
        y = model.decoder(codes)
        return jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x))

    @jax.jit
    def step(decoder, opt_state, codes, images):
        loss, grads = jax.value_and_grad(loss_fn)(decoder, codes, images)
        updates, opt_state = tx.update(grads, opt_state, decoder)
        return optax.apply_updates(decoder, updates), opt_state, loss

    rng = np.random.default_rng(seed + 5)
    batches = _batches(rng, len(codes), config.refine_batch_size)
    start, losses = time.time(), []
    for i in range(config.refine_steps):
        idx = next(batches)
        decoder, opt_state, loss = step(decoder, opt_state, jnp.asarray(codes[idx]), images_u8[idx])
        losses.append(loss)
        if (i + 1) % config.log_every == 0 or i + 1 == config.refine_steps:
            log(f"decoder step {i + 1}/{config.refine_steps} rec {float(np.mean(jax.device_get(losses))):.4f} "
                f"({time.time() - start:.0f}s)")
            losses = []
    saved = work_cfg.replace(matmul_precision="highest")
    return bsq_vae.vae_state_from_flat(saved, {**frozen, **decoder}), {
        "steps": config.refine_steps, "batch_size": config.refine_batch_size,
        "learning_rate": config.refine_learning_rate, "images": len(codes)}


def encode_raw(vae_cfg, vae_params, images_u8: np.ndarray, batch: int = 128) -> np.ndarray:
    """Raw tokenizer features [N, h, w, d] float32 of uint8 images."""
    from varejax.models import bsq_vae

    return map_batches(lambda x: bsq_vae.encode_jit(vae_params, _to_float(x), vae_cfg), images_u8, batch)


def decode_codes(vae_cfg, vae_params, codes: np.ndarray, batch: int = 128) -> np.ndarray:
    """uint8 images of summed codes."""
    from varejax import images as image_io
    from varejax.models import bsq_vae

    return image_io.to_uint8(map_batches(lambda c: bsq_vae.decode_jit(vae_params, c, vae_cfg), codes, batch))


def reconstruct(vae_cfg, vae_params, images_u8: np.ndarray, batch: int = 128) -> np.ndarray:
    """uint8 reconstructions through the sampler's path: encode -> multi-scale bits -> summed codes -> decode."""
    codes = summed_codes(encode_raw(vae_cfg, vae_params, images_u8, batch), batch)
    return decode_codes(vae_cfg, vae_params, codes, batch)


# ---- T5 + Infinity -----------------------------------------------------------------------------------

def _text_batch(tokenizer, labels: dict[str, np.ndarray], idx: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    prompts = []
    for i in idx:
        attrs = world.attributes_at(labels, int(i))
        family = world.FAMILIES[int(rng.integers(len(world.FAMILIES)))]
        prompts.append(world.prompt(attrs, rng, family))
    ids, mask, _ = tokenizer(prompts, max_length=TEXT_LENGTH)
    return ids, mask


def train_text_to_image(config, raw: np.ndarray, labels: dict[str, np.ndarray], tokenizer,
                        log: Callable[[str], None], seed: int = 0, start_from: tuple[Any, Any, int] | None = None
                        ) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """Trains T5 and Infinity jointly -> (T5Config, T5 state, InfinityConfig, Infinity state, record).

    Training runs in cycles: `config.steps` steps, then one warm restart per entry of `config.restarts`
    (its length in steps), each with its own warmup + cosine schedule (peak `config.learning_rate`, then
    `config.restart_learning_rate`), a fresh AdamW state and its own seeded batch stream. A cycle depends
    only on the weights it starts from, so `start_from=(t5 state, Infinity state, cycles done)` (a
    finished run's weights) continues to exactly what a run from scratch gives.
    """
    from varejax.models import apply, bit_loss, bitwise, t5
    from varejax.models.config import InfinityConfig

    t5_cfg = t5.T5Config(vocab_size=-(-tokenizer.vocab_size // 8) * 8, d_model=config.t5.d_model,
                         num_layers=config.t5.num_layers, num_heads=config.t5.num_heads, d_kv=config.t5.d_kv,
                         d_ff=config.t5.d_ff, feed_forward_proj="gated-gelu", matmul_precision="default")
    c = config.infinity
    inf_cfg = InfinityConfig(depth=c.depth, embed_dim=c.embed_dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                             text_channels=t5_cfg.d_model, text_maxlen=c.text_maxlen, codebook_dim=raw.shape[-1],
                             apply_spatial_patchify=TOY_PATCHIFY, block_chunks=c.block_chunks,
                             pad_to_multiplier=c.pad_to_multiplier, cond_drop_rate=c.cond_drop_rate,
                             drop_path_rate=c.drop_path_rate, matmul_precision="default")
    if start_from is None:
        flat = {"t5": _flat(t5.init_params(t5_cfg, seed=seed + 2)),
                "infinity": _flat(apply.init_params(inf_cfg, seed=seed + 3))}
        done = 0
    else:
        flat = {"t5": _flat(start_from[0]), "infinity": _flat(start_from[1])}
        done = int(start_from[2])
    schedule = TOY_SCHEDULE
    noise_layers = len(schedule) if config.noise_strength > 0 else 0

    def loss_fn(flat, ids, mask, raw_batch, key):
        t5_params = t5.state_from_flat(t5_cfg, flat["t5"])
        inf_params = apply.state_from_flat(inf_cfg, flat["infinity"])
        k_noise, k_model = jax.random.split(key)
        gt, x = bitwise.transformer_inputs(raw_batch, schedule, noise_apply_layers=noise_layers,
                                           noise_apply_strength=config.noise_strength, rng=k_noise,
                                           apply_spatial_patchify=TOY_PATCHIFY)
        text = t5.forward(t5_params, ids, mask, t5_cfg) * mask[..., None].astype(jnp.float32)
        return bit_loss.loss_fn(inf_params, text, mask, x, gt, schedule, cfg=inf_cfg, reweight_by_scale=True,
                                rng=k_model)

    cycles = [(int(config.steps), float(config.learning_rate))]
    cycles += [(int(n), float(config.restart_learning_rate)) for n in config.restarts]
    start, history, offset = time.time(), [], sum(n for n, _ in cycles[:done])
    for cycle, (steps, lr) in enumerate(cycles):
        if cycle < done:
            continue
        tx = _adamw(lr, config.warmup, steps, config.weight_decay, b2=config.b2)
        opt_state = tx.init(flat)

        @jax.jit
        def step(flat, opt_state, ids, mask, raw_batch, key, tx=tx):
            loss, grads = jax.value_and_grad(loss_fn)(flat, ids, mask, raw_batch, key)
            updates, opt_state = tx.update(grads, opt_state, flat)
            return optax.apply_updates(flat, updates), opt_state, loss

        # cycle 0 keeps the streams of a single-cycle run (seed + 2); later cycles get their own
        rng = np.random.default_rng(seed + 2 + 1000 * cycle)
        key = jax.random.key(seed + 2)
        batches = _batches(rng, len(raw), config.batch_size)
        losses = []
        for i in range(steps):
            idx = next(batches)
            ids, mask = _text_batch(tokenizer, labels, idx, rng)
            flat, opt_state, loss = step(flat, opt_state, ids, mask, raw[idx], jax.random.fold_in(key, offset + i))
            losses.append(loss)
            if (i + 1) % config.log_every == 0 or i + 1 == steps:
                mean = float(np.mean(jax.device_get(losses)))
                history.append([offset + i + 1, round(mean, 5)])
                log(f"t2i cycle {cycle + 1}/{len(cycles)} step {i + 1}/{steps} loss {mean:.4f} "
                    f"({time.time() - start:.0f}s)")
                losses = []
        offset += steps
    t5_saved = t5_cfg.replace(matmul_precision="highest")
    inf_saved = inf_cfg.replace(matmul_precision="highest")
    record = {"steps": offset, "cycles": len(cycles), "cycle_steps": [n for n, _ in cycles],
              "batch_size": config.batch_size, "loss_history": history}
    return (t5_saved, t5.state_from_flat(t5_saved, flat["t5"]), inf_saved,
            apply.state_from_flat(inf_saved, flat["infinity"]), record)


# ---- model folders -----------------------------------------------------------------------------------

def _source(flat_host: dict, extra: dict[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    sha = {"params": params_sha256(flat_host), **(extra or {})}
    return {"path": "varejax toy train", "layout": "trained", "sha256": sha, "seed": seed,
            "world_version": world.WORLD_VERSION}


def write_infinity(out: Path, cfg, params, record: dict[str, Any], seed: int) -> None:
    from varejax.checkpoint import FORMATS, write_model_dir
    from varejax.models.apply import flat_params

    flat = _host(flat_params(params))
    write_model_dir(out, flat, {"format": FORMATS["infinity"], "model": cfg.to_dict(),
                                "source": _source(flat, seed=seed), "training": record}, overwrite=True)


def write_vae(out: Path, cfg, params, record: dict[str, Any], seed: int) -> None:
    from varejax.checkpoint import FORMATS, write_model_dir
    from varejax.models.apply import flat_params

    flat = _host(flat_params(params))
    write_model_dir(out, flat, {"format": FORMATS["vae"], "model": cfg.to_dict(),
                                "source": _source(flat, seed=seed), "training": record}, overwrite=True)


def write_t5(out: Path, cfg, params, tokenizer_json: str, record: dict[str, Any], seed: int) -> None:
    """params/, tokenizer.json and config.json, atomically (as `varejax convert t5` writes them)."""
    import datetime

    import varejax
    from varejax.checkpoint import CONFIG_FILE, FORMATS, PARAMS_SUBDIR, TOKENIZER_FILE, atomic_directory, save_params
    from varejax.models.apply import flat_params

    flat = _host(flat_params(params))
    tok_sha = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    meta = {"format": FORMATS["t5"], "model": cfg.to_dict(), "tokenizer": TOKENIZER_FILE,
            "source": _source(flat, {TOKENIZER_FILE: tok_sha}, seed=seed), "training": record,
            "varejax": varejax.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with atomic_directory(out, overwrite=True) as tmp:
        save_params(tmp / PARAMS_SUBDIR, flat)
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")


# ---- evaluation --------------------------------------------------------------------------------------

def sampling_config(config):
    from varejax.sample.sampler import SamplingConfig

    return SamplingConfig(cfg=(float(config.cfg),), tau=(float(config.tau),), top_k=0, top_p=float(config.top_p),
                          greedy=bool(config.greedy))


def generate_batched(pipeline, prompts: list[str], seeds: list[int], sampling, batch: int) -> np.ndarray:
    """uint8 images of `prompts` in fixed-size batches (the last one padded: one compilation)."""
    out = []
    for start in range(0, len(prompts), batch):
        p, s = list(prompts[start:start + batch]), list(seeds[start:start + batch])
        n = len(p)
        p, s = p + [p[-1]] * (batch - n), s + [s[-1]] * (batch - n)
        out.append(pipeline.generate(p, s, sampling, TOY_SCHEDULE)[:n])
    return np.concatenate(out)


def evaluate_prompt_following(pipeline, oracle_params, config, seed: int) -> dict[str, Any]:
    """Oracle-read attributes of generated images vs the prompts.

    `all_said[family][attr]`: accuracy on prompts that say all three attributes; `circle[family]`:
    fraction of images of circle prompts (other attributes said or not) classified as circles.
    """
    sampling = sampling_config(config)
    result: dict[str, Any] = {"sampling": {"cfg": config.cfg, "tau": config.tau, "top_p": config.top_p,
                                           "greedy": config.greedy}, "n": config.n, "all_said": {}, "circle": {}}
    for f, family in enumerate(world.FAMILIES):
        rng = np.random.default_rng(seed + 100 + f)
        attrs = [world.sample_attributes(rng) for _ in range(config.n)]
        prompts = [world.prompt(a, rng, family, mention="all") for a in attrs]
        seeds = [seed * 100000 + f * 10000 + i for i in range(config.n)]
        images = generate_batched(pipeline, prompts, seeds, sampling, config.batch_size)
        ids = oracle.classify_batched(oracle_params, images)
        result["all_said"][family] = {
            name: float(np.mean(ids[name] == np.array([int(getattr(a, name)) for a in attrs])))
            for name in world.ATTRIBUTE_NAMES}
        pairs = world.concept_prompts("circle", family, n=config.n_circle, seed=seed + 200 + f)
        images = generate_batched(pipeline, [p for p, _ in pairs],
                                  [seed * 100000 + 50000 + f * 10000 + i for i in range(len(pairs))], sampling,
                                  config.batch_size)
        result["circle"][family] = float(np.mean(oracle.classify_batched(oracle_params, images)["shape"] ==
                                                 int(world.Shape.CIRCLE)))
    return result


# ---- the stage ---------------------------------------------------------------------------------------

def install(models_dir: Path, target: Path) -> None:
    """Replaces `target` (varejax/toy/assets) by the trained folders and world.json."""
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_NAMES:
        dest = target / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(models_dir / name, dest)
    shutil.copyfile(models_dir / WORLD_FILE, target / WORLD_FILE)


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains everything and writes WORKDIR/models/{infinity,vae,t5,oracle} and world.json."""
    from varejax.models.t5_tokenizer import T5Tokenizer

    workdir = Path(workdir)
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    log = Logger(workdir / "train.log", quiet=config.quiet)
    times: dict[str, float] = {}
    total_start = time.time()
    seed = int(config.seed)
    log(f"toy world v{world.WORLD_VERSION}: training with seed {seed} into {workdir}")

    start = time.time()
    train = world.dataset(config.data.n_train, seed=seed * 1000 + 1)
    heldout = world.dataset(config.data.n_heldout, seed=seed * 1000 + 2)
    times["data"] = time.time() - start
    log(f"data: {len(train.images)} training and {len(heldout.images)} held-out images ({times['data']:.0f}s)")

    from varejax.checkpoint import read_config

    reuse = Path(config.reuse_dir) if config.reuse_dir else None
    batch = int(config.data.eval_batch)
    start = time.time()
    if reuse is not None:
        # Stages are deterministic given the seed and config: a finished run's oracle and tokenizer are
        # what retraining would give, so they are copied (with their records) instead of retrained.
        oracle_params = oracle.load_oracle(str(reuse / "oracle"))
        oracle_meta = oracle.read_oracle_config(str(reuse / "oracle"))
        oracle_acc = oracle_meta["accuracy"]
        times["oracle"] = float(oracle_meta["training"]["seconds"])
        _copy_model(reuse / "oracle", models / "oracle")
        log(f"oracle reused from {reuse}: held-out accuracy {oracle_acc}")
    else:
        oracle_params, oracle_record = train_oracle(config.oracle, train, log, seed)
        oracle_acc = oracle.accuracy(oracle_params, heldout.images, heldout.labels, batch)
        times["oracle"] = time.time() - start
        log(f"oracle held-out accuracy {oracle_acc} ({times['oracle']:.0f}s)")
        oracle.write_oracle(str(models / "oracle"), oracle_params,
                            {"accuracy": oracle_acc, "heldout": {"n": len(heldout.images), "seed": seed * 1000 + 2},
                             "training": {**oracle_record, "seconds": round(times["oracle"], 1), "seed": seed},
                             "world_version": world.WORLD_VERSION}, overwrite=True)

    start = time.time()
    if reuse is not None:
        from varejax.checkpoint import load_vae

        vae_cfg, vae_params = load_vae(str(reuse / "vae"))
        vae_meta = read_config(reuse / "vae")["training"]
        recon_acc, recon_mae = vae_meta["oracle_on_reconstructions"], vae_meta["reconstruction_mae_uint8"]
        times["vae"] = float(vae_meta["seconds"])
        _copy_model(reuse / "vae", models / "vae")
        log(f"tokenizer reused from {reuse}: oracle on reconstructions {recon_acc}")
    else:
        vae_cfg, vae_params, vae_record = train_vae(config.vae, train, log, seed)
        recon = reconstruct(vae_cfg, vae_params, heldout.images, batch)
        recon_acc = oracle.accuracy(oracle_params, recon, heldout.labels, batch)
        recon_mae = float(np.mean(np.abs(recon.astype(np.float32) - heldout.images.astype(np.float32))))
        times["vae"] = time.time() - start
        log(f"tokenizer: oracle on reconstructions {recon_acc}, mean abs error {recon_mae:.2f}/255 "
            f"({times['vae']:.0f}s)")
        write_vae(models / "vae", vae_cfg, vae_params,
                  {**vae_record, "seconds": round(times["vae"], 1), "oracle_on_reconstructions": recon_acc,
                   "reconstruction_mae_uint8": recon_mae}, seed)
        _save_preview(workdir / "reconstructions.png", heldout.images[:32], recon[:32])

    start = time.time()
    raw = encode_raw(vae_cfg, vae_params, train.images[:config.data.n_latent], batch)
    times["encode"] = time.time() - start
    log(f"encoded {len(raw)} training images to {raw.shape[1:]} latents ({times['encode']:.0f}s)")

    start = time.time()
    refined = reuse is not None and "decoder_refinement" in read_config(reuse / "vae")["training"]
    if config.vae.refine_steps > 0 and not refined:
        vae_params, refine_record = refine_decoder(config.vae, vae_cfg, vae_params, summed_codes(raw, batch),
                                                   train.images[:config.data.n_latent], log, seed)
        recon = reconstruct(vae_cfg, vae_params, heldout.images, batch)
        recon_acc = oracle.accuracy(oracle_params, recon, heldout.labels, batch)
        recon_mae = float(np.mean(np.abs(recon.astype(np.float32) - heldout.images.astype(np.float32))))
        times["vae"] += time.time() - start
        vae_meta = read_config(models / "vae")["training"]
        log(f"decoder refined: oracle on reconstructions {recon_acc}, mean abs error {recon_mae:.2f}/255 "
            f"({time.time() - start:.0f}s)")
        write_vae(models / "vae", vae_cfg, vae_params,
                  {**vae_meta, "seconds": round(times["vae"], 1), "oracle_on_reconstructions": recon_acc,
                   "reconstruction_mae_uint8": recon_mae,
                   "decoder_refinement": {**refine_record, "seconds": round(time.time() - start, 1)}}, seed)
        _save_preview(workdir / "reconstructions.png", heldout.images[:32], recon[:32])

    start = time.time()
    oracle_meta = oracle.read_oracle_config(str(models / "oracle"))
    if config.oracle.adapt_steps > 0 and "adaptation" not in oracle_meta:
        oracle_params, adapt_record = adapt_oracle(config.oracle, oracle_params, vae_cfg, vae_params, raw, train,
                                                   log, seed)
        oracle_acc = oracle.accuracy(oracle_params, heldout.images, heldout.labels, batch)
        recon = reconstruct(vae_cfg, vae_params, heldout.images, batch)
        adapted_recon_acc = oracle.accuracy(oracle_params, recon, heldout.labels, batch)
        times["oracle"] += time.time() - start
        log(f"oracle adapted to decoded images: held-out accuracy {oracle_acc}, on their reconstructions "
            f"{adapted_recon_acc} ({time.time() - start:.0f}s)")
        meta = {k: v for k, v in oracle_meta.items() if k not in ("format", "model")}
        oracle.write_oracle(str(models / "oracle"), oracle_params,
                            {**meta, "accuracy": oracle_acc, "accuracy_on_reconstructions": adapted_recon_acc,
                             "adaptation": {**adapt_record, "seconds": round(time.time() - start, 1)}},
                            overwrite=True)
    else:
        oracle_acc = oracle_meta["accuracy"]
        adapted_recon_acc = oracle_meta.get("accuracy_on_reconstructions")

    start = time.time()
    tok = build_tokenizer()
    tokenizer_json = tok.to_str(pretty=True)
    tokenizer = T5Tokenizer(build_tokenizer(), source="toy", min_vocab=TOY_MIN_VOCAB)
    total_cycles = 1 + len(config.t2i.restarts)
    reused = read_config(reuse / "infinity")["training"] if reuse is not None and config.reuse_t2i else None
    if reused is not None and reused.get("cycles", 1) >= total_cycles:
        # The transformer learns from the encoder's bits only, which the decoder refinement leaves as they
        # are: a finished run's T5 + Infinity are what retraining would give.
        times["t2i"] = float(reused["seconds"])
        for name in ("t5", "infinity"):
            _copy_model(reuse / name, models / name)
        log(f"T5 + Infinity reused from {reuse}")
    else:
        start_from = None
        if reused is not None:
            from varejax.checkpoint import load_infinity, load_t5

            done = int(reused.get("cycles", 1))
            start_from = (load_t5(str(reuse / "t5"))[1], load_infinity(str(reuse / "infinity"))[1], done)
            log(f"T5 + Infinity: continuing from {reuse} after {done} of {total_cycles} cycles")
        t5_cfg, t5_params, inf_cfg, inf_params, t2i_record = train_text_to_image(
            config.t2i, raw, train.labels, tokenizer, log, seed, start_from=start_from)
        times["t2i"] = time.time() - start + (float(reused["seconds"]) if reused is not None else 0.0)
        t2i_record["seconds"] = round(times["t2i"], 1)
        write_t5(models / "t5", t5_cfg, t5_params, tokenizer_json, t2i_record, seed)
        write_infinity(models / "infinity", inf_cfg, inf_params, t2i_record, seed)
        log(f"text-to-image trained ({times['t2i']:.0f}s)")

    times["train_total"] = sum(times[k] for k in ("data", "oracle", "vae", "encode", "t2i"))
    start = time.time()
    evaluation = None
    if config.eval.n > 0:
        from varejax.sample.pipeline import Pipeline

        pipeline = Pipeline.from_dirs(str(models / "infinity"), str(models / "vae"), str(models / "t5"),
                                      min_vocab=TOY_MIN_VOCAB)
        evaluation = evaluate_prompt_following(pipeline, oracle_params, config.eval, seed)
        log(f"prompt following: {json.dumps(evaluation)}")
        sampling = sampling_config(config.eval)
        preview = world.enumerate_prompts("seen")[:: max(1, len(world.enumerate_prompts("seen")) // 16)][:16]
        images = generate_batched(pipeline, preview, list(range(len(preview))), sampling, config.eval.batch_size)
        _save_grid(workdir / "samples.png", images)
    times["eval"] = time.time() - start
    times["total"] = times["train_total"] + times["eval"]
    times["this_run_wall"] = time.time() - total_start

    summary = {
        "world_version": world.WORLD_VERSION, "image_size": world.IMAGE_SIZE,
        "schedule": [list(s) for s in TOY_SCHEDULE], "spatial_patchify": TOY_PATCHIFY,
        "vae_schedule": [list(s) for s in TOY_VAE_SCHEDULE], "seed": seed, "min_vocab": TOY_MIN_VOCAB,
        "oracle_accuracy": oracle_acc, "oracle_accuracy_on_reconstructions": adapted_recon_acc,
        "tokenizer": {"oracle_on_reconstructions": recon_acc, "reconstruction_mae_uint8": recon_mae},
        "prompt_following": evaluation, "seconds": {k: round(v, 1) for k, v in times.items()},
        "command": "varejax toy train --config configs/toy_train.py --config.install=True",
        "config": json.loads(config.to_json()),
        "reused_stages": (["oracle", "vae"] + (["t5", "infinity"] if config.reuse_t2i else [])
                          if reuse is not None else []),
        "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
    }
    (models / WORLD_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    log(f"done in {times['total']:.0f}s: {json.dumps(summary['seconds'])}")
    if config.install:
        from varejax.toy.assets import asset_dir

        install(models, Path(asset_dir()))
        log(f"installed into {asset_dir()}")
    return summary


def _copy_model(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)


def _save_grid(path: Path, images: np.ndarray) -> None:
    from varejax import images as image_io
    from varejax.sample.pipeline import image_grid

    image_io.save_image(path, image_grid(images, columns=int(math.ceil(math.sqrt(len(images))))))


def _save_preview(path: Path, originals: np.ndarray, recon: np.ndarray) -> None:
    from varejax import images as image_io
    from varejax.sample.pipeline import image_grid

    pairs = np.stack([originals, recon], axis=1).reshape(-1, *originals.shape[1:])
    image_io.save_image(path, image_grid(pairs, columns=8))
