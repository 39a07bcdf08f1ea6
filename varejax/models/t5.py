"""The T5 encoder (Flan-T5-XL, Infinity's text encoder) in Flax NNX, and its pure-function view.

What it computes (HF `T5EncoderModel(input_ids, attention_mask).last_hidden_state`):

  x = shared[input_ids]                               (no scaling of the embedding)
  bias[h, q, k] = relative_attention_bias[bucket(k - q), h]   (block 0's table, shared by every layer)
  per layer:  x += o(attn(q(n), k(n), v(n)) + bias + padding mask),  n = T5LayerNorm(x)
              x += wo(gelu_tanh(wi_0(n)) * wi_1(n))  (gated-gelu)  or  wo(relu(wi(n)))  (relu),  n = T5LayerNorm(x)
  out = T5LayerNorm(x)

T5LayerNorm is RMS-style (no mean subtraction, no bias) and runs in float32. Attention logits are NOT
scaled by 1/sqrt(d_kv) (T5 folds that into the initialisation). Padded keys get the float32 minimum
added, as HF does; padded query rows are computed like any other row (callers use rows < length).

The residual stream stays float32; matmul inputs use `compute_dtype`. `encode(params, input_ids,
attention_mask, cfg)` is the jitted pure function; `T5Config.from_hf_config` reads an HF `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from varejax.models import state
from varejax.models.config_base import ModelConfig
from varejax.models.layers import F32, Dense, RMSNorm, gelu_tanh, param
from varejax.parallel import constrain

BATCH_LEN_EMBED = ("act_batch", "act_text_len", "act_embed")
BATCH_LEN_HEADS = ("act_batch", "act_text_len", "act_heads", None)
FEED_FORWARD = ("gated-gelu", "relu")
ARCH_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff", "feed_forward_proj",
               "relative_attention_num_buckets")


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    """Architecture and numerics of a T5 encoder.

    Attributes:
      vocab_size: rows of the shared token embedding (32128 for Flan-T5; the tokenizer uses 32100).
      d_model: model width.
      num_layers: encoder blocks.
      num_heads: attention heads.
      d_kv: width of one head (num_heads * d_kv need not equal d_model).
      d_ff: feed-forward hidden units.
      feed_forward_proj: "gated-gelu" (Flan-T5, T5 v1.1: gelu_tanh(wi_0 x) * wi_1 x) or "relu" (original T5).
      relative_attention_num_buckets: rows of the relative position bias table.
      relative_attention_max_distance: distances at or beyond this share the last bucket.
      layer_norm_epsilon: epsilon of every T5LayerNorm.
      param_dtype: dtype parameters are stored in.
      compute_dtype: dtype of matmul inputs (norms, softmax and the residual stream stay float32).
      matmul_precision: `jax.lax.Precision` name for float32 matmuls ("highest" for parity).
    """

    arch_fields = ARCH_FIELDS  # not a field: no annotation

    vocab_size: int = 200
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_kv: int = 16
    d_ff: int = 96
    feed_forward_proj: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    matmul_precision: str = "highest"

    def __post_init__(self):
        problems = []
        if self.feed_forward_proj not in FEED_FORWARD:
            problems.append(f"feed_forward_proj must be one of {FEED_FORWARD}, not {self.feed_forward_proj!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            problems.append("relative_attention_num_buckets must be even and >= 4 (bidirectional bucketing)")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            problems.append("relative_attention_max_distance must exceed num_buckets // 4 (the exact range)")
        if self.matmul_precision not in ("default", "high", "highest"):
            problems.append(f"matmul_precision must be default/high/highest, not {self.matmul_precision!r}")
        if min(self.vocab_size, self.d_model, self.num_layers, self.num_heads, self.d_kv, self.d_ff) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ValueError("invalid T5Config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> T5Config:
        """Builds a config from an HF T5 `config.json` (T5EncoderModel or T5ForConditionalGeneration).

        Raises:
          ValueError: not a T5 config, a decoder-only config, or options this port does not implement.
        """
        model_type = hf.get("model_type")
        if model_type not in ("t5", "mt5"):
            raise ValueError(f"model_type is {model_type!r}, expected 't5' (a Flan-T5 / T5 v1.1 config.json); "
                             f"umt5 (per-layer position bias) and other models are not supported")
        if hf.get("is_decoder", False):
            raise ValueError("is_decoder is true: this is a decoder-only T5 config; the converter needs an encoder "
                             "(T5EncoderModel or T5ForConditionalGeneration)")
        proj = str(hf.get("feed_forward_proj", "relu"))
        if proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj {proj!r} is not supported; supported: {FEED_FORWARD}")
        act = hf.get("dense_act_fn")
        expected_act = "gelu_new" if proj == "gated-gelu" else "relu"
        if act is not None and act != expected_act:
            raise ValueError(f"dense_act_fn {act!r} does not match feed_forward_proj {proj!r} "
                             f"(expected {expected_act!r})")
        missing = [k for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        fields = dict(
            vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), num_layers=int(hf["num_layers"]),
            num_heads=int(hf["num_heads"]), d_kv=int(hf["d_kv"]), d_ff=int(hf["d_ff"]), feed_forward_proj=proj,
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )
        fields.update(overrides)
        return cls(**fields)


PRESETS: dict[str, T5Config] = {
    # google/flan-t5-xl: the encoder Infinity uses (1.22 B parameters without the decoder).
    "flan_t5_xl": T5Config(vocab_size=32128, d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120,
                           feed_forward_proj="gated-gelu"),
    "tiny": T5Config(),
}


def get_preset(name: str) -> T5Config:
    if name not in PRESETS:
        raise KeyError(f"unknown T5 preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def count_params_formula(cfg: T5Config) -> int:
    """Parameters of the encoder (shared embedding included, decoder excluded)."""
    ffn = (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
    layer = 4 * cfg.d_model * cfg.inner_dim + ffn + 2 * cfg.d_model
    return (cfg.vocab_size * cfg.d_model + cfg.relative_attention_num_buckets * cfg.num_heads
            + cfg.num_layers * layer + cfg.d_model)


# ---- relative position buckets ---------------------------------------------------------------------

def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
                             ) -> np.ndarray:
    """T5's bidirectional bucket of `key_pos - query_pos` (host-side, exact).

    Half of the buckets are for keys after the query. Within a half, distances below num_buckets/4 get
    a bucket each; larger ones are spaced logarithmically up to `max_distance`, beyond which all share
    the last bucket. The log is evaluated in float32 and truncated, as HF's torch code does, so bucket
    edges (e.g. distance 64) land exactly where the checkpoint was trained.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    half = num_buckets // 2
    exact = half // 2
    out = np.where(rel > 0, half, 0).astype(np.int64)
    dist = np.abs(rel)
    ratio = np.maximum(dist, exact).astype(np.float32) / np.float32(exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return out + np.where(dist < exact, dist, large)


def relative_buckets_by_offset(length: int, cfg: T5Config) -> np.ndarray:
    """Buckets of every offset k - q in [-(length - 1), length - 1], indexed by offset + length - 1."""
    offsets = np.arange(-(length - 1), length)
    return relative_position_bucket(offsets, cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance).astype(np.int32)


# ---- modules ----------------------------------------------------------------------------------------

def _dense(cfg: T5Config, rngs: nnx.Rngs, n_in: int, n_out: int, axes, std: float) -> Dense:
    return Dense(n_in, n_out, axes, rngs=rngs, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                 precision=cfg.matmul_precision, use_bias=False, std=std)


class T5SelfAttention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias (position bias + padding mask)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.inner_dim
        self.cfg = cfg
        self.q = _dense(cfg, rngs, d, inner, ("embed", "heads"), std=(d * cfg.d_kv) ** -0.5)
        self.k = _dense(cfg, rngs, d, inner, ("embed", "heads"), std=d ** -0.5)
        self.v = _dense(cfg, rngs, d, inner, ("embed", "heads"), std=d ** -0.5)
        self.o = _dense(cfg, rngs, inner, d, ("heads", "embed"), std=inner ** -0.5)

    def __call__(self, x_BTC: jax.Array, bias_1HTT: jax.Array, mask_B11T: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, T, _ = x_BTC.shape
        heads = lambda y: constrain(y.reshape(B, T, cfg.num_heads, cfg.d_kv), BATCH_LEN_HEADS)
        q, k, v = heads(self.q(x_BTC)), heads(self.k(x_BTC)), heads(self.v(x_BTC))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=cfg.matmul_precision,
                            preferred_element_type=F32)
        # HF adds (bias + mask) at once; for visible keys the mask term is 0, so this is the same sum.
        weights = jax.nn.softmax(scores + bias_1HTT + mask_B11T, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, precision=cfg.matmul_precision,
                         preferred_element_type=F32)
        return self.o(out.reshape(B, T, cfg.inner_dim).astype(v.dtype))


class T5FeedForward(nnx.Module):
    """gated-gelu: wo(gelu_tanh(wi_0 x) * wi_1 x);  relu: wo(relu(wi x)). No biases."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        d, ff = cfg.d_model, cfg.d_ff
        self.gated = cfg.gated
        if self.gated:
            self.wi_0 = _dense(cfg, rngs, d, ff, ("embed", "mlp"), std=d ** -0.5)
            self.wi_1 = _dense(cfg, rngs, d, ff, ("embed", "mlp"), std=d ** -0.5)
        else:
            self.wi = _dense(cfg, rngs, d, ff, ("embed", "mlp"), std=d ** -0.5)
        self.wo = _dense(cfg, rngs, ff, d, ("mlp", "embed"), std=ff ** -0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        mlp = ("act_batch", "act_text_len", "act_mlp")
        if self.gated:
            hidden = gelu_tanh(self.wi_0(x)) * self.wi_1(x)
        else:
            hidden = jax.nn.relu(self.wi(x))
        return self.wo(constrain(hidden, mlp))


class T5Block(nnx.Module):
    """x += SelfAttention(LN(x));  x += FFN(LN(x))  (pre-norm residual, float32 stream)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        eps = cfg.layer_norm_epsilon
        self.attn_norm = RMSNorm(cfg.d_model, eps, param_dtype=cfg.param_dtype)
        self.attn = T5SelfAttention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps, param_dtype=cfg.param_dtype)
        self.ffn = T5FeedForward(cfg, rngs)

    def __call__(self, x: jax.Array, bias_1HTT: jax.Array, mask_B11T: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), bias_1HTT, mask_B11T).astype(F32)
        x = x + self.ffn(self.ffn_norm(x)).astype(F32)
        return constrain(x, BATCH_LEN_EMBED)


