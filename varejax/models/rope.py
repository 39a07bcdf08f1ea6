"""2-D rotary position embedding of Infinity (`rope2d_normalized_by_hw=2`).

A token at grid position (y, x) of a scale (h, w) is rotated by the angles
`concat(y * inv_freq, x * inv_freq)` (height frequencies first), where positions are rescaled to the
template's final 1M grid (uph, upw): `y = round(arange(h) * uph / h)` with float32 arithmetic and
round-half-to-even, as upstream's torch code. So a 256-px run uses positions spaced for the 64-wide
grid. The rotation acts on interleaved pairs (q[2i], q[2i+1]), not on rotate-half layout.
The table is recomputed here; it is not part of any checkpoint.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from varejax.models import schedules


def inverse_frequencies(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """[head_dim/4] float32: 1 / base^(2i / (head_dim/2)), computed in float32 as upstream."""
    half = head_dim // 2
    exponents = np.arange(0, half, 2).astype(np.float32) / np.float32(half)
    return (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)


def grid_positions(schedule: schedules.Schedule, h_div_w_template: float | None = None) -> np.ndarray:
    """[L, 2] int32 (y, x) positions of every token, normalised to the template's final grid."""
    template = schedules.template_for(schedule) if h_div_w_template is None else h_div_w_template
    uph, upw = schedules.final_grid(template)
    rows = []
    for _, h, w in schedule:
        ys = np.round(np.arange(h, dtype=np.float32) * np.float32(uph / h)).astype(np.int32)
        xs = np.round(np.arange(w, dtype=np.float32) * np.float32(upw / w)).astype(np.int32)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        rows.append(np.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1))
    return np.concatenate(rows, axis=0)


@functools.lru_cache(maxsize=64)
def rope_table(schedule: schedules.Schedule, head_dim: int, h_div_w_template: float | None = None,
               pad_to_multiplier: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [L_padded, head_dim/2] float32, for the tokens of `schedule`.

    Padding rows are zero (as upstream's table), which is harmless: padded rows are discarded.
    """
    inv_freq = inverse_frequencies(head_dim)
    pos = grid_positions(schedule, h_div_w_template).astype(np.float32)
    angles = np.concatenate([np.outer(pos[:, 0], inv_freq), np.outer(pos[:, 1], inv_freq)], axis=-1)
    angles = angles.astype(np.float32)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    length = schedules.padded_length(schedule, pad_to_multiplier)
    if length > cos.shape[0]:
        pad = ((0, length - cos.shape[0]), (0, 0))
        cos, sin = np.pad(cos, pad), np.pad(sin, pad)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates interleaved pairs of `x` [B, L, H, hd] by the angles of cos/sin [L, hd/2]."""
    dtype = x.dtype
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = jnp.stack([c * a - s * b, s * a + c * b], axis=-1)
    return out.reshape(x.shape).astype(dtype)
