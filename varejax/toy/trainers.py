"""What each stage of `varejax toy train` trains: a loss function and a batch stream each, run by `fit.fit`.

* `train_oracle` / `adapt_oracle`: the attribute classifier (`oracle.py`) on the three cross entropies, with
  noise and blur augmentation; optionally fine-tuned on tokenizer round trips.
* `train_vae`: the BSQ-VAE tokenizer on reconstruction (L1 + L2) through the multi-scale BSQ quantiser of
  TOY_VAE_SCHEDULE with straight-through gradients (`quantize_st`), plus a small commitment term;
  `refine_decoder` optionally trains its decoder alone on the sampler's inputs.
* `train_text_to_image`: T5 and Infinity jointly with the bitwise loss, in warm-restart cycles.
* `encode_raw`, `summed_codes`, `decode_codes`, `reconstruct`: the tokenizer over data sets, in batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varejax.models.state import flat_params
from varejax.toy import oracle, world
from varejax.toy.fit import adamw, fit, shuffled_batches
from varejax.toy.spec import SPECIAL_TOKENS, TEXT_LENGTH, TOY_PATCHIFY, TOY_SCHEDULE, TOY_VAE_SCHEDULE

Log = Callable[[str], None]


def flat_arrays(params) -> dict[tuple[str, ...], jax.Array]:
    """{path: jax array} of a parameter state (what the loss functions differentiate)."""
    return {k: jnp.asarray(v) for k, v in flat_params(params).items()}


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

def train_oracle(config, data: world.Dataset, log: Log, seed: int = 0, init: Any = None, steps: int | None = None,
                 learning_rate: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Trains the classifier on `data` (images, labels) -> (parameter state, record).

    init: parameters to start from (fine-tuning); steps / learning_rate override the config's.
    """
    cfg = oracle.OracleConfig(channels=tuple(config.channels), feature_dim=config.feature_dim)
    params = flat_arrays(oracle.init_params(cfg, seed=seed) if init is None else init)
    steps = int(config.steps if steps is None else steps)
    lr = float(config.learning_rate if learning_rate is None else learning_rate)
    noise, blur = float(config.noise), float(config.blur)

    def loss_fn(params, batch, key):
        images, labels = batch
        x = oracle.as_float(images)
        k_sigma, k_noise, k_blur = jax.random.split(key, 3)
        x = _random_blur(x, blur * jax.random.uniform(k_blur, (x.shape[0],)))
        sigma = noise * jax.random.uniform(k_sigma, (x.shape[0], 1, 1, 1))
        x = x + sigma * jax.random.normal(k_noise, x.shape)
        logits = oracle.logits(oracle.state_from_flat(cfg, params), x)
        loss = sum(optax.softmax_cross_entropy_with_integer_labels(logits[n], labels[n]).mean()
                   for n in world.ATTRIBUTE_NAMES)
        return loss, {"loss": loss}

    def batches():
        for idx in shuffled_batches(np.random.default_rng(seed), len(data.images), config.batch_size):
            yield data.images[idx], {n: jnp.asarray(data.labels[n][idx], jnp.int32) for n in world.ATTRIBUTE_NAMES}

    params, _ = fit(loss_fn, params, adamw(lr, config.warmup, steps, config.weight_decay), batches(), steps,
                    key=jax.random.key(seed), log=log, label="oracle", log_every=config.log_every)
    return oracle.state_from_flat(cfg, params), {"steps": steps, "batch_size": config.batch_size,
                                                 "learning_rate": lr}


def adapt_oracle(config, oracle_params, vae_cfg, vae_params, raw: np.ndarray, data: world.Dataset, log: Log,
                 seed: int = 0) -> tuple[Any, dict[str, Any]]:
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


