"""Infinity's bitwise tokenizer (BSQ-VAE, `infinity/models/bsq_vae`) in Flax NNX: encoder and decoder.

A flux-style convolutional autoencoder without attention (docs/infinity.md section 6):

  encoder: conv_in -> per level i: num_res_blocks ResnetBlocks (+ a stride-2 downsample for
           i < log2(patch)) -> mid (2 ResnetBlocks) -> GroupNorm -> swish -> conv_out (d channels)
  decoder: conv_in -> mid -> levels from last to 0: num_res_blocks + 1 ResnetBlocks (+ nearest x2
           and a 3x3 conv for 1 <= i <= log2(patch)) -> GroupNorm -> swish -> conv_out; clamp to [-1, 1]

ResnetBlock = norm1 -> swish -> conv1 (3x3) -> norm2 -> swish -> conv2 (3x3), plus a 1x1
`nin_shortcut` when the channel count changes. GroupNorm has 32 groups (24 when C % 32 != 0), eps
1e-6, affine. The downsample pads one zero row at the bottom and one zero column at the right, then
applies a 3x3 stride-2 convolution without padding.

The multi-scale bit quantiser that turns the encoder's raw features into per-scale bits lives in
`varejax/models/bitwise.py`. Images and latents are channels-last everywhere in our API: images
[B, H, W, 3] in [-1, 1], latents [B, h, w, d] (upstream is channels-first).

Pure functions: `encode(params, images_BHWC, cfg)` -> raw features [B, H/p, W/p, d] float32;
`decode(params, summed_codes_BhwD, cfg)` -> images in [-1, 1]; `encode_jit` / `decode_jit`;
`init_vae_params`, `abstract_vae_params`; `varejax.checkpoint.load_vae(model_dir)` loads a folder
written by `varejax convert vae`.

Presets: `d32` (Infinity-2B tokenizer: d 32, patch 16, ch_mult 1,2,4,4,4), `d14` (Infinity-8B: d 14,
patch 8, ch_mult 1,2,4,4; the 8B transformer patchifies 2x2 latents), and `tiny` (the infinity_tiny
fixture: d 32, patch 16, base_ch 32, ch_mult 1,1,1,2,2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from varejax.models import state
from varejax.models.config_base import ModelConfig, lookup_preset
from varejax.models.layers import F32, dtype_of, param
from varejax.models.patchify import pixel_shuffle, pixel_unshuffle
from varejax.parallel import constrain

# Fields that fix the parameter shapes; the rest is numerics.
VAE_ARCH_FIELDS = ("codebook_dim", "patch_size", "ch_mult", "base_ch", "num_res_blocks", "in_channels",
                   "out_channels", "pixel_unshuffle")
GROUP_NORM_EPS = 1e-6
IMAGE_AXES = ("act_batch", None, None, None)


def group_count(channels: int) -> int:
    """Upstream `Normalize`: 32 groups, or 24 when the channels are not a multiple of 32."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"GroupNorm over {channels} channels: upstream needs a multiple of 32 or 24")


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """Architecture and numerics of the BSQ-VAE.

    Attributes:
      codebook_dim: d, bits per latent position (= latent channels; 32 for Infinity-2B, 14 for 8B).
      patch_size: pixels per latent position along each side (a power of two: 16 or 8).
      ch_mult: channel multiplier of each level (encoder and decoder use the same list).
      base_ch: channels of level 0 (upstream fixes 128).
      num_res_blocks: ResnetBlocks per encoder level (the decoder has one more per level).
      in_channels: image channels in (RGB).
      out_channels: image channels out.
      pixel_unshuffle: f > 1 packs each f x f pixel block into channels before the encoder (and unpacks
        after the decoder), so the convolutions run at 1/f resolution (f^2 fewer FLOPs at level 0); the
        latent grid is still the image size / patch_size. 1 (no packing) for every released tokenizer.
      param_dtype: dtype parameters are created/stored in.
      compute_dtype: dtype of convolution inputs; GroupNorm, swish and the residual stream stay float32.
      matmul_precision: `jax.lax.Precision` of float32 convolutions ("highest" for parity on GPU/TPU).
    """

    arch_fields = VAE_ARCH_FIELDS  # not a field: no annotation

    codebook_dim: int = 32
    patch_size: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    base_ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    pixel_unshuffle: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    matmul_precision: str = "highest"

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        problems = []
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            problems.append(f"patch_size {self.patch_size} is not a power of two")
        elif (self.pixel_unshuffle < 1 or self.pixel_unshuffle & (self.pixel_unshuffle - 1)
              or self.patch_size % self.pixel_unshuffle):
            problems.append(f"pixel_unshuffle {self.pixel_unshuffle} must be a power of two dividing patch_size "
                            f"{self.patch_size}")
        elif self.num_downsamples > len(self.ch_mult) - 1:
            problems.append(f"patch_size {self.patch_size} needs {self.num_downsamples} downsamples, but ch_mult "
                            f"{list(self.ch_mult)} has only {len(self.ch_mult)} levels (at most levels - 1)")
        if not self.ch_mult or min(self.ch_mult) < 1:
            problems.append(f"ch_mult must be a non-empty list of positive ints, got {list(self.ch_mult)}")
        if self.num_res_blocks < 1 or self.codebook_dim < 1:
            problems.append("num_res_blocks and codebook_dim must be >= 1")
        for channels in sorted({self.base_ch * m for m in self.ch_mult} | {self.base_ch}):
            try:
                group_count(channels)
            except ValueError as err:
                problems.append(str(err))
        if self.matmul_precision not in ("default", "high", "highest"):
            problems.append(f"matmul_precision must be default/high/highest, not {self.matmul_precision!r}")
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))

    @property
    def num_downsamples(self) -> int:
        """log2(patch_size / pixel_unshuffle): encoder levels i < this downsample, decoder levels
        1 <= i <= this upsample."""
        if self.patch_size < 1 or self.pixel_unshuffle < 1:
            return 0
        return int(math.log2(self.patch_size // self.pixel_unshuffle))

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.base_ch * m for m in self.ch_mult)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {(height, width)} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    # ---- (de)serialisation (replace, from_dict, arch_dict: ModelConfig) ---------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ch_mult": list(self.ch_mult)}

    @classmethod
    def from_upstream(cls, vae_config: dict[str, Any], **overrides: Any) -> VAEConfig:
        """From upstream `vae_model(...)` arguments as a fixture's `vae_config` stores them.

        Keys: codebook_dim, patch_size, ch_mult (or encoder_ch_mult == decoder_ch_mult), and the
        AutoEncoder args base_ch / num_res_blocks (upstream defaults 128 / 2). Other keys are ignored.
        """
        enc = vae_config.get("encoder_ch_mult", vae_config.get("ch_mult"))
        dec = vae_config.get("decoder_ch_mult", enc)
        if enc is None or "codebook_dim" not in vae_config or "patch_size" not in vae_config:
            raise ValueError(f"upstream vae_config needs codebook_dim, patch_size and ch_mult; "
                             f"got {sorted(vae_config)}")
        if list(enc) != list(dec):
            raise ValueError(f"encoder_ch_mult {enc} != decoder_ch_mult {dec}: not supported (every released "
                             f"tokenizer uses one list)")
        fields = dict(codebook_dim=int(vae_config["codebook_dim"]), patch_size=int(vae_config["patch_size"]),
                      ch_mult=tuple(int(m) for m in enc), base_ch=int(vae_config.get("base_ch", 128)),
                      num_res_blocks=int(vae_config.get("num_res_blocks", 2)))
        fields.update(overrides)
        return cls(**fields)


VAE_PRESETS: dict[str, VAEConfig] = {
    # vae_type=32 of tools/run_infinity.py: infinity_vae_d32reg.pth (Infinity-2B).
    "d32": VAEConfig(codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4)),
    # vae_type=14 with apply_spatial_patchify: infinity_vae_d56_f8_14_patchify.pth (Infinity-8B).
    "d14": VAEConfig(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4)),
    # The infinity_tiny fixture's tokenizer.
    "tiny": VAEConfig(codebook_dim=32, patch_size=16, ch_mult=(1, 1, 1, 2, 2), base_ch=32),
}
VAE_PRESET_ALIASES = {"2b": "d32", "infinity_2b": "d32", "8b": "d14", "infinity_8b": "d14"}


