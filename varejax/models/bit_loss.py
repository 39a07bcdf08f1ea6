"""Infinity's training loss: a 2-class cross entropy per bit, averaged over bits, weighted over tokens.

Upstream trainer: `CrossEntropyLoss(reduction='none')` on logits reshaped to [B, L, d, 2] (class 1 =
bit 1), mean over the d bits, then per-token weights `lw`, a sum over L and a mean over B. `lw` is
uniform (1/L), or with `reweight_loss_by_scale` proportional to sqrt(h_K w_K) / sqrt(h_s w_s) for a
token of scale s, normalised to sum to 1 (upstream's code calls `.prod()` on a tuple there; this is
the evident intent, as the fixtures implement it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varejax.models import apply, schedules
from varejax.models.config import InfinityConfig


def bit_logits(logits_BLV: jax.Array) -> jax.Array:
    """[B, L, 2d] -> [B, L, d, 2]: bit k uses channels (2k, 2k+1)."""
    B, L, V = logits_BLV.shape
    return logits_BLV.reshape(B, L, V // 2, 2)


def bit_cross_entropy(logits_BLV: jax.Array, bits_BLd: jax.Array) -> jax.Array:
    """Per-bit cross entropy [B, L, d] (float32) of the bit labels under the logits."""
    # Two classes: -log softmax(l)[bit] = softplus(l_other - l_bit), a select instead of a gather (whose
    # gradient would be a scatter: the slowest op of the backward pass on CPU).
    pairs = bit_logits(logits_BLV.astype(jnp.float32))
    one = bits_BLd.astype(bool)
    margin = jnp.where(one, pairs[..., 0] - pairs[..., 1], pairs[..., 1] - pairs[..., 0])
    return jax.nn.softplus(margin)


@functools.lru_cache(maxsize=64)
def token_weights(schedule: schedules.Schedule, reweight_by_scale: bool) -> np.ndarray:
    """[L] float32 token weights summing to 1: uniform, or proportional to 1/sqrt(area of the scale)."""
    lengths = schedules.scale_lengths(schedule)
    if not reweight_by_scale:
        weights = np.full(sum(lengths), 1.0 / sum(lengths))
    else:
        last = float(np.sqrt(lengths[-1]))
        weights = np.concatenate([np.full(n, last / np.sqrt(n)) for n in lengths])
        weights = weights / weights.sum()
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def training_loss(logits_BLV: jax.Array, bits_BLd: jax.Array, schedule: schedules.Schedule,
                  reweight_by_scale: bool = False) -> jax.Array:
    """Scalar loss: mean over bits, weighted sum over tokens, mean over the batch."""
    per_token = bit_cross_entropy(logits_BLV, bits_BLd).mean(axis=-1)
    weights = jnp.asarray(token_weights(schedules.as_schedule(schedule), reweight_by_scale))
    return jnp.mean(jnp.sum(per_token * weights, axis=-1))


def bit_accuracy(logits_BLV: jax.Array, bits_BLd: jax.Array) -> jax.Array:
    """Fraction of bits whose argmax matches the label (ties count as bit 0, as torch argmax)."""
    pairs = bit_logits(logits_BLV)
    return jnp.mean((pairs[..., 1] > pairs[..., 0]).astype(jnp.int32) == bits_BLd.astype(jnp.int32))


def loss_fn(params: nnx.State, text: jax.Array, text_mask: jax.Array, next_scale_inputs: jax.Array,
            gt_bits: jax.Array, schedule: schedules.Schedule, *, cfg: InfinityConfig,
            reweight_by_scale: bool = False, h_div_w_template: float | None = None,
            rng: jax.Array | None = None) -> jax.Array:
    """The training loss of the teacher-forced forward, as a pure function of the parameters."""
    logits = apply.forward(params, text, text_mask, next_scale_inputs, schedule, cfg=cfg,
                           h_div_w_template=h_div_w_template, rng=rng)
    return training_loss(logits, gt_bits, schedule, reweight_by_scale)


_STATIC = ("schedule", "cfg", "reweight_by_scale", "h_div_w_template")
loss_and_grad_jit = jax.jit(jax.value_and_grad(loss_fn), static_argnames=_STATIC)