class T5Encoder(nnx.Module):
    """Token ids -> last hidden state [B, T, d_model] (float32)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = param(rngs, (cfg.vocab_size, cfg.d_model), ("t5_vocab", "embed"), cfg.param_dtype, std=1.0)
        self.relative_attention_bias = param(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads),
                                             ("t5_buckets", "heads"), cfg.param_dtype, std=cfg.d_model ** -0.5)
        self.blocks = nnx.List([T5Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=cfg.param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """[H, T, T] float32: bias[h, q, k] = table[bucket(k - q), h]."""
        buckets = jnp.asarray(relative_buckets_by_offset(length, self.cfg))     # [2T - 1]
        by_offset = jnp.take(self.relative_attention_bias[...].astype(F32), buckets, axis=0)  # [2T - 1, H]
        pos = jnp.arange(length)
        offset = pos[None, :] - pos[:, None] + (length - 1)                       # [T(q), T(k)]
        return jnp.transpose(jnp.take(by_offset, offset, axis=0), (2, 0, 1))

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        T = input_ids_BT.shape[1]
        x = jnp.take(self.shared[...], input_ids_BT.astype(jnp.int32), axis=0).astype(F32)
        x = constrain(x, BATCH_LEN_EMBED)
        # Padded keys get the float32 minimum added (HF: (1 - mask) * finfo.min), so zero weight.
        masked = ((1.0 - attention_mask_BT.astype(F32)) * jnp.finfo(F32).min)[:, None, None, :]
        bias = self.position_bias(T)[None]  # computed once (block 0's table), shared by every layer
        for block in self.blocks:
            x = block(x, bias, masked)
        return self.final_norm(x)


# ---- pure-function view -----------------------------------------------------------------------------

def init_params(cfg: T5Config, seed: int = 0) -> nnx.State:
    """Freshly initialised parameters (an `nnx.State`); T5's initialisation scales, for tests."""
    return state.init_state(T5Encoder, cfg, seed)


def abstract_params(cfg: T5Config) -> nnx.State:
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s (no memory)."""
    return state.abstract_state(T5Encoder, cfg)


def state_from_flat(cfg: T5Config, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """Parameter state of `cfg` from {path: array}; every path must be present, shapes must match."""
    return state.fill_state(abstract_params(cfg), flat)


def bind(params: nnx.State, cfg: T5Config) -> T5Encoder:
    """The encoder of `cfg` with `params` (inside or outside a trace)."""
    return state.bind(T5Encoder, params, cfg)


def forward(params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, cfg: T5Config) -> jax.Array:
    """last_hidden_state [B, T, d_model] float32 of `input_ids` [B, T] int32 with `attention_mask` [B, T]."""
    return bind(params, cfg)(input_ids, attention_mask)


encode = jax.jit(forward, static_argnames=("cfg",))
