"""The Infinity transformer (FoundationVision/Infinity) in Flax NNX.

Module names mirror upstream's torch modules so that the checkpoint key table stays a few renames
(see `varejax/convert/infinity_keys.py`). The forward pass follows docs/infinity.md section 3:

  text -> RMSNorm -> attentive pool (SOS / cond_BD) and a 2-layer projection (cross-attention keys)
  cond_BD -> shared ada-LN (gamma1, gamma2, scale1, scale2, shift1, shift2) for every block
  [SOS + pos_start, word_embed(next-scale inputs)] + level embedding -> blocks -> ada-LN head
  block: x += SA(LN(x)(1+s1)+b1) g1;  x += CA(ca_norm(x), text);  x += FFN(LN(x)(1+s2)+b2) g2

Shapes use upstream's suffix names: B batch, L tokens, C width, T text rows, d bits per token.
With `cfg.lora_rank > 0` the block Dense layers named by `cfg.lora_targets` carry LoRA factors
(`varejax.models.lora`); every other parameter and the forward of a model without LoRA are unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varejax.models import attention, rope, schedules
from varejax.models.config import InfinityConfig
from varejax.models.layers import (
    F32,
    Dense,
    LayerNorm,
    RMSNorm,
    drop_path,
    gelu_tanh,
    layer_norm,
    lora_a_init,
    materialize_cotangent,
    param,
    round_to_bf16,
    shapes_only_active,
)
from varejax.parallel import constrain

# Upstream clamps the cosine-attention temperature at log(100), computed in float32.
MAX_SCALE_MUL = float(np.float32(np.log(np.float32(100.0))))
BATCH_LEN_EMBED = ("act_batch", "act_len", "act_embed")
BATCH_LEN_HEADS = ("act_batch", "act_len", "act_heads", None)


def _dense(cfg: InfinityConfig, rngs: nnx.Rngs, n_in: int, n_out: int, axes, *, lora: str | None = None,
           **kw) -> Dense:
    """A Dense layer of `cfg`; `lora` = its block-module name ("sa.proj", ...) when it may carry LoRA."""
    if lora is not None and lora in cfg.lora_modules():
        kw.update(lora_rank=cfg.lora_rank, lora_scale=cfg.lora_scale)
    return Dense(n_in, n_out, axes, rngs=rngs, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                 precision=cfg.matmul_precision, **kw)


def init_lora_factors(model: nnx.Module, seed: int) -> None:
    """Gives every `lora_a` of `model` its deterministic initial value (`lora_a_init` by path)."""
    if shapes_only_active():
        return
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Dense) and module.lora_a is not None:
            n_in, rank = module.lora_a.shape
            leaf = tuple(str(p) for p in path) + ("lora_a",)
            module.lora_a.set_value(jnp.asarray(lora_a_init(seed, leaf, n_in, rank), module.lora_a.dtype))


def _cross_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: InfinityConfig) -> jax.Array:
    """Plain scaled attention over text rows; with `ca_bf16_rounding`, q/k/v/out pass through bf16."""
    if cfg.ca_bf16_rounding:
        q, k, v = round_to_bf16(q.astype(F32)), round_to_bf16(k.astype(F32)), round_to_bf16(v.astype(F32))
    out = attention.dot_product_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5,
                                          implementation=cfg.attention_impl, precision=cfg.matmul_precision)
    if cfg.ca_bf16_rounding:
        out = round_to_bf16(out.astype(F32))
    return out


class TextAttentivePool(nnx.Module):
    """The SOS / global condition: a learned query attends over each sample's own text rows.

    Upstream `TextAttentivePool` (a `CrossAttention(for_attn_pool=True)` named `.ca`). Heads come from
    the text width (Ct5 // 128), so the 8B pool has 16 heads of 224.
    """

    def __init__(self, cfg: InfinityConfig, rngs: nnx.Rngs):
        D, T, H, hd = cfg.cond_dim, cfg.text_channels, cfg.pool_heads, cfg.pool_head_dim
        self.num_heads, self.head_dim, self.cfg = H, hd, cfg
        self.mat_q = param(rngs, (1, H, hd), (None, None, None), cfg.param_dtype, std=(1 / D / 3) ** 0.5)
        self.mat_kv = _dense(cfg, rngs, T, 2 * D, ("text_embed", "heads"), use_bias=False)
        self.v_bias = param(None, (D,), ("heads",), cfg.param_dtype)
        self.proj = _dense(cfg, rngs, D, D, ("heads", "embed"))

    def __call__(self, text_BTC: jax.Array, mask_B11T: jax.Array) -> jax.Array:
        B, T, _ = text_BTC.shape
        kv = self.mat_kv(text_BTC).astype(F32)
        D = self.num_heads * self.head_dim
        k = kv[..., :D].reshape(B, T, self.num_heads, self.head_dim)
        v = (kv[..., D:] + self.v_bias[...].astype(F32)).reshape(B, T, self.num_heads, self.head_dim)
        q = jnp.broadcast_to(self.mat_q[...].astype(F32)[:, None], (B, 1, self.num_heads, self.head_dim))
        out = _cross_attend(q, k, v, mask_B11T, self.cfg)
        return self.proj(out.reshape(B, D)).astype(F32)


class TextProjection(nnx.Module):
    """Text features -> cross-attention keys/values source: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, cfg: InfinityConfig, rngs: nnx.Rngs):
        self.fc1 = _dense(cfg, rngs, cfg.text_channels, cfg.cond_dim, ("text_embed", "mlp"))
        self.fc2 = _dense(cfg, rngs, cfg.cond_dim, cfg.cond_dim, ("mlp", "cond"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_tanh(self.fc1(x))).astype(F32)


class SelfAttention(nnx.Module):
    """Cosine self-attention with a clamped per-head temperature and 2-D rope (softmax scale 1)."""

    def __init__(self, cfg: InfinityConfig, rngs: nnx.Rngs):
        C, H = cfg.embed_dim, cfg.num_heads
        self.cfg, self.num_heads, self.head_dim = cfg, H, cfg.head_dim
        self.mat_qkv = _dense(cfg, rngs, C, 3 * C, ("embed", "heads"), use_bias=False, lora="sa.mat_qkv")
        self.q_bias = param(None, (C,), ("heads",), cfg.param_dtype)
        self.v_bias = param(None, (C,), ("heads",), cfg.param_dtype)
        self.scale_mul_1H11 = param(None, (1, H, 1, 1), (None, "norm", None, None), cfg.param_dtype,
                                    fill=float(np.log(4.0)))
        self.proj = _dense(cfg, rngs, C, C, ("heads", "embed"), lora="sa.proj")

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, L, C] -> q, k (normalised, temperature-scaled, rotated) and v, each [B, L, H, hd]."""
        B, L, C = x.shape
        qkv = self.mat_qkv(x).astype(F32)
        zero_k = jnp.zeros((C,), F32)
        qkv = qkv + jnp.concatenate([self.q_bias[...].astype(F32), zero_k, self.v_bias[...].astype(F32)])
        q, k, v = jnp.split(qkv.reshape(B, L, 3, self.num_heads, self.head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        temperature = jnp.exp(jnp.minimum(self.scale_mul_1H11[...].astype(F32), MAX_SCALE_MUL))
        temperature = temperature.reshape(1, 1, self.num_heads, 1)
        # F.normalize: x / max(||x||, 1e-12).
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12) * temperature
        k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        return constrain(q, BATCH_LEN_HEADS), constrain(k, BATCH_LEN_HEADS), constrain(v, BATCH_LEN_HEADS)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Attention (scale 1, the temperature is in q) and the output projection -> [B, Lq, C]."""
        dtype = jnp.dtype(self.cfg.compute_dtype)
        out = attention.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, scale=1.0,
                                              implementation=self.cfg.attention_impl,
                                              precision=self.cfg.matmul_precision)
        B, Lq = out.shape[:2]
        return self.proj(out.reshape(B, Lq, -1)).astype(F32)

    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        return self.attend(*self.project(x, cos, sin), mask)


