"""Multi-scale bitwise quantisation of Infinity (BSQ), channels-last.

The tokenizer's encoder gives raw features `raw` [B, H, W, d] (H, W in latent units). A scale
schedule ((1, h_1, w_1), ..., (1, H, W)) turns them into one bit map per scale by residual
quantisation (docs/infinity.md sections 5 and 6):

    cum = 0
    for each scale s:
        r = raw - cum, area-downsampled to (h_s, w_s)          (adaptive average pooling)
        bits_s = r > 0 per channel;  q_s = +-1/sqrt(d)          (binary spherical quantisation)
        cum += bilinear_up(q_s, (H, W))                         (torch 'trilinear' with T = 1)
        input_{s+1} = bilinear(cum, (h_{s+1}, w_{s+1}))         (no antialias, even downsampling)

`multiscale_quantize` is the tokenizer's own path (upstream `MultiScaleBSQ.forward`, giving per-scale
bits and the quantised latent `z`), `decode_bits` the inverse (`decode_from_indices`: summed codes),
and `transformer_inputs` the transformer's training targets and teacher-forced inputs (upstream
`BitwiseSelfCorrection.flip_requant`), optionally with bitwise self-correction (random bit flips whose
re-quantised codes feed the following scales, while the labels stay the unflipped bits).

`accumulate_and_next_input` is the sampler's per-scale step: add one scale's codes to the running
sum and produce the next scale's transformer input.

Resampling, exactly as upstream's torch calls (pitfall 4 of docs/infinity.md):
* `area_resize` = `F.interpolate(mode='area')` = adaptive average pooling; output i averages the input
  window [floor(i In/Out), ceil((i+1) In/Out)) (uneven, possibly overlapping windows), dividing the
  window sum by its height, then by its width, as torch's CPU kernel does.
* `bilinear_resize` = `F.interpolate(mode='trilinear')` on [B, d, 1, h, w] = bilinear with
  align_corners=False and no antialias; source index (i + 0.5) In/Out - 0.5 clamped at 0, computed
  in float32 as torch does.

Infinity-8B (`apply_spatial_patchify`): the transformer grid is (h, w) and the tokenizer grid (2h, 2w);
a transformer token holds the 2x2 latent patch's 4d bits in torch pixel_unshuffle channel order
(`varejax/models/patchify.py`). Schedules passed to the functions here are in transformer units; with
`apply_spatial_patchify=True` each scale is doubled for the tokenizer (`vae_schedule`).

Bits are int8 0/1; bit k of a position is the sign of latent channel k (exactly 0 -> bit 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from varejax.models.layers import F32
from varejax.models.patchify import pixel_shuffle, pixel_unshuffle

HW = tuple[int, int]


# ---- schedules -------------------------------------------------------------------------------------

def scale_sizes(schedule: Sequence[Sequence[int]]) -> tuple[HW, ...]:
    """(h, w) of every scale of a schedule given as (t, h, w) or (h, w) entries (t must be 1)."""
    out = []
    for scale in schedule:
        scale = tuple(int(v) for v in scale)
        if len(scale) == 3:
            if scale[0] != 1:
                raise ValueError(f"only images are supported (t = 1), got scale {scale}")
            scale = scale[1:]
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(f"a scale must be (1, h, w) or (h, w) with h, w >= 1, got {scale}")
        out.append(scale)
    if not out:
        raise ValueError("empty scale schedule")
    return tuple(out)


def vae_schedule(schedule: Sequence[Sequence[int]], apply_spatial_patchify: bool = False) -> tuple[HW, ...]:
    """The tokenizer's (h, w) per scale: the schedule itself, or doubled with spatial patchify (8B)."""
    sizes = scale_sizes(schedule)
    return tuple((2 * h, 2 * w) for h, w in sizes) if apply_spatial_patchify else sizes


# ---- resampling ------------------------------------------------------------------------------------

def _hw(size: Sequence[int]) -> HW:
    """(h, w) from an (h, w) or (1, h, w) size."""
    size = tuple(int(v) for v in size)
    if len(size) == 3 and size[0] == 1:
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f"expected a size (h, w) or (1, h, w), got {size}")
    return size


