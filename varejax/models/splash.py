"""Splash attention (Pallas, TPU) under Infinity's block-causal scale mask: `attention_impl="splash"`.

JAX's splash kernel skips every (query block, key block) tile the mask hides entirely, so the
block-causal self-attention costs about the visible fraction of the full matrix, in one fused kernel
forward and backward. The mask is static: it is built here, in numpy, from the scale lengths and the
padded length (padding rows see only token 0, as `attention.block_causal_mask`), and one kernel is
made per (scales, length, heads). The sequence is padded to a multiple of the kernel's 128-row blocks.

On a backend other than TPU the kernel runs in Pallas interpret mode: the same blocks and the same
online softmax, slowly, which is how the CPU tests check it against the masked `xla` path.
Sharded meshes: a pallas_call is not partitioned by GSPMD (it would gather its inputs onto every
device), so inside a `sharding_context` whose mesh has more than one device the kernel runs under
`shard_map`: each device attends over its own examples and heads (the mesh axes `act_batch` and
`act_heads` map to, as the rules table says), over the whole sequence, which no rule shards.
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
    # The kernel's mask tables are arrays made on construction: made eagerly here, so that a kernel
    # first built inside a trace (jit, shard_map) is still valid when the cache hands it to another one.
    with jax.ensure_compile_time_eval():
        return kernel_lib.make_splash_mha_single_device(mask_lib.MultiHeadMask([one] * heads),
                                                        block_sizes=blocks, interpret=interpret)


def splash_block_causal(q: jax.Array, k: jax.Array, v: jax.Array, lengths: tuple[int, ...], *,
                        scale: float) -> jax.Array:
    """Block-causal attention of [B, Lp, H, hd] inputs (Lp: the scales' tokens plus padding, a multiple
    of 128) through the splash kernel; returns [B, Lp, H, hd] in q's dtype."""
    B, Lp, H, hd = q.shape
    if Lp % BLOCK:
        raise ValueError(f"splash attention needs the sequence padded to a multiple of {BLOCK}, got {Lp} "
                         f"(pad_to_multiplier)")
    interpret = jax.default_backend() != "tpu"
    heads_major = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731 - the kernel takes [H, L, hd] per example

    def local(q, k, v):  # [b, Lp, h, hd] of one device (or all of them, unsharded)
        kernel = _kernel(tuple(lengths), Lp, q.shape[2], interpret)
        return heads_major(jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v)))

    spec = _device_spec(q.shape)
    if spec is None:
        out = local(q * scale, k, v)
    else:
        mesh, spec = spec
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                            check_vma=False)(q * scale, k, v)
    return out.astype(q.dtype)


def _device_spec(shape: tuple[int, ...]):
    """(mesh, PartitionSpec of [B, Lp, H, hd]) under a multi-device `sharding_context`, else None. The
    sequence and head width stay whole on every device: the kernel needs every key of its queries."""
    from varejax.parallel.rules import active_sharding, logical_to_spec

    active = active_sharding()
    if active is None or active[0].size == 1:
        return None
    mesh, rules = active
    spec = logical_to_spec(("act_batch", None, "act_heads", None), rules, mesh, shape)
    return mesh, spec