class CrossAttention(nnx.Module):
    """Ordinary multi-head attention from the VAR tokens to the projected text (scale hd^-0.5)."""

    def __init__(self, cfg: InfinityConfig, rngs: nnx.Rngs):
        C, D = cfg.embed_dim, cfg.cond_dim
        self.cfg, self.num_heads, self.head_dim = cfg, cfg.num_heads, cfg.head_dim
        self.mat_q = _dense(cfg, rngs, C, C, ("embed", "heads"), lora="ca.mat_q")
        self.mat_kv = _dense(cfg, rngs, D, 2 * C, ("cond", "heads"), use_bias=False, lora="ca.mat_kv")
        self.v_bias = param(None, (C,), ("heads",), cfg.param_dtype)
        self.proj = _dense(cfg, rngs, C, C, ("heads", "embed"), lora="ca.proj")

    def text_kv(self, text_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, T, H, hd] of the projected text (cacheable across scales)."""
        B, T, _ = text_BTD.shape
        C = self.num_heads * self.head_dim
        kv = self.mat_kv(text_BTD).astype(F32)
        k = kv[..., :C].reshape(B, T, self.num_heads, self.head_dim)
        v = (kv[..., C:] + self.v_bias[...].astype(F32)).reshape(B, T, self.num_heads, self.head_dim)
        return k, v

    def __call__(self, x: jax.Array, text_BTD: jax.Array, mask_B11T: jax.Array) -> jax.Array:
        return self.attend_text(x, *self.text_kv(text_BTD), mask_B11T)

    def attend_text(self, x: jax.Array, k: jax.Array, v: jax.Array, mask_B11T: jax.Array) -> jax.Array:
        """Cross-attention of x [B, L, C] to precomputed text keys/values."""
        B, L, C = x.shape
        q = self.mat_q(x).astype(F32).reshape(B, L, self.num_heads, self.head_dim)
        dtype = jnp.dtype(self.cfg.compute_dtype)
        out = _cross_attend(constrain(q, BATCH_LEN_HEADS).astype(dtype), k.astype(dtype), v.astype(dtype),
                            mask_B11T, self.cfg)
        return self.proj(out.reshape(B, L, C)).astype(F32)


class FFN(nnx.Module):
    def __init__(self, cfg: InfinityConfig, rngs: nnx.Rngs):
        self.fc1 = _dense(cfg, rngs, cfg.embed_dim, cfg.ffn_hidden, ("embed", "mlp"), lora="ffn.fc1")
        self.fc2 = _dense(cfg, rngs, cfg.ffn_hidden, cfg.embed_dim, ("mlp", "embed"), lora="ffn.fc2")

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = constrain(gelu_tanh(self.fc1(x)), ("act_batch", "act_len", "act_mlp"))
        return self.fc2(hidden).astype(F32)


class CrossAttnBlock(nnx.Module):
    """One Infinity block: ada-LN self-attention, plain cross-attention, ada-LN FFN."""

    def __init__(self, cfg: InfinityConfig, drop_path_rate: float, rngs: nnx.Rngs):
        C = cfg.embed_dim
        self.cfg, self.drop_path_rate = cfg, drop_path_rate
        self.ada_gss = param(rngs, (1, 1, 6, C), (None, None, None, "embed"), cfg.param_dtype, std=C ** -0.5)
        self.sa = SelfAttention(cfg, rngs)
        self.ca_norm = LayerNorm(C, cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.ca = CrossAttention(cfg, rngs)
        self.ffn = FFN(cfg, rngs)

    def __call__(self, x: jax.Array, gss_B16C: jax.Array, text_BTD: jax.Array, text_mask: jax.Array,
                 attn_mask: jax.Array, cos: jax.Array, sin: jax.Array, rng: jax.Array | None = None,
                 drop_path_rate: jax.Array | float | None = None) -> jax.Array:
        x, _ = self.step(x, gss_B16C, self.ca.text_kv(text_BTD), text_mask, cos, sin, attn_mask=attn_mask, rng=rng,
                         drop_path_rate=drop_path_rate)
        return x

    def step(self, x: jax.Array, gss_B16C: jax.Array, text_kv: tuple[jax.Array, jax.Array], text_mask: jax.Array,
             cos: jax.Array, sin: jax.Array, *, cache: tuple[jax.Array, jax.Array] | None = None,
             attn_mask: jax.Array | None = None, rng: jax.Array | None = None,
             drop_path_rate: jax.Array | float | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block on new tokens x, attending to cached keys/values of earlier tokens (KV cache).

        Returns the output and the extended (keys, values) [B, L_seen, H, hd] after rope. Without a cache
        and with `attn_mask` this is the teacher-forced block. `drop_path_rate` overrides the block's own
        (a traced per-layer value when the blocks run under `lax.scan`).
        """
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        # Chunk order of upstream's (ada_gss + shared_ada_lin(cond)).unbind(2).
        ada = self.ada_gss[...].astype(F32) + gss_B16C
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))
        rng_sa, rng_ffn = jax.random.split(rng) if rng is not None else (None, None)
        eps = self.cfg.norm_eps
        h = layer_norm(x, eps) * (1 + scale1) + shift1
        q, k, v = self.sa.project(h, cos, sin)
        if cache is not None:
            k, v = jnp.concatenate([cache[0], k], axis=1), jnp.concatenate([cache[1], v], axis=1)
        boundary = functools.partial(materialize_cotangent, mode=self.cfg.grad_boundaries)
        x = boundary(x + drop_path(self.sa.attend(q, k, v, attn_mask) * gamma1, rate, rng_sa))
        x = boundary(x + self.ca.attend_text(self.ca_norm(x), *text_kv, text_mask))
        h = layer_norm(x, eps) * (1 + scale2) + shift2
        x = x + drop_path(self.ffn(h) * gamma2, rate, rng_ffn)
        return boundary(constrain(x, BATCH_LEN_EMBED)), (k, v)


