"""Splash attention (Pallas, TPU) under Infinity's block-causal scale mask: `attention_impl="splash"`.

JAX's splash kernel skips every (query block, key block) tile the mask hides entirely, so the
block-causal self-attention costs about the visible fraction of the full matrix, in one fused kernel
forward and backward. The mask is static: it is built here, in numpy, from the scale lengths and the
padded length (padding rows see only token 0, as `attention.block_causal_mask`), and one kernel is
made per (scales, length, heads). The sequence is padded to a multiple of the kernel's 128-row blocks.

On a backend other than TPU the kernel runs in Pallas interpret mode: the same blocks and the same
online softmax, slowly, which is how the CPU tests check it against the masked `xla` path.
Sharded meshes: the kernel is called per example under `vmap`; a pallas_call is not partitioned by
GSPMD, so on a multi-device mesh it needs a `shard_map` over the batch and heads (not wired yet).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

BLOCK = 128  # the kernel's query/key block rows; the padded length must be a multiple


def block_causal_numpy(lengths: tuple[int, ...], padded_length: int) -> np.ndarray:
    """[Lp, Lp] bool: token i sees token j when scale(j) <= scale(i); padding rows see only token 0."""
    ids = np.repeat(np.arange(len(lengths)), lengths)
    if padded_length < ids.size:
        raise ValueError(f"padded length {padded_length} is shorter than the {ids.size} tokens of the scales")
    visible = np.zeros((padded_length, padded_length), bool)
    visible[:ids.size, :ids.size] = ids[None, :] <= ids[:, None]
    visible[ids.size:, 0] = True
    return visible


def _block_size(padded_length: int) -> int:
    return next(size for size in (512, 256, BLOCK) if padded_length % size == 0)


@functools.lru_cache(maxsize=16)
def _kernel(lengths: tuple[int, ...], padded_length: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    one = mask_lib.NumpyMask(block_causal_numpy(lengths, padded_length))
    size = _block_size(padded_length)
    blocks = kernel_lib.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                                   block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)
    return kernel_lib.make_splash_mha_single_device(mask_lib.MultiHeadMask([one] * heads), block_sizes=blocks,
                                                    interpret=interpret)


def splash_block_causal(q: jax.Array, k: jax.Array, v: jax.Array, lengths: tuple[int, ...], *,
                        scale: float) -> jax.Array:
    """Block-causal attention of [B, Lp, H, hd] inputs (Lp: the scales' tokens plus padding, a multiple
    of 128) through the splash kernel; returns [B, Lp, H, hd] in q's dtype."""
    B, Lp, H, hd = q.shape
    if Lp % BLOCK:
        raise ValueError(f"splash attention needs the sequence padded to a multiple of {BLOCK}, got {Lp} "
                         f"(pad_to_multiplier)")
    kernel = _kernel(tuple(lengths), Lp, H, jax.default_backend() != "tpu")
    heads_major = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731 - the kernel takes [H, L, hd] per example
    out = jax.vmap(kernel)(heads_major(q * scale), heads_major(k), heads_major(v))
    return heads_major(out).astype(q.dtype)