def train_vae(config, data: world.Dataset, log: Log, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Trains the BSQ-VAE on `data` images -> (VAEConfig, parameter state, record)."""
    from varejax.models import bsq_vae

    cfg = bsq_vae.VAEConfig(codebook_dim=config.codebook_dim, patch_size=config.patch_size,
                            ch_mult=tuple(config.ch_mult), base_ch=config.base_ch,
                            num_res_blocks=config.num_res_blocks, pixel_unshuffle=config.pixel_unshuffle,
                            matmul_precision="default")
    params = flat_arrays(bsq_vae.init_vae_params(cfg, seed=seed + 1))

    def loss_fn(params, images, key):
        del key  # deterministic
        model = bsq_vae.bind_vae(bsq_vae.vae_state_from_flat(cfg, params), cfg)
        x = oracle.as_float(images)
        z, commit = quantize_st(model.encoder(x), TOY_VAE_SCHEDULE)
        y = model.decoder(z)
        rec = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x))
        return rec + config.commit_weight * commit, {"rec": rec, "commit": commit}

    batches = (data.images[idx] for idx in shuffled_batches(np.random.default_rng(seed + 1), len(data.images),
                                                             config.batch_size))
    params, _ = fit(loss_fn, params, adamw(config.learning_rate, config.warmup, config.steps, config.weight_decay),
                    batches, config.steps, log=log, label="vae", log_every=config.log_every)
    saved = cfg.replace(matmul_precision="highest")  # the converter's default numerics (same on CPU)
    return saved, bsq_vae.vae_state_from_flat(saved, params), {"steps": config.steps, "batch_size": config.batch_size}


def refine_decoder(config, vae_cfg, vae_params, codes: np.ndarray, images_u8: np.ndarray, log: Log,
                   seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Trains the decoder alone on (summed codes -> image), encoder frozen -> (parameter state, record).

    The bits of every image are unchanged (the encoder is untouched), so the transformer's training
    data does not depend on this stage; the joint training is short on 2 cores and leaves the decoder
    the weaker half (blurred star points and heart lobes), which this cheaper stage fixes.
    """
    from varejax.models import bsq_vae

    flat = flat_arrays(vae_params)
    decoder = {k: v for k, v in flat.items() if k[0] == "decoder"}
    frozen = {k: v for k, v in flat.items() if k[0] != "decoder"}
    work_cfg = vae_cfg.replace(matmul_precision="default")

    def loss_fn(decoder, batch, key):
        del key  # deterministic
        codes, images = batch
        model = bsq_vae.bind_vae(bsq_vae.vae_state_from_flat(work_cfg, {**frozen, **decoder}), work_cfg)
        x = oracle.as_float(images)
        y = model.decoder(codes)
        rec = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x))
        return rec, {"rec": rec}

    batches = ((jnp.asarray(codes[idx]), images_u8[idx])
               for idx in shuffled_batches(np.random.default_rng(seed + 5), len(codes), config.refine_batch_size))
    tx = adamw(config.refine_learning_rate, config.warmup, config.refine_steps, config.weight_decay)
    decoder, _ = fit(loss_fn, decoder, tx, batches, config.refine_steps, log=log, label="decoder",
                     log_every=config.log_every)
    saved = work_cfg.replace(matmul_precision="highest")
    return bsq_vae.vae_state_from_flat(saved, {**frozen, **decoder}), {
        "steps": config.refine_steps, "batch_size": config.refine_batch_size,
        "learning_rate": config.refine_learning_rate, "images": len(codes)}


def map_batches(fn: Callable[[jax.Array], jax.Array], array: np.ndarray, batch: int = 128) -> np.ndarray:
    """`fn` over `array` in full batches of `batch` (the last one padded by repetition: one compiled shape),
    results concatenated as numpy, padding dropped."""
    from varejax.batching import map_padded

    return map_padded(lambda idx: fn(jnp.asarray(array[idx])), len(array), batch)


def summed_codes(raw_NhwD: np.ndarray, batch: int = 128) -> np.ndarray:
    """The decoder's inputs on the sampler's path: raw features -> multi-scale bits -> summed codes."""
    from varejax.models import bitwise

    return map_batches(lambda raw: bitwise.decode_bits_jit(
        bitwise.multiscale_quantize_jit(raw, TOY_VAE_SCHEDULE).bits, TOY_VAE_SCHEDULE), raw_NhwD, batch)


def encode_raw(vae_cfg, vae_params, images_u8: np.ndarray, batch: int = 128) -> np.ndarray:
    """Raw tokenizer features [N, h, w, d] float32 of uint8 images."""
    from varejax.models import bsq_vae

    return map_batches(lambda x: bsq_vae.encode_jit(vae_params, oracle.as_float(x), vae_cfg), images_u8, batch)


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
    """A fresh prompt (random family, random subset of the attributes said) for each image of `idx`."""
    prompts = []
    for i in idx:
        attrs = world.attributes_at(labels, int(i))
        family = world.FAMILIES[int(rng.integers(len(world.FAMILIES)))]
        prompts.append(world.prompt(attrs, rng, family))
    ids, mask, _ = tokenizer(prompts, max_length=TEXT_LENGTH)
    return ids, mask