def _remat_block(block: CrossAttnBlock, *args: jax.Array | None) -> jax.Array:
    """The block under `jax.checkpoint` (activations recomputed in the backward pass).

    The block's state goes in as an explicit argument: parameters may come from different traces
    (frozen ones closed over, trainable ones differentiated), which `nnx.remat` refuses to mix.
    """
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


def _scanned_blocks(blocks, cfg: InfinityConfig, x: jax.Array, *args: Any) -> jax.Array:
    """The blocks as one `lax.scan` over their stacked parameters (`cfg.scan_blocks`): one block is traced and
    compiled whatever the depth. The parameters stay stored per block (checkpoints, converter and sharding
    rules unchanged) and are stacked inside the program, a copy of the block weights per call; the
    per-block drop-path rates and rngs are scanned with them, so the result equals the unrolled loop."""
    *shared, rng_blocks = args
    graphdef = nnx.split(blocks[0])[0]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.split(block)[1] for block in blocks))
    rates = jnp.asarray(cfg.drop_path_rates(), F32)
    rngs = jax.random.split(rng_blocks, cfg.depth) if rng_blocks is not None else None

    def one_block(x, layer):
        state, rate, rng = layer
        return nnx.merge(graphdef, state)(x, *shared, rng, drop_path_rate=rate), None

    body = jax.checkpoint(one_block) if cfg.remat else one_block
    return jax.lax.scan(body, x, (stacked, rates, rngs))[0]


