"""Attention: one function with swappable kernels, and the masks of the VAR sequence.

`dot_product_attention(q, k, v, mask, scale, implementation)` takes [B, L, H, hd] inputs and a
boolean mask broadcastable to [B, H, Lq, Lk] (True = visible), or the block-causal mask as structure
(`ScaleBlocks`, the `scales` implementation). `xla` works everywhere and computes the
softmax in float32 (used for parity); `chunked` is the same math over blocks of `chunk` queries, each
block rematerialised in the backward pass, so memory grows with chunk x L instead of L x L (what a 1024 px
training step needs: a full 2B attention matrix is 14 GB); `cudnn` calls JAX's fused kernel (GPU, bf16/fp16).
`scales` never builds the mask: the queries of scale s attend, unmasked, to the keys of scales <= s
(a prefix of the sequence), so no padding, no L x L mask and no masked-out entries are computed (44% of
the padded work at 256 px, 7 scales); scales longer than `chunk` are chunked as above, and consecutive
small scales share one block of <= `MERGE_SCALES` queries under a small static mask (fewer tiny ops).
Same math as `xla` on every real token.

The self-attention mask is block-causal across scales: a token of scale s sees every token of scales
<= s (full attention inside a scale). Rows added to pad the sequence to a multiple of 128 see only
token 0 and are never seen, so they change nothing, as upstream.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from varejax.models import schedules

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "scales", "splash")
# `scales`: consecutive small scales share one masked block of at most this many queries.
MERGE_SCALES = 128


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ScaleBlocks:
    """The block-causal self-attention mask as structure: the token count of every scale, in order.

    A token of scale s sees every token of scales <= s, i.e. the keys [0, end of scale s). A static
    pytree (no array leaves), so it passes through jax.checkpoint / jit arguments as the mask does.
    """

    lengths: tuple[int, ...]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | ScaleBlocks | None, *,
                          scale: float, implementation: str = "xla", precision: str = "highest",
                          chunk: int = 256) -> jax.Array:
    """softmax(q k^T * scale + mask) v over [B, L, H, hd] inputs; returns [B, Lq, H, hd] in q's dtype."""
    if isinstance(mask, ScaleBlocks):
        if implementation == "splash":  # q, k, v padded to a multiple of 128 (Infinity pads them for splash)
            from varejax.models.splash import splash_block_causal

            return splash_block_causal(q, k, v, mask.lengths, scale=scale)
        return scale_blocked_attention(q, k, v, mask, scale=scale, precision=precision, chunk=chunk)
    if implementation in ("scales", "splash"):  # an ordinary mask (text rows, KV-cache steps): plain attention
        implementation = "xla"
    if implementation == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
        if mask is not None:  # cuDNN wants the mask at full [B, H, Lq, Lk] size (a text mask is [B, 1, 1, T])
            mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if implementation == "cudnn":  # float32 (the text pool, parity runs): cuDNN has no kernel for it
        implementation = "xla"
    if implementation == "chunked":
        return chunked_attention(q, k, v, mask, scale=scale, precision=precision)
    if implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}")
    logits = jnp.einsum("blhd,bmhd->bhlm", q, k, precision=precision, preferred_element_type=jnp.float32)
    logits = logits * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhlm,bmhd->blhd", weights.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float,
                      precision: str = "highest", chunk: int = 256) -> jax.Array:
    """`xla` attention over blocks of `chunk` queries (sequential, each block rematerialised)."""
    B, Lq, H, hd = q.shape
    if Lq <= chunk:
        return dot_product_attention(q, k, v, mask, scale=scale, implementation="xla", precision=precision)
    n = -(-Lq // chunk)
    pad = n * chunk - Lq
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, chunk, H, hd).swapaxes(0, 1)
    if mask is None:
        mask_blocks = None
    else:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (Lq, k.shape[1]))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        mask_blocks = mask.reshape(mask.shape[:2] + (n, chunk, k.shape[1])).transpose(2, 0, 1, 3, 4)

    @jax.checkpoint
    def one_block(args):
        q_block, mask_block = args
        return dot_product_attention(q_block, k, v, mask_block, scale=scale, implementation="xla",
                                     precision=precision)

    out = jax.lax.map(one_block, (q_blocks, mask_blocks))  # [n, B, chunk, H, hd]
    return out.swapaxes(0, 1).reshape(B, n * chunk, H, hd)[:, :Lq]