def get_vae_preset(name: str) -> VAEConfig:
    return lookup_preset(name, VAE_PRESETS, VAE_PRESET_ALIASES, "VAE")


# ---- modules ---------------------------------------------------------------------------------------

def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), in float32."""
    x = x.astype(F32)
    return x * jax.nn.sigmoid(x)


class Conv2d(nnx.Module):
    """2-D convolution, kernel stored [kh, kw, in, out] (torch [out, in, kh, kw] is transposed on import).

    `padding` is ((top, bottom), (left, right)) zeros; upstream's downsample is ((0, 1), (0, 1)).
    """

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, n_in: int, n_out: int, kernel_size: int = 3, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] | None = None):
        fan_in = n_in * kernel_size * kernel_size
        self.kernel = param(rngs, (kernel_size, kernel_size, n_in, n_out), (None, None, "conv_in", "conv_out"),
                            cfg.param_dtype, std=(1.0 / (3.0 * fan_in)) ** 0.5)
        self.bias = param(None, (n_out,), ("conv_out",), cfg.param_dtype)
        pad = kernel_size // 2
        self.padding = padding if padding is not None else ((pad, pad), (pad, pad))
        self.stride = stride
        self.compute_dtype = cfg.compute_dtype
        self.precision = cfg.matmul_precision

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = dtype_of(self.compute_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), self.kernel[...].astype(dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision, preferred_element_type=F32)
        return y + self.bias[...].astype(F32)


class GroupNorm(nnx.Module):
    """torch `nn.GroupNorm(groups, C, eps=1e-6, affine=True)` over [B, H, W, C], in float32."""

    def __init__(self, cfg: VAEConfig, channels: int):
        self.groups = group_count(channels)
        self.scale = param(None, (channels,), ("norm",), cfg.param_dtype, fill=1.0)
        self.bias = param(None, (channels,), ("norm",), cfg.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Two passes (mean, then the variance of the centred values, as torch), each reducing per channel over
        # H and W first, channels minor, and only then per group on the small [B, C] sums: XLA:CPU reduces
        # the [B, H, W, G, C/G] view over (1, 2, 4) up to 5x slower (2 x 128 x 128 x 64: 9.3 vs 1.7 ms).
        B, H, W, C = x.shape
        per_group = C // self.groups
        count = H * W * per_group
        x = x.astype(F32)

        def group_mean(channel_sums):  # [B, C] -> the mean of each channel's group, per channel [B, 1, 1, C]
            means = channel_sums.reshape(B, self.groups, per_group).sum(-1) / count
            return jnp.repeat(means, per_group, axis=1)[:, None, None, :]

        centred = x - group_mean(jnp.sum(x, axis=(1, 2)))
        var = group_mean(jnp.sum(jnp.square(centred), axis=(1, 2)))
        scale = jax.lax.rsqrt(var + GROUP_NORM_EPS) * self.scale[...].astype(F32)
        return centred * scale + self.bias[...].astype(F32)


class ResnetBlock(nnx.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus x (through a 1x1 conv if C changes)."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, n_in: int, n_out: int):
        self.norm1 = GroupNorm(cfg, n_in)
        self.conv1 = Conv2d(cfg, rngs, n_in, n_out)
        self.norm2 = GroupNorm(cfg, n_out)
        self.conv2 = Conv2d(cfg, rngs, n_out, n_out)
        self.nin_shortcut = Conv2d(cfg, rngs, n_in, n_out, kernel_size=1) if n_in != n_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return constrain(x.astype(F32) + h, IMAGE_AXES)


class Downsample(nnx.Module):
    """Zero-pad bottom and right by one, then a 3x3 stride-2 convolution without padding."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, channels: int):
        self.conv = Conv2d(cfg, rngs, channels, channels, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 (torch F.interpolate(scale_factor=2, mode='nearest')), then a 3x3 conv."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, channels: int):
        self.conv = Conv2d(cfg, rngs, channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: `block` (a list of ResnetBlocks) and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        self.block = nnx.List(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for blk in self.block:
            x = blk(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, channels: int):
        self.block_1 = ResnetBlock(cfg, rngs, channels, channels)
        self.block_2 = ResnetBlock(cfg, rngs, channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.block_1(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        ch = cfg.channels
        self.pixel_unshuffle = cfg.pixel_unshuffle
        self.conv_in = Conv2d(cfg, rngs, cfg.in_channels * cfg.pixel_unshuffle ** 2, cfg.base_ch)
        levels = []
        block_in = cfg.base_ch
        for i, block_out in enumerate(ch):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, rngs, block_in, block_out))
                block_in = block_out
            down = Downsample(cfg, rngs, block_in) if i < cfg.num_downsamples else None
            levels.append(Level(blocks, downsample=down))
        self.down = nnx.List(levels)
        self.mid = Mid(cfg, rngs, block_in)
        self.norm_out = GroupNorm(cfg, block_in)
        self.conv_out = Conv2d(cfg, rngs, block_in, cfg.codebook_dim)

    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        x = images_BHWC.astype(F32)
        if self.pixel_unshuffle > 1:
            x = pixel_unshuffle(x, self.pixel_unshuffle)
        h = constrain(self.conv_in(x), IMAGE_AXES)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return constrain(self.conv_out(swish(self.norm_out(h))), IMAGE_AXES)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        ch = cfg.channels
        block_in = ch[-1]
        self.conv_in = Conv2d(cfg, rngs, cfg.codebook_dim, block_in)
        self.mid = Mid(cfg, rngs, block_in)
        levels: list[Level | None] = [None] * len(ch)
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, rngs, block_in, ch[i]))
                block_in = ch[i]
            up = Upsample(cfg, rngs, block_in) if 1 <= i <= cfg.num_downsamples else None
            levels[i] = Level(blocks, upsample=up)
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(cfg, block_in)
        self.pixel_unshuffle = cfg.pixel_unshuffle
        self.conv_out = Conv2d(cfg, rngs, block_in, cfg.out_channels * cfg.pixel_unshuffle ** 2)

    def __call__(self, z_BhwD: jax.Array) -> jax.Array:
        h = constrain(self.conv_in(z_BhwD.astype(F32)), IMAGE_AXES)
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
        out = self.conv_out(swish(self.norm_out(h)))
        if self.pixel_unshuffle > 1:
            out = pixel_shuffle(out, self.pixel_unshuffle)
        return constrain(out, IMAGE_AXES)


class BSQVAE(nnx.Module):
    """Encoder + decoder of upstream `AutoEncoder` (the quantiser has no parameters)."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)

    def encode(self, images_BHWC: jax.Array) -> jax.Array:
        """Images [B, H, W, C_in] in [-1, 1] -> raw features [B, H/p, W/p, d] float32 (before quantisation)."""
        if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"images must be [B, H, W, {self.cfg.in_channels}] (channels last), "
                             f"got {images_BHWC.shape}")
        self.cfg.latent_size(*images_BHWC.shape[1:3])
        return self.encoder(images_BHWC).astype(F32)

    def decode(self, z_BhwD: jax.Array) -> jax.Array:
        """Latent [B, h, w, d] (summed codes) -> images [B, h p, w p, C_out] clamped to [-1, 1]."""
        if z_BhwD.ndim != 4 or z_BhwD.shape[-1] != self.cfg.codebook_dim:
            raise ValueError(f"latents must be [B, h, w, {self.cfg.codebook_dim}] (channels last), "
                             f"got {z_BhwD.shape}")
        return jnp.clip(self.decoder(z_BhwD), -1.0, 1.0)


# ---- pure-function view ------------------------------------------------------------------------------

def init_vae_params(cfg: VAEConfig, seed: int = 0) -> nnx.State:
    """Freshly initialised parameters (an `nnx.State`; random, not upstream's init)."""
    return state.init_state(BSQVAE, cfg, seed)


def abstract_vae_params(cfg: VAEConfig) -> nnx.State:
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s (no memory)."""
    return state.abstract_state(BSQVAE, cfg)


def vae_state_from_flat(cfg: VAEConfig, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """The parameter state of `cfg` from {path: array}; every path must be present with its shape."""
    return state.fill_state(abstract_vae_params(cfg), flat)


def bind_vae(params: nnx.State, cfg: VAEConfig) -> BSQVAE:
    """The tokenizer of `cfg` with `params` (inside or outside a trace)."""
    return state.bind(BSQVAE, params, cfg)


def encode(params: nnx.State, images_BHWC: jax.Array, cfg: VAEConfig) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> raw features [B, H/p, W/p, d] float32.

    Upstream `encode_for_raw_features(img)[0]` (channels-last here). Feed the result to
    `bitwise.multiscale_quantize` or `bitwise.transformer_inputs`.
    """
    return bind_vae(params, cfg).encode(images_BHWC)


def decode(params: nnx.State, summed_codes_BhwD: jax.Array, cfg: VAEConfig) -> jax.Array:
    """Summed codes (or any latent) [B, h, w, d] -> images [B, h p, w p, 3] clamped to [-1, 1]."""
    return bind_vae(params, cfg).decode(summed_codes_BhwD)


encode_jit = jax.jit(encode, static_argnames=("cfg",))
decode_jit = jax.jit(decode, static_argnames=("cfg",))