class Infinity(nnx.Module):
    """Infinity: text-conditioned next-scale prediction over bitwise tokens."""

    def __init__(self, cfg: InfinityConfig, rngs: nnx.Rngs):
        C, D, T = cfg.embed_dim, cfg.cond_dim, cfg.text_channels
        std = (1 / C / 3) ** 0.5
        self.cfg = cfg
        self.cfg_uncond = param(rngs, (cfg.text_maxlen, T), ("text_len", "text_embed"), cfg.param_dtype,
                                std=1.2 / T ** 0.5)
        self.pos_start = param(rngs, (1, 1, C), (None, None, "embed"), cfg.param_dtype, std=std)
        self.text_norm = RMSNorm(T, cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.text_proj_for_sos = TextAttentivePool(cfg, rngs)
        self.text_proj_for_ca = TextProjection(cfg, rngs)
        self.lvl_embed = param(rngs, (cfg.num_levels, C), ("levels", "embed"), cfg.param_dtype, std=std)
        self.word_embed = _dense(cfg, rngs, cfg.bits_per_token, C, ("bits", "embed"))
        self.shared_ada_lin = _dense(cfg, rngs, D, 6 * C, ("cond", "ada"))
        self.blocks = nnx.List([CrossAttnBlock(cfg, rate, rngs) for rate in cfg.drop_path_rates()])
        self.head_nm = _dense(cfg, rngs, D, 2 * C, ("cond", "ada"))
        self.head = _dense(cfg, rngs, C, cfg.num_logits, ("embed", "vocab"), std=0.02 * std)
        # After every base parameter, and without the rngs: the base weights of a LoRA model equal those
        # of the same config without LoRA, and each A depends only on (lora_seed, its path).
        if cfg.lora_rank:
            init_lora_factors(self, cfg.lora_seed)

    # ---- pieces reused by the sampler ------------------------------------------------------------
    def encode_text(self, text_BTC: jax.Array, text_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Text features -> (cond_BD, text for cross-attention [B, T, D], attention mask [B, 1, 1, T])."""
        normed = self.text_norm(text_BTC)
        self._capture("text_norm", normed)
        mask = attention.text_mask_for_attention(text_mask_BT)
        cond_BD = self.text_proj_for_sos(normed, mask)
        self._capture("text_proj_for_sos", cond_BD)
        text_BTD = constrain(self.text_proj_for_ca(normed), ("act_batch", "act_text_len", "act_embed"))
        self._capture("text_proj_for_ca", text_BTD)
        return cond_BD, text_BTD, mask

    def shared_ada_condition(self, cond_BD: jax.Array) -> jax.Array:
        """shared_ada_lin: SiLU -> Linear(D, 6C) -> [B, 1, 6, C] (before adding each block's ada_gss)."""
        gss = self.shared_ada_lin(jax.nn.silu(cond_BD)).astype(F32).reshape(-1, 1, 6, self.cfg.embed_dim)
        self._capture("shared_ada_lin", gss)
        return gss

    def logits(self, x_BLC: jax.Array, cond_BD: jax.Array) -> jax.Array:
        """ada-LN head (conditioned on cond_BD, not on the shared gss) -> [B, L, 2d] float32."""
        scale_shift = self.head_nm(jax.nn.silu(cond_BD)).astype(F32).reshape(-1, 1, 2, self.cfg.embed_dim)
        h = layer_norm(x_BLC, self.cfg.norm_eps) * (1 + scale_shift[:, :, 0]) + scale_shift[:, :, 1]
        self._capture("head_nm", h)
        head = self.head
        out = jnp.matmul(h, head.kernel[...].astype(F32), precision=self.cfg.matmul_precision)
        out = out + head.bias[...].astype(F32)
        self._capture("head", out)
        return out

    def drop_condition(self, text_BTC: jax.Array, text_mask_BT: jax.Array, rng: jax.Array) -> jax.Array:
        """Condition dropout: each sample's text becomes cfg_uncond[:len] with prob cond_drop_rate."""
        B, T, _ = text_BTC.shape
        drop = jax.random.bernoulli(rng, self.cfg.cond_drop_rate, (B,))
        uncond = self.cfg_uncond[...][:T].astype(text_BTC.dtype)[None]
        keep_rows = text_mask_BT.astype(bool)[..., None]
        return jnp.where(drop[:, None, None] & keep_rows, uncond, text_BTC)

    def _capture(self, name: str, value: jax.Array) -> None:
        if getattr(self, "capture_activations", False):
            self.sow(nnx.Intermediate, f"act__{name}", value)

    # ---- teacher-forced forward --------------------------------------------------------------------
    def __call__(self, text_BTC: jax.Array, text_mask_BT: jax.Array, x_BLC_wo_prefix: jax.Array,
                 schedule: schedules.Schedule, *, h_div_w_template: float | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits.

        Args:
          text_BTC: [B, T, Ct5] text features, rows past each sample's length ignored.
          text_mask_BT: [B, T] 1 for valid text rows.
          x_BLC_wo_prefix: [B, L - 1, d] next-scale inputs of scales 1..K-1.
          schedule: the scale schedule ((1, 1, 1), ..., (1, h, w)).
          h_div_w_template: aspect template of the rope grid (default: nearest to the last scale).
          rng: PRNG key for condition dropout and drop path; None = deterministic (eval).

        Returns:
          logits [B, L, 2d] float32: bit k of token l has logits [..., 2k:2k+2].
        """
        cfg = self.cfg
        schedule = schedules.as_schedule(schedule)
        L = schedules.sequence_length(schedule)
        if x_BLC_wo_prefix.shape[1:] != (L - 1, cfg.bits_per_token):
            raise ValueError(f"next-scale inputs have shape {x_BLC_wo_prefix.shape}, expected "
                             f"[B, {L - 1}, {cfg.bits_per_token}] for schedule {schedule}")
        if text_BTC.shape[1] > cfg.text_maxlen:
            raise ValueError(f"text has {text_BTC.shape[1]} rows, more than text_maxlen {cfg.text_maxlen}")
        rng_cond, rng_blocks = jax.random.split(rng) if rng is not None else (None, None)
        if rng_cond is not None and cfg.cond_drop_rate > 0:
            text_BTC = self.drop_condition(text_BTC, text_mask_BT, rng_cond)

        cond_BD, text_BTD, text_mask = self.encode_text(text_BTC.astype(F32), text_mask_BT)
        gss = self.shared_ada_condition(cond_BD)
        sos = cond_BD[:, None, :] + self.pos_start[...].astype(F32)
        words = self.word_embed(x_BLC_wo_prefix.astype(F32)).astype(F32)
        self._capture("word_embed", words)
        x = jnp.concatenate([sos, words], axis=1)

        # `scales` attention needs no mask and no padding (the padding exists for kernels that want
        # multiples of 128; padded rows are discarded either way).
        by_scales = cfg.attention_impl == "scales"
        splash = cfg.attention_impl == "splash"  # its kernel works in blocks of 128 rows
        multiple = math.lcm(cfg.pad_to_multiplier, 128) if splash else cfg.pad_to_multiplier
        Lp = L if by_scales else schedules.padded_length(schedule, multiple)
        # Each scale's row repeated over its tokens (a static repeat, not a gather: no scatter in the backward).
        rows = self.lvl_embed[...].astype(F32)
        level = jnp.concatenate([jnp.broadcast_to(rows[i], (n, rows.shape[1]))
                                 for i, n in enumerate(schedules.scale_lengths(schedule))])
        x = x + level[None]
        x = constrain(jnp.pad(x, ((0, 0), (0, Lp - L), (0, 0))), BATCH_LEN_EMBED)
        attn_mask = (attention.ScaleBlocks(tuple(schedules.scale_lengths(schedule))) if by_scales or splash
                     else attention.block_causal_mask(schedule, Lp))
        cos, sin = (jnp.asarray(t) for t in rope.rope_table(schedule, cfg.head_dim, h_div_w_template, Lp))

        if cfg.scan_blocks:
            x = _scanned_blocks(self.blocks, cfg, x, gss, text_BTD, text_mask, attn_mask, cos, sin, rng_blocks)
            return self.logits(x[:, :L], cond_BD)
        block_rngs = jax.random.split(rng_blocks, cfg.depth) if rng_blocks is not None else [None] * cfg.depth
        for i, block in enumerate(self.blocks):
            if cfg.remat:
                x = _remat_block(block, x, gss, text_BTD, text_mask, attn_mask, cos, sin, block_rngs[i])
            else:
                x = block(x, gss, text_BTD, text_mask, attn_mask, cos, sin, block_rngs[i])
            self._capture(f"block{i}", x[:, :L])
        return self.logits(x[:, :L], cond_BD)
