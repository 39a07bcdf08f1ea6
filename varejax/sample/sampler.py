"""Autoregressive next-scale sampling with a KV cache and classifier-free guidance (CFG) on logits.

One jitted function runs the whole schedule (compiled once per schedule, batch and sampling settings);
inside it, each scale is one step over that scale's tokens only: every self-attention appends its
post-rope keys/values to a cache and attends to everything cached (all earlier scales and the scale
itself, so no mask), as upstream's `autoregressive_infer_cfg`. No host round trip happens inside.

CFG: both halves in one batch, `[cond; uncond]`. The uncond text is the learned `cfg_uncond[:len_i]`
of each prompt (same lengths) or a negative prompt's features; both halves go through the text norm,
pool and CA projection. Per scale s: `logits = cfg_s * cond / tau_s + (1 - cfg_s) * uncond / tau_s`
(tau before the mix); only the cond half is sampled, and its codes feed both halves at the next scale.
Sampling is per bit: top-k (clamped to 2 classes, so only k = 1 matters: argmax), top-p (drops the less
likely class when its probability is <= 1 - top_p), then a categorical draw with a JAX PRNG key; or
greedy argmax. Bits -> codes (2b - 1)/sqrt(d) -> running sum of codes upsampled to the final grid ->
next input = the sum resized to the next scale (bilinear, no antialias), through `word_embed`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from varejax.errors import ConfigError
from varejax.models import apply, bitwise, rope, schedules
from varejax.models.config import InfinityConfig
from varejax.models.layers import F32


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (hashable: a static argument of the jitted sampler).

    Attributes:
      guidance: classifier-free guidance scale per scale (one value is broadcast to every scale); 1 everywhere
        = no CFG batch. (Upstream calls it cfg / cfg_list; here `cfg` is always the model config.)
      tau: temperature per scale (applied before the CFG mix).
      top_k: 1 = per-bit argmax; 0 or >= 2 = no-op (two classes), as upstream.
      top_p: nucleus threshold per bit; 0 = off.
      greedy: argmax instead of a random draw.
    """

    guidance: tuple[float, ...] = (3.0,)
    tau: tuple[float, ...] = (1.0,)
    top_k: int = 0
    top_p: float = 0.0
    greedy: bool = False

    def per_scale(self, num_scales: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(guidance, tau), one value per scale of a `num_scales` schedule."""
        def expand(values, name):
            values = tuple(float(v) for v in values)
            if len(values) == 1:
                return values * num_scales
            if len(values) < num_scales:
                raise ConfigError(f"sampling {name} has {len(values)} entries for a schedule of {num_scales} "
                                  f"scales: give one value or one per scale")
            return values[:num_scales]
        return expand(self.guidance, "guidance"), expand(self.tau, "tau")


@dataclasses.dataclass
class Generation:
    """What one generation returns (arrays, batch-major, channels-last).

    bits: per scale [B, h, w, d] int8 on the tokenizer's grid (after pixel-shuffle for patchified models).
    summed_codes: [B, H, W, d] float32, the tokenizer decoder's input.
    cfg_logits: per scale [B, h*w, 2d] float32, the logits the sampler drew from (after tau and CFG).
    head_logits: per scale [2B or B, h*w, 2d] float32, the raw head output (cond rows, then uncond).
    next_inputs: per scale 1..K-1 [B, h*w, bits per token], the next-scale inputs fed to `word_embed`;
      concatenated they are the teacher-forcing input `x_BLC_wo_prefix` of this trajectory.
    """

    bits: list[jax.Array]
    summed_codes: jax.Array
    cfg_logits: list[jax.Array]
    head_logits: list[jax.Array]
    next_inputs: list[jax.Array]

    def x_BLC_wo_prefix(self) -> jax.Array:
        return jnp.concatenate(self.next_inputs, axis=1)

    def bits_BLd(self, cfg: InfinityConfig) -> jax.Array:
        """Sampled bits in the transformer's token layout [B, L, bits per token] (the training labels)."""
        return jnp.concatenate([bitwise.tokens(b, cfg.apply_spatial_patchify) for b in self.bits], axis=1)

    def logits_BLV(self) -> jax.Array:
        return jnp.concatenate(self.cfg_logits, axis=1)


jax.tree_util.register_dataclass(
    Generation, data_fields=["bits", "summed_codes", "cfg_logits", "head_logits", "next_inputs"], meta_fields=[])


def sample_bits(logits_Bld2: jax.Array, rng: jax.Array | None, top_k: int, top_p: float, greedy: bool) -> jax.Array:
    """Draws one bit per (token, bit) from 2-class logits [..., 2] -> int8 bits [...]."""
    if greedy or top_k == 1 or rng is None:
        # torch's top-1 keeps the first maximum: ties give class 0.
        return (logits_Bld2[..., 1] > logits_Bld2[..., 0]).astype(jnp.int8)
    logits = logits_Bld2.astype(F32)
    if top_p > 0:
        probs = jax.nn.softmax(logits, axis=-1)
        smaller = jnp.argmin(probs, axis=-1)
        small_prob = jnp.min(probs, axis=-1)
        drop = small_prob <= (1.0 - top_p)
        one_hot = jax.nn.one_hot(smaller, 2, dtype=bool)
        logits = jnp.where(drop[..., None] & one_hot, -jnp.inf, logits)
    if jnp.ndim(rng) == 0:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int8)
    # One key per sample: an image does not depend on what else is in its batch.
    draw = lambda key, lg: jax.random.categorical(key, lg, axis=-1)
    return jax.vmap(draw)(rng, logits).astype(jnp.int8)


