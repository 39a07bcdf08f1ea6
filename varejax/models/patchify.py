"""Spatial patchify of Infinity-8B: 2x2 latent patches form one transformer token of 4d bits.

Channels-last versions of torch's `pixel_shuffle(x, 2)` / `pixel_unshuffle(x, 2)`, with torch's
channel order: channel `c * 4 + 2 * i + j` of a token holds latent channel c at offset (i, j) of
its 2x2 patch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pixel_unshuffle(x_BHWC: jax.Array, r: int = 2) -> jax.Array:
    """[B, H, W, C] -> [B, H/r, W/r, C r^2] (torch pixel_unshuffle channel order)."""
    B, H, W, C = x_BHWC.shape
    if H % r or W % r:
        raise ValueError(f"spatial size {(H, W)} is not divisible by {r}")
    x = x_BHWC.reshape(B, H // r, r, W // r, r, C)          # b, h, i, w, j, c
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))                # b, h, w, c, i, j
    return x.reshape(B, H // r, W // r, C * r * r)


def pixel_shuffle(x_BHWC: jax.Array, r: int = 2) -> jax.Array:
    """[B, H, W, C r^2] -> [B, H r, W r, C] (torch pixel_shuffle channel order)."""
    B, H, W, Crr = x_BHWC.shape
    if Crr % (r * r):
        raise ValueError(f"channels {Crr} are not divisible by {r * r}")
    C = Crr // (r * r)
    x = x_BHWC.reshape(B, H, W, C, r, r)                    # b, h, w, c, i, j
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))                # b, h, i, w, j, c
    return x.reshape(B, H * r, W * r, C)