def _area_windows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch adaptive pooling windows: [floor(i In/Out), ceil((i+1) In/Out)) for i < Out."""
    i = np.arange(n_out, dtype=np.int64)
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    return start, end


def _window_sum(x: jax.Array, axis: int, n_out: int) -> tuple[jax.Array, np.ndarray]:
    """Sums of the adaptive-pooling windows along `axis` -> (sums, window sizes)."""
    n_in = x.shape[axis]
    start, end = _area_windows(n_in, n_out)
    sizes = end - start
    k_max = int(sizes.max())
    idx = start[:, None] + np.arange(k_max)[None, :]                # [n_out, k_max]
    valid = idx < end[:, None]
    idx = np.minimum(idx, n_in - 1)
    g = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
    g = g.reshape(x.shape[:axis] + (n_out, k_max) + x.shape[axis + 1:])
    mask_shape = [1] * g.ndim
    mask_shape[axis], mask_shape[axis + 1] = n_out, k_max
    g = jnp.where(jnp.asarray(valid.reshape(mask_shape)), g, jnp.zeros((), g.dtype))
    return jnp.sum(g, axis=axis + 1), sizes


def area_resize(x_BHWC: jax.Array, size: HW) -> jax.Array:
    """torch `F.interpolate(x, size, mode='area')` (adaptive average pooling) on [B, H, W, C].

    Windows are torch's (uneven for non-divisible sizes, e.g. 64 -> 12 or 20); each window sum is
    divided by its height, then by its width, as torch's CPU kernel does. Sums are taken per axis
    (width, then height) in float32, so on non-integer inputs results can differ from torch's
    sequential row-major sum in the last bits (a few ulps); the windows and divisors are exact.
    """
    B, H, W, C = x_BHWC.shape
    oh, ow = _hw(size)
    if (oh, ow) == (H, W):
        return x_BHWC
    x = x_BHWC.astype(F32)
    x, kw = _window_sum(x, 2, ow)
    x, kh = _window_sum(x, 1, oh)
    # True divisions, as torch. XLA rewrites a division by a constant or by a broadcast into a
    # multiplication by the (rounded) reciprocal, and (s / kh) / kw into s / (kh kw); full-size
    # divisors behind optimization barriers keep both divisions exact.
    div_h = jnp.broadcast_to(jnp.asarray(kh.astype(np.float32)).reshape(1, oh, 1, 1), x.shape)
    div_w = jnp.broadcast_to(jnp.asarray(kw.astype(np.float32)).reshape(1, 1, ow, 1), x.shape)
    div_h, div_w = jax.lax.optimization_barrier((div_h, div_w))
    x = jax.lax.optimization_barrier(x / div_h)
    return x / div_w


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's linear-interpolation indices and weights (align_corners=False), in float32 as torch."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.where(src < 0, np.float32(0), src).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    lam0 = (np.float32(1) - lam1).astype(np.float32)
    return i0, i1, lam0, lam1


def _lerp_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
    i0, i1, lam0, lam1 = _linear_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * jnp.asarray(lam0).reshape(shape) + b * jnp.asarray(lam1).reshape(shape)


def bilinear_resize(x_BHWC: jax.Array, size: HW) -> jax.Array:
    """torch `F.interpolate(x[:, :, None], (1, h, w), mode='trilinear')` on [B, H, W, C].

    Bilinear, align_corners=False, **no antialias even when downsampling** (not `jax.image.resize`'s
    default). Interpolates along the width, then the height, with torch's float32 weights, i.e.
    torch's expression h0 (w0 x00 + w1 x01) + h1 (w0 x10 + w1 x11).
    """
    _, H, W, _ = x_BHWC.shape
    oh, ow = _hw(size)
    if (oh, ow) == (H, W):
        return x_BHWC
    x = x_BHWC.astype(F32)
    x = _lerp_axis(x, 2, ow) if ow != W else x
    return _lerp_axis(x, 1, oh) if oh != H else x


# ---- bits and codes --------------------------------------------------------------------------------

def codebook_scale(d: int) -> np.float32:
    """1/sqrt(d) in float32, the magnitude of every code entry."""
    return np.float32(1.0 / np.sqrt(d))


def _l2normalize(x: jax.Array) -> jax.Array:
    """torch F.normalize(x, dim=-1): x / max(||x||, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def quantize_bits(x: jax.Array) -> jax.Array:
    """Bits (int8 0/1) of latent vectors [..., d]: 1 where a channel is > 0; exactly 0 gives bit 0.

    Upstream takes the sign after l2-normalising over the channels, which keeps every sign.
    """
    return (x > 0).astype(jnp.int8)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Binary spherical quantisation of [..., d] -> (bits int8, quantised values float32).

    Upstream `BSQ.forward` with `quantize_new`: u = l2norm(x), zhat = +-1/sqrt(d) by the sign of u,
    and the straight-through value u + (zhat - u), which equals zhat up to float rounding; bits are
    u > 0.
    """
    x = x.astype(F32)
    u = _l2normalize(x)
    s = codebook_scale(x.shape[-1])
    zhat = jnp.where(u > 0, s, -s).astype(F32)
    return (u > 0).astype(jnp.int8), u + (zhat - u)


def bits_to_codes(bits: jax.Array, d: int | None = None) -> jax.Array:
    """Bits [..., d] -> codes (2 bit - 1)/sqrt(d), float32.

    Upstream `indices_to_codes(bits, 'bit_label')`: bits * 2s - s with s = 1/sqrt(d) in float32, then
    l2-normalised (a no-op up to the last bit, kept to match upstream exactly).
    """
    d = bits.shape[-1] if d is None else d
    if bits.shape[-1] != d:
        raise ValueError(f"bits have {bits.shape[-1]} channels, expected d = {d}")
    s = codebook_scale(d)
    codes = bits.astype(F32) * (s * np.float32(2)) - s
    return _l2normalize(codes)


def flip_bits(bits: jax.Array, rng: jax.Array, strength: float) -> tuple[jax.Array, jax.Array]:
    """Bitwise self-correction noise of one scale -> (flipped bits, flip probability p).

    As upstream: p = randint(0, 100 * strength + 1) * 0.01 (one p per call, i.e. per scale and batch;
    `100 * strength + 1` truncated to int as numpy does), then each bit flips independently with
    probability p. Uses JAX's PRNG, so the flips are seeded but not upstream's numpy/torch streams.
    """
    high = int(100 * strength + 1)
    k_p, k_mask = jax.random.split(rng)
    p = jax.random.randint(k_p, (), 0, max(high, 1)).astype(F32) * np.float32(0.01)
    flip = jax.random.uniform(k_mask, bits.shape, F32) < p
    return jnp.where(flip, 1 - bits, bits).astype(bits.dtype), p


# ---- multi-scale quantisation ----------------------------------------------------------------------

class MultiScaleBits(NamedTuple):
    """Result of `multiscale_quantize`.

    bits: per scale [B, h_s, w_s, d] int8.
    z_quantized: [B, H, W, d] the sum of the upsampled quantised values (upstream `z`).
    area_inputs: per scale s >= 1, area-downsampled cumulative z of the previous scales (upstream
      `MultiScaleBSQ`'s own `var_input`; Infinity does not use these, see `transformer_inputs`).
    """

    bits: list[jax.Array]
    z_quantized: jax.Array
    area_inputs: list[jax.Array]


def _check_latent(raw: jax.Array, sizes: Sequence[HW]) -> None:
    if raw.ndim != 4:
        raise ValueError(f"raw features must be [B, H, W, d] (channels last), got {raw.shape}")
    if tuple(sizes[-1]) != tuple(raw.shape[1:3]):
        raise ValueError(f"the last scale {sizes[-1]} must equal the latent size {raw.shape[1:3]}")


def multiscale_quantize(raw_BHWd: jax.Array, schedule: Sequence[Sequence[int]]) -> MultiScaleBits:
    """The tokenizer's residual multi-scale quantisation (upstream `MultiScaleBSQ.forward`, no flips).

    Args:
      raw_BHWd: raw encoder features [B, H, W, d] (channels last).
      schedule: scales in latent units, (t, h, w) or (h, w); the last one must be (H, W).

    Returns:
      MultiScaleBits(bits per scale, z_quantized [B, H, W, d], area next-scale inputs).
    """
    sizes = scale_sizes(schedule)
    _check_latent(raw_BHWd, sizes)
    final = tuple(raw_BHWd.shape[1:3])
    residual = raw_BHWd.astype(F32)
    z = jnp.zeros_like(residual)
    bits_out, area_inputs = [], []
    for si, hw in enumerate(sizes):
        r = area_resize(residual, hw) if hw != final else residual
        bits, q = quantize(r)
        q = bilinear_resize(q, final) if hw != final else q
        residual = residual - q
        z = z + q
        bits_out.append(bits)
        if si != len(sizes) - 1:
            area_inputs.append(area_resize(z, sizes[si + 1]))
    return MultiScaleBits(bits_out, z, area_inputs)


def decode_bits(bits_per_scale: Sequence[jax.Array], schedule: Sequence[Sequence[int]] | None = None) -> jax.Array:
    """Per-scale bits [B, h_s, w_s, d] -> summed codes [B, H, W, d] (upstream `decode_from_indices`).

    Every scale's codes are bilinearly upsampled (torch 'trilinear') to the last scale's size and summed.
    `schedule`, when given, is checked against the bit maps' sizes.
    """
    if schedule is not None:
        sizes = scale_sizes(schedule)
        got = tuple(tuple(b.shape[1:3]) for b in bits_per_scale)
        if got != sizes:
            raise ValueError(f"bit maps have sizes {got}, the schedule says {sizes}")
    final = tuple(bits_per_scale[-1].shape[1:3])
    summed = None
    for bits in bits_per_scale:
        codes = bilinear_resize(bits_to_codes(bits), final)
        summed = codes if summed is None else summed + codes
    return summed


def tokens(x_BhwC: jax.Array, apply_spatial_patchify: bool = False) -> jax.Array:
    """Grid [B, h, w, C] -> row-major tokens [B, h w, C]; with patchify, [B, 2h', 2w', C] -> [B, h'w', 4C]."""
    if apply_spatial_patchify:
        x_BhwC = pixel_unshuffle(x_BhwC, 2)
    B, h, w, C = x_BhwC.shape
    return x_BhwC.reshape(B, h * w, C)


def bits_from_tokens(bits_BlD: jax.Array, hw: HW, apply_spatial_patchify: bool = False) -> jax.Array:
    """Predicted bits of one scale [B, h w, D] -> tokenizer-grid bits [B, h, w, d].

    With patchify (8B), D = 4d on the (h, w) transformer grid -> pixel_shuffle -> [B, 2h, 2w, d].
    """
    B, _, D = bits_BlD.shape
    grid = bits_BlD.reshape(B, hw[0], hw[1], D)
    return pixel_shuffle(grid, 2) if apply_spatial_patchify else grid


def accumulate_and_next_input(summed_codes_BHWd: jax.Array | None, codes_BhwD: jax.Array, next_hw: HW | None,
                              final_hw: HW, is_last: bool, *, apply_spatial_patchify: bool = False
                              ) -> tuple[jax.Array, jax.Array | None]:
    """One scale of the sampler: add this scale's codes to the running sum, make the next input.

    Upstream `autoregressive_infer_cfg` (vae_type != 0):
        summed += trilinear(codes, final)          (at the last scale: summed += codes)
        next = trilinear(summed, next)  -> [pixel_unshuffle(2)] -> row-major tokens

    Args:
      summed_codes_BHWd: running sum [B, H, W, d] at the final tokenizer size, or None at scale 0.
      codes_BhwD: this scale's codes [B, h, w, d] on the tokenizer grid (`bits_to_codes(bits)`; with
        patchify, first `bits_from_tokens(..., apply_spatial_patchify=True)`).
      next_hw: the next scale's (h, w) on the tokenizer grid (doubled transformer size with patchify);
        ignored when `is_last`.
      final_hw: (H, W) of the last scale on the tokenizer grid.
      is_last: this is the last scale: add the codes as they are (they must be (H, W)) and return None.
      apply_spatial_patchify: 8B: the next input is pixel-unshuffled to [B, (h/2)(w/2), 4d].

    Returns:
      (new summed codes [B, H, W, d], next-scale input [B, l, d or 4d] float32 or None).
    """
    final_hw = _hw(final_hw)
    if summed_codes_BHWd is None:
        summed_codes_BHWd = jnp.zeros(codes_BhwD.shape[:1] + final_hw + codes_BhwD.shape[-1:], F32)
    if is_last:
        if tuple(codes_BhwD.shape[1:3]) != final_hw:
            raise ValueError(f"last-scale codes have size {codes_BhwD.shape[1:3]}, expected {final_hw}")
        return summed_codes_BHWd + codes_BhwD.astype(F32), None
    summed = summed_codes_BHWd + bilinear_resize(codes_BhwD.astype(F32), final_hw)
    nxt = bilinear_resize(summed, next_hw)
    return summed, tokens(nxt, apply_spatial_patchify)


def transformer_inputs(raw_BHWd: jax.Array, schedule: Sequence[Sequence[int]], *, noise_apply_layers: int = 0,
                       noise_apply_strength: float = 0.0, rng: jax.Array | None = None,
                       apply_spatial_patchify: bool = False) -> tuple[jax.Array, jax.Array]:
    """Bit labels and teacher-forced next-scale inputs of Infinity's training step.

    Upstream `BitwiseSelfCorrection.flip_requant` (docs/infinity.md section 5 step 2): for each scale,
    the residual `raw - cum` is area-downsampled (except at the last scale) and quantised; its bits are
    the labels. With self-correction, for scales s < `noise_apply_layers` the bits are flipped with a
    random rate p in {0, 0.01, ..., noise_apply_strength} and the re-quantised flipped codes feed the
    cumulative sum, so later residuals (and labels) correct the errors. The next input is the
    bilinear (no antialias) resize of the cumulative codes to the next scale, as row-major tokens.

    Args:
      raw_BHWd: raw encoder features [B, H, W, d] (tokenizer grid; channels last).
      schedule: transformer scales ((1, 1, 1), ..., (1, h, w)); with `apply_spatial_patchify` the
        tokenizer grid is twice as large, so (H, W) = 2 (h, w); otherwise (H, W) = (h, w).
      noise_apply_layers: flip bits at scales s < this (0 or negative: no self-correction).
      noise_apply_strength: the largest flip rate (upstream train.sh: 0.3).
      rng: PRNG key, required when flips are on.
      apply_spatial_patchify: 8B: tokens hold 2x2 latent patches (4d bits, torch pixel_unshuffle order).

    Returns:
      gt_bits_BLd: int8 [B, L, D] unflipped bits, scales concatenated (D = d, or 4d with patchify).
      x_BLC_wo_prefix: float32 [B, L - l_0, D] inputs of scales 1..K-1 (the start token is not included).
    """
    sizes = vae_schedule(schedule, apply_spatial_patchify)
    _check_latent(raw_BHWd, sizes)
    noisy = noise_apply_layers > 0 and noise_apply_strength > 0
    if noisy and rng is None:
        raise ValueError("bitwise self-correction (noise_apply_layers > 0) needs an rng key")
    final = sizes[-1]
    raw = raw_BHWd.astype(F32)
    cum = jnp.zeros_like(raw)
    labels, inputs = [], []
    for si, hw in enumerate(sizes):
        last = si == len(sizes) - 1
        residual = raw - cum
        if not last:
            residual = area_resize(residual, hw)
        bits, q = quantize(residual)
        labels.append(tokens(bits, apply_spatial_patchify))
        if noisy and si < noise_apply_layers:
            flipped, _ = flip_bits(bits, jax.random.fold_in(rng, si), noise_apply_strength)
            q = bits_to_codes(flipped)
        cum = cum + bilinear_resize(q, final)
        if not last:
            inputs.append(tokens(bilinear_resize(cum, sizes[si + 1]), apply_spatial_patchify))
    gt = jnp.concatenate(labels, axis=1)
    if inputs:
        x = jnp.concatenate(inputs, axis=1)
    else:
        x = jnp.zeros((raw.shape[0], 0, gt.shape[-1]), F32)
    return gt, x


transformer_inputs_jit = jax.jit(
    transformer_inputs,
    static_argnames=("schedule", "noise_apply_layers", "noise_apply_strength", "apply_spatial_patchify"))
multiscale_quantize_jit = jax.jit(multiscale_quantize, static_argnames=("schedule",))
decode_bits_jit = jax.jit(decode_bits, static_argnames=("schedule",))