def _fold_in(rng: jax.Array, data: int) -> jax.Array:
    if jnp.ndim(rng) == 0:
        return jax.random.fold_in(rng, data)
    return jax.vmap(lambda key: jax.random.fold_in(key, data))(rng)


def _uncond_text(model, text_BTC: jax.Array) -> jax.Array:
    T = text_BTC.shape[1]
    if T > model.cfg.text_maxlen:
        raise ValueError(f"text has {T} rows, cfg_uncond only {model.cfg.text_maxlen}")
    return jnp.broadcast_to(model.cfg_uncond[...][:T].astype(F32)[None], text_BTC.shape)


def generate(params: nnx.State, text: jax.Array, text_mask: jax.Array, schedule: schedules.Schedule, *,
             cfg: InfinityConfig, sampling: SamplingConfig, rng: jax.Array | None = None,
             negative_text: jax.Array | None = None, negative_mask: jax.Array | None = None,
             h_div_w_template: float | None = None) -> Generation:
    """Generates bits for every scale of `schedule` from text features.

    Args:
      params: transformer parameters.
      text, text_mask: [B, T, Ct5] padded text features and their [B, T] validity mask.
      schedule: the transformer's scale schedule (1, h, w) ... (for patchified models the tokenizer grid
        is twice as large).
      sampling: guidance, temperature, top-k/top-p, greedy.
      rng: a PRNG key, or one key per sample ([B] keys, so an image does not depend on its batch);
        per-scale keys are folded from it. None = greedy.
      negative_text, negative_mask: a negative prompt's features replace `cfg_uncond` in the uncond half.
      h_div_w_template: aspect template of the rope grid (default: nearest to the last scale).
    """
    schedule = schedules.as_schedule(schedule)
    model = apply.bind(params, cfg)
    B = text.shape[0]
    cfg_list, tau_list = sampling.per_scale(len(schedule))
    use_cfg = any(c != 1.0 for c in cfg_list)
    text = text.astype(F32)
    text_mask = jnp.asarray(text_mask)
    if use_cfg:
        if negative_text is None:
            uncond, uncond_mask = _uncond_text(model, text), text_mask
        else:
            uncond, uncond_mask = jnp.asarray(negative_text, F32), jnp.asarray(negative_mask)
            T = max(text.shape[1], uncond.shape[1])
            pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1])) + ((0, 0),) * (a.ndim - 2))
            text, text_mask = pad(text, T), pad(text_mask, T)
            uncond, uncond_mask = pad(uncond, T), pad(uncond_mask, T)
        text = jnp.concatenate([text, uncond], axis=0)
        text_mask = jnp.concatenate([text_mask, uncond_mask.astype(text_mask.dtype)], axis=0)

    cond_BD, text_BTD, mask_B11T = model.encode_text(text, text_mask)
    gss = model.shared_ada_condition(cond_BD)
    text_kvs = [block.ca.text_kv(text_BTD) for block in model.blocks]
    cos_all, sin_all = (jnp.asarray(t) for t in rope.rope_table(schedule, cfg.head_dim, h_div_w_template, 1))
    levels = model.lvl_embed[...].astype(F32)

    vae_schedule = bitwise.vae_schedule(schedule, cfg.apply_spatial_patchify)
    d_vae = cfg.codebook_dim
    final_hw = vae_schedule[-1]
    summed = None
    x = cond_BD[:, None, :] + model.pos_start[...].astype(F32)   # scale 0: the start token
    caches: list[Any] = [None] * cfg.depth
    out = Generation([], None, [], [], [])
    start = 0
    for si, (_, h, w) in enumerate(schedule):
        n = h * w
        x = x + levels[si]
        cos, sin = cos_all[start:start + n], sin_all[start:start + n]
        for i, block in enumerate(model.blocks):
            x, caches[i] = block.step(x, gss, text_kvs[i], mask_B11T, cos, sin, cache=caches[i])
        start += n
        head = model.logits(x, cond_BD)
        out.head_logits.append(head)
        if use_cfg and cfg_list[si] != 1.0:
            mixed = cfg_list[si] * head[:B] / tau_list[si] + (1 - cfg_list[si]) * head[B:] / tau_list[si]
        else:
            mixed = head[:B] / tau_list[si]
        out.cfg_logits.append(mixed)
        key = None if rng is None else _fold_in(rng, si)
        bits = sample_bits(mixed.reshape(B, n, -1, 2), key, sampling.top_k, sampling.top_p, sampling.greedy)
        grid = bitwise.bits_from_tokens(bits.reshape(B, n, -1), (h, w), cfg.apply_spatial_patchify)
        out.bits.append(grid)
        is_last = si == len(schedule) - 1
        summed, nxt = bitwise.accumulate_and_next_input(
            summed, bitwise.bits_to_codes(grid, d_vae), None if is_last else vae_schedule[si + 1], final_hw,
            is_last, apply_spatial_patchify=cfg.apply_spatial_patchify)
        if nxt is None:
            break
        out.next_inputs.append(nxt)
        x = model.word_embed(nxt).astype(F32)
        if use_cfg:
            x = jnp.concatenate([x, x], axis=0)
    out.summed_codes = summed
    return out


generate_jit = jax.jit(generate, static_argnames=("schedule", "cfg", "sampling", "h_div_w_template"))