def scale_groups(lengths: tuple[int, ...], merge: int) -> list[tuple[int, int]]:
    """(start, end) token ranges of consecutive scales merged while a group stays <= `merge` tokens
    (a scale longer than `merge` is a group of its own)."""
    groups, start, end = [], 0, 0
    for n in lengths:
        if end > start and end + n - start > merge:
            groups.append((start, end))
            start = end
        end += n
    groups.append((start, end))
    return groups


def scale_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, blocks: ScaleBlocks, *, scale: float,
                            precision: str = "highest", chunk: int = 256, merge: int | None = None) -> jax.Array:
    """Block-causal attention without padding: each scale's queries against the key prefix they see.

    Small scales are merged into groups of <= `merge` tokens that share one (masked) block: seven
    separate tiny matmuls per layer cost more in op overhead, and in their backward's pads and adds,
    than the few masked logits of a merged group.
    """
    if sum(blocks.lengths) != q.shape[1] or k.shape[1] != q.shape[1]:
        raise ValueError(f"scale lengths {blocks.lengths} do not add up to the sequence length {q.shape[1]}")
    # Heads-major once ([B, H, L, hd]), so that every scale's slice is contiguous for its matmuls.
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    ids = np.repeat(np.arange(len(blocks.lengths)), blocks.lengths)
    outs = []
    for start, end in scale_groups(blocks.lengths, MERGE_SCALES if merge is None else merge):
        k_seen, v_seen = kh[:, :, :end], vh[:, :, :end]
        one = functools.partial(_heads_major_attention, scale=scale, precision=precision)
        if ids[start] != ids[end - 1]:  # several scales: a static block-causal mask inside the group
            visible = ids[None, :end] <= ids[start:end, None]
            outs.append(one(qh[:, :, start:end], k_seen, v_seen, visible=visible))
            continue
        q_chunks = [qh[:, :, c:min(c + chunk, end)] for c in range(start, end, chunk)]
        one = one if len(q_chunks) == 1 else jax.checkpoint(one)  # chunks: recomputed in the backward
        outs += [one(q_chunk, k_seen, v_seen) for q_chunk in q_chunks]
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3).astype(q.dtype)


def _heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, precision: str,
                           visible: np.ndarray | None = None) -> jax.Array:
    """Softmax attention on [B, H, L, hd] inputs (float32 softmax), optionally under a static [Lq, Lk]
    mask; returns [B, H, Lq, hd]."""
    logits = jnp.einsum("bhld,bhmd->bhlm", q, k, precision=precision, preferred_element_type=jnp.float32)
    logits = logits * scale
    if visible is not None:
        logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhlm,bhmd->bhld", weights.astype(v.dtype), v, precision=precision,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def block_causal_mask(schedule: schedules.Schedule, padded_length: int | None = None) -> jax.Array:
    """[1, 1, Lp, Lp] bool: block-causal over scales; padding rows see only token 0.

    Built inside the trace from [Lp] index vectors, so no L x L constant enters the program.
    """
    ids = schedules.scale_ids(schedule)
    length = ids.shape[0]
    padded_length = length if padded_length is None else padded_length
    ids = np.concatenate([ids, np.full(padded_length - length, np.iinfo(np.int32).max, np.int32)])
    row = jnp.asarray(ids)[:, None]
    col = jnp.asarray(ids)[None, :]
    is_pad_row = row == np.iinfo(np.int32).max
    first_col = jnp.arange(padded_length)[None, :] == 0
    mask = jnp.where(is_pad_row, first_col, col <= row)
    return mask[None, None]


def text_mask_for_attention(text_mask: jax.Array) -> jax.Array:
    """[B, T] validity of text rows -> [B, 1, 1, T] attention mask."""
    return text_mask.astype(bool)[:, None, None, :]