def text_to_image_configs(config, tokenizer, codebook_dim: int):
    """(T5Config, InfinityConfig) of the t2i config, at training numerics (matmul_precision "default")."""
    from varejax.models import t5
    from varejax.models.config import InfinityConfig

    t5_cfg = t5.T5Config(vocab_size=-(-tokenizer.vocab_size // 8) * 8, d_model=config.t5.d_model,
                         num_layers=config.t5.num_layers, num_heads=config.t5.num_heads, d_kv=config.t5.d_kv,
                         d_ff=config.t5.d_ff, feed_forward_proj="gated-gelu", matmul_precision="default")
    c = config.infinity
    inf_cfg = InfinityConfig(depth=c.depth, embed_dim=c.embed_dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                             text_channels=t5_cfg.d_model, text_maxlen=c.text_maxlen, codebook_dim=codebook_dim,
                             apply_spatial_patchify=TOY_PATCHIFY, block_chunks=c.block_chunks,
                             pad_to_multiplier=c.pad_to_multiplier, cond_drop_rate=c.cond_drop_rate,
                             drop_path_rate=c.drop_path_rate, matmul_precision="default")
    return t5_cfg, inf_cfg


def train_text_to_image(config, raw: np.ndarray, labels: dict[str, np.ndarray], tokenizer, log: Log, seed: int = 0,
                        start_from: tuple[Any, Any, int] | None = None) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """Trains T5 and Infinity jointly -> (T5Config, T5 state, InfinityConfig, Infinity state, record).

    The frozen tokenizer's raw features -> `bitwise.transformer_inputs` with bitwise self-correction and 2x2
    spatial patchify (TOY_SCHEDULE) -> teacher-forced bitwise loss, reweighted by scale; gradients reach the
    T5 too; condition dropout (cond_drop_rate) makes classifier-free guidance work.

    Training runs in cycles: `config.steps` steps, then one warm restart per entry of `config.restarts`
    (its length in steps), each with its own warmup + cosine schedule (peak `config.learning_rate`, then
    `config.restart_learning_rate`), a fresh AdamW state and its own seeded batch stream; the dropout and
    noise keys continue one stream over all cycles (step k gets fold_in(key, k)). A cycle depends only on
    the weights it starts from, so `start_from=(t5 state, Infinity state, cycles done)` (a finished run's
    weights) continues to exactly what a run from scratch gives.
    """
    from varejax.models import apply, bit_loss, bitwise, t5

    t5_cfg, inf_cfg = text_to_image_configs(config, tokenizer, raw.shape[-1])
    if start_from is None:
        params = {"t5": flat_arrays(t5.init_params(t5_cfg, seed=seed + 2)),
                  "infinity": flat_arrays(apply.init_params(inf_cfg, seed=seed + 3))}
        done = 0
    else:
        params = {"t5": flat_arrays(start_from[0]), "infinity": flat_arrays(start_from[1])}
        done = int(start_from[2])
    noise_layers = len(TOY_SCHEDULE) if config.noise_strength > 0 else 0

    def loss_fn(params, batch, key):
        ids, mask, raw_batch = batch
        k_noise, k_model = jax.random.split(key)
        gt, x = bitwise.transformer_inputs(raw_batch, TOY_SCHEDULE, noise_apply_layers=noise_layers,
                                           noise_apply_strength=config.noise_strength, rng=k_noise,
                                           apply_spatial_patchify=TOY_PATCHIFY)
        text = t5.forward(t5.state_from_flat(t5_cfg, params["t5"]), ids, mask, t5_cfg)
        text = text * mask[..., None].astype(jnp.float32)
        loss = bit_loss.loss_fn(apply.state_from_flat(inf_cfg, params["infinity"]), text, mask, x, gt,
                                TOY_SCHEDULE, cfg=inf_cfg, reweight_by_scale=True, rng=k_model)
        return loss, {"loss": loss}

    def batches(rng):
        # index shuffling and prompt drawing share `rng`, in this order
        for idx in shuffled_batches(rng, len(raw), config.batch_size):
            ids, mask = _text_batch(tokenizer, labels, idx, rng)
            yield ids, mask, raw[idx]

    cycles = [(int(config.steps), float(config.learning_rate))]
    cycles += [(int(n), float(config.restart_learning_rate)) for n in config.restarts]
    history, offset = [], sum(n for n, _ in cycles[:done])
    for cycle, (steps, lr) in enumerate(cycles[done:], start=done):
        # cycle 0 keeps the streams of a single-cycle run (seed + 2); later cycles get their own
        rng = np.random.default_rng(seed + 2 + 1000 * cycle)
        params, logged = fit(loss_fn, params, adamw(lr, config.warmup, steps, config.weight_decay, b2=config.b2),
                             batches(rng), steps, key=jax.random.key(seed + 2), first_step=offset, log=log,
                             label=f"t2i cycle {cycle + 1}/{len(cycles)}", log_every=config.log_every)
        history += [[h["step"], round(h["loss"], 5)] for h in logged]
        offset += steps
    t5_saved = t5_cfg.replace(matmul_precision="highest")
    inf_saved = inf_cfg.replace(matmul_precision="highest")
    record = {"steps": offset, "cycles": len(cycles), "cycle_steps": [n for n, _ in cycles],
              "batch_size": config.batch_size, "loss_history": history}
    return (t5_saved, t5.state_from_flat(t5_saved, params["t5"]), inf_saved,
            apply.state_from_flat(inf_saved, params["infinity"]), record)
