"""CLIP (text and vision towers, projections, logit scale) in Flax NNX, and its pure-function view.

What it computes (HF `CLIPModel`, which follows OpenAI's CLIP):

  text:   x = token_embedding[ids] + position_embedding[:T]
          per layer (pre-norm):  x += attn(LN1(x)) with a causal mask (and the padding mask, if given)
                                 x += fc2(act(fc1(LN2(x))))
          pooled = final_LN(x)[eos position];  text_embeds = pooled @ text_projection
  vision: patches of p x p pixels -> linear (a conv with stride p, no bias); x = [class_embedding, patches]
          + position_embedding; x = pre_LN(x); the same layers without a mask; pooled = post_LN(x[:, 0]);
          image_embeds = pooled @ visual_projection
  logits_per_image = exp(logit_scale) * normalise(image_embeds) @ normalise(text_embeds).T

The eos position is where HF takes it: the first occurrence of `eos_token_id`, except for configs that say
`eos_token_id == 2` (old HF CLIP configs, e.g. openai/clip-vit-*), where HF takes the argmax of the ids
(the end-of-text token has the largest id of the vocabulary). Attention is scaled by 1/sqrt(head_dim);
softmax, LayerNorms and the residual stream run in float32; `act` is quick_gelu (x * sigmoid(1.702 x),
every OpenAI CLIP) or exact gelu, per config.

Images enter as [B, H, W, 3] float32, already normalised (`varejax.eval.clip_metrics.preprocess`); torch's
pixel_values are the same values as [B, 3, H, W].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from varejax.models import state
from varejax.models.config_base import ModelConfig
from varejax.models.layers import F32, Dense, LayerNorm, param

ACTIVATIONS = ("quick_gelu", "gelu")
ARCH_FIELDS = ("vocab_size", "text_width", "text_layers", "text_heads", "text_mlp", "max_position_embeddings",
               "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp",
               "projection_dim")
# HF CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: config.json files written by HF omit fields
# that equal them, so `from_hf_config` fills them in from here.
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_PROJECTION_DIM = 512


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ModelConfig):
    """Architecture and numerics of a CLIP model.

    Attributes:
      vocab_size: rows of the token embedding (49408 for OpenAI CLIP).
      text_width, text_layers, text_heads, text_mlp: text transformer width, depth, heads, MLP hidden units.
      max_position_embeddings: text positions (77); token sequences may be shorter, never longer.
      text_act, vision_act: "quick_gelu" or "gelu" (exact, erf).
      text_eps, vision_eps: LayerNorm epsilons.
      eos_token_id: the end-of-text id the text tower pools at (2 means HF's legacy argmax pooling).
      bos_token_id: the start-of-text id (for the tokenizer's checks only).
      image_size, patch_size: input resolution and patch size (224, 32 for ViT-B/32; 224, 14 for ViT-L/14).
      vision_width, vision_layers, vision_heads, vision_mlp: the vision transformer's sizes.
      projection_dim: width of the shared image-text embedding.
      param_dtype, compute_dtype: storage and matmul-input dtypes; matmul_precision: "highest" for parity.
    """

    arch_fields = ARCH_FIELDS  # not a field: no annotation

    vocab_size: int = 64
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 64
    max_position_embeddings: int = 16
    text_act: str = "quick_gelu"
    text_eps: float = 1e-5
    eos_token_id: int = 63
    bos_token_id: int = 62
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 64
    vision_act: str = "quick_gelu"
    vision_eps: float = 1e-5
    projection_dim: int = 16
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    matmul_precision: str = "highest"

    def __post_init__(self):
        problems = []
        for act in (self.text_act, self.vision_act):
            if act not in ACTIVATIONS:
                problems.append(f"activation {act!r} is not supported; supported: {ACTIVATIONS}")
        if self.text_width % self.text_heads or self.vision_width % self.vision_heads:
            problems.append("text_width / vision_width must be multiples of text_heads / vision_heads")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.matmul_precision not in ("default", "high", "highest"):
            problems.append(f"matmul_precision must be default/high/highest, not {self.matmul_precision!r}")
        sizes = (self.vocab_size, self.text_width, self.text_layers, self.text_heads, self.text_mlp,
                 self.max_position_embeddings, self.image_size, self.patch_size, self.vision_width,
                 self.vision_layers, self.vision_heads, self.vision_mlp, self.projection_dim)
        if min(sizes) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def legacy_argmax_pooling(self) -> bool:
        """HF pools at argmax(ids) when a config says eos_token_id == 2 (configs written before HF PR #24773)."""
        return self.eos_token_id == 2

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> CLIPConfig:
        """Builds a config from an HF CLIP `config.json` (model_type "clip", a `CLIPModel`).

        Fields the file omits take HF's defaults; old files' `text_config_dict` / `vision_config_dict` win
        over `text_config` / `vision_config`, as in HF.

        Raises:
          ValueError: not a CLIP config, or options this port does not implement (another activation,
            non-square images or patches, other than 3 channels).
        """
        if hf.get("model_type") != "clip":
            raise ValueError(f"model_type is {hf.get('model_type')!r}, expected 'clip' (an HF CLIPModel config.json)")
        text = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
        vision = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
        for name, tower in (("vision_config", vision),):
            for key in ("image_size", "patch_size"):
                if isinstance(tower[key], (list, tuple)):
                    if len(set(tower[key])) != 1:
                        raise ValueError(f"{name}.{key} {tower[key]} is not square; only square sizes are supported")
                    tower[key] = tower[key][0]
        if int(vision["num_channels"]) != 3:
            raise ValueError(f"vision_config.num_channels is {vision['num_channels']}; only RGB (3) is supported")
        eos = text["eos_token_id"]
        if isinstance(eos, list):  # HF allows a list; the pooling uses one id
            if len(eos) != 1:
                raise ValueError(f"text_config.eos_token_id {eos} names several ids; the pooling needs one")
            eos = eos[0]
        fields = dict(
            vocab_size=int(text["vocab_size"]), text_width=int(text["hidden_size"]),
            text_layers=int(text["num_hidden_layers"]), text_heads=int(text["num_attention_heads"]),
            text_mlp=int(text["intermediate_size"]), max_position_embeddings=int(text["max_position_embeddings"]),
            text_act=str(text["hidden_act"]), text_eps=float(text["layer_norm_eps"]), eos_token_id=int(eos),
            bos_token_id=int(text["bos_token_id"]) if text.get("bos_token_id") is not None else -1,
            image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
            vision_width=int(vision["hidden_size"]), vision_layers=int(vision["num_hidden_layers"]),
            vision_heads=int(vision["num_attention_heads"]), vision_mlp=int(vision["intermediate_size"]),
            vision_act=str(vision["hidden_act"]), vision_eps=float(vision["layer_norm_eps"]),
            projection_dim=int(hf.get("projection_dim", HF_PROJECTION_DIM)),
        )
        fields.update(overrides)
        return cls(**fields)


PRESETS: dict[str, CLIPConfig] = {
    # openai/clip-vit-base-patch32: 151 M parameters (the CLIP score of EAR / S-VARE).
    "vit_b_32": CLIPConfig(vocab_size=49408, text_width=512, text_layers=12, text_heads=8, text_mlp=2048,
                           max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, image_size=224,
                           patch_size=32, vision_width=768, vision_layers=12, vision_heads=12, vision_mlp=3072,
                           projection_dim=512),
    # openai/clip-vit-large-patch14: 428 M parameters.
    "vit_l_14": CLIPConfig(vocab_size=49408, text_width=768, text_layers=12, text_heads=12, text_mlp=3072,
                           max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, image_size=224,
                           patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                           projection_dim=768),
    "tiny": CLIPConfig(),
}


def get_preset(name: str) -> CLIPConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def count_params_formula(cfg: CLIPConfig) -> int:
    """Parameters of the whole model (both towers, projections and the logit scale)."""
    def layers(width: int, mlp: int, n: int) -> int:
        return n * (4 * (width * width + width) + 2 * width * mlp + mlp + width + 4 * width)

    text = (cfg.vocab_size + cfg.max_position_embeddings) * cfg.text_width + layers(
        cfg.text_width, cfg.text_mlp, cfg.text_layers) + 2 * cfg.text_width
    vision = (cfg.vision_width + 3 * cfg.patch_size ** 2 * cfg.vision_width + (cfg.num_patches + 1) * cfg.vision_width
              + 4 * cfg.vision_width + layers(cfg.vision_width, cfg.vision_mlp, cfg.vision_layers))
    return text + vision + (cfg.text_width + cfg.vision_width) * cfg.projection_dim + 1


# ---- modules ----------------------------------------------------------------------------------------

def activation(name: str, x: jax.Array) -> jax.Array:
    """quick_gelu (OpenAI's x * sigmoid(1.702 x)) or exact gelu (torch nn.GELU(), erf)."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


def _dense(cfg: CLIPConfig, rngs: nnx.Rngs, n_in: int, n_out: int, axes, use_bias: bool = True) -> Dense:
    return Dense(n_in, n_out, axes, rngs=rngs, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                 precision=cfg.matmul_precision, use_bias=use_bias, std=0.02)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biases, scaled by 1/sqrt(head_dim), float32 softmax."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs, width: int, heads: int):
        self.heads, self.head_dim, self.precision = heads, width // heads, cfg.matmul_precision
        self.q = _dense(cfg, rngs, width, width, ("embed", "heads"))
        self.k = _dense(cfg, rngs, width, width, ("embed", "heads"))
        self.v = _dense(cfg, rngs, width, width, ("embed", "heads"))
        self.o = _dense(cfg, rngs, width, width, ("heads", "embed"))

    def __call__(self, x_BTC: jax.Array, bias_B1TT: jax.Array | None) -> jax.Array:
        B, T, C = x_BTC.shape
        split = lambda y: y.reshape(B, T, self.heads, self.head_dim)
        q, k, v = split(self.q(x_BTC)), split(self.k(x_BTC)), split(self.v(x_BTC))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision, preferred_element_type=F32)
        scores = scores * (self.head_dim ** -0.5)
        if bias_B1TT is not None:
            scores = scores + bias_B1TT
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, precision=self.precision,
                         preferred_element_type=F32)
        return self.o(out.reshape(B, T, C).astype(v.dtype))


class CLIPLayer(nnx.Module):
    """x += attn(LN1(x));  x += fc2(act(fc1(LN2(x))))."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs, width: int, heads: int, mlp: int, act: str, eps: float):
        self.norm1 = LayerNorm(width, eps, param_dtype=cfg.param_dtype)
        self.attn = CLIPAttention(cfg, rngs, width, heads)
        self.norm2 = LayerNorm(width, eps, param_dtype=cfg.param_dtype)
        self.fc1 = _dense(cfg, rngs, width, mlp, ("embed", "mlp"))
        self.fc2 = _dense(cfg, rngs, mlp, width, ("mlp", "embed"))
        self.act = act

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.norm1(x), bias).astype(F32)
        hidden = activation(self.act, self.fc1(self.norm2(x)).astype(F32))
        return x + self.fc2(hidden).astype(F32)


class CLIPTextTower(nnx.Module):
    """Token ids [B, T] -> pooled text features [B, text_width] (before the projection)."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token_embedding = param(rngs, (cfg.vocab_size, cfg.text_width), (None, "embed"), cfg.param_dtype,
                                     std=0.02)
        self.position_embedding = param(rngs, (cfg.max_position_embeddings, cfg.text_width), (None, "embed"),
                                        cfg.param_dtype, std=0.01)
        self.layers = nnx.List([CLIPLayer(cfg, rngs, cfg.text_width, cfg.text_heads, cfg.text_mlp, cfg.text_act,
                                          cfg.text_eps) for _ in range(cfg.text_layers)])
        self.final_norm = LayerNorm(cfg.text_width, cfg.text_eps, param_dtype=cfg.param_dtype)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        B, T = input_ids_BT.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"{T} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
        ids = input_ids_BT.astype(jnp.int32)
        x = jnp.take(self.token_embedding[...], ids, axis=0).astype(F32)
        x = x + self.position_embedding[...][:T].astype(F32)[None]
        # Masked logits get the float32 minimum added (as HF's eager attention): zero weight after softmax.
        visible = jnp.tril(jnp.ones((T, T), bool))[None, None]
        if attention_mask_BT is not None:
            visible = visible & (attention_mask_BT.astype(bool)[:, None, None, :])
        bias = jnp.where(visible, 0.0, jnp.finfo(F32).min).astype(F32)
        for layer in self.layers:
            x = layer(x, bias)
        x = self.final_norm(x)
        if cfg.legacy_argmax_pooling:
            position = jnp.argmax(ids, axis=-1)
        else:
            position = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(x, position[:, None, None], axis=1)[:, 0]


class CLIPVisionTower(nnx.Module):
    """Normalised images [B, H, W, 3] -> pooled image features [B, vision_width] (before the projection)."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        w, p = cfg.vision_width, cfg.patch_size
        self.class_embedding = param(rngs, (w,), ("embed",), cfg.param_dtype, std=w ** -0.5)
        # [p, p, 3, width]: torch's conv weight [width, 3, p, p] in HWIO order.
        self.patch_embedding = param(rngs, (p, p, 3, w), (None, None, None, "embed"), cfg.param_dtype, std=0.02)
        self.position_embedding = param(rngs, (cfg.num_patches + 1, w), (None, "embed"), cfg.param_dtype, std=0.02)
        self.pre_norm = LayerNorm(w, cfg.vision_eps, param_dtype=cfg.param_dtype)
        self.layers = nnx.List([CLIPLayer(cfg, rngs, w, cfg.vision_heads, cfg.vision_mlp, cfg.vision_act,
                                          cfg.vision_eps) for _ in range(cfg.vision_layers)])
        self.post_norm = LayerNorm(w, cfg.vision_eps, param_dtype=cfg.param_dtype)

    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, H, W, C = pixels_BHWC.shape
        if (H, W, C) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"images are {H}x{W}x{C}, the model takes {cfg.image_size}x{cfg.image_size}x3")
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        dtype = jnp.dtype(cfg.compute_dtype)
        # A stride-p conv without overlap is a matmul over each patch's (row, column, channel) values.
        patches = pixels_BHWC.astype(dtype).reshape(B, g, p, g, p, 3)
        tokens = jnp.einsum("bgphqc,pqcd->bghd", patches, self.patch_embedding[...].astype(dtype),
                            precision=cfg.matmul_precision, preferred_element_type=F32).reshape(B, g * g, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(F32), (B, 1, cfg.vision_width))
        x = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...].astype(F32)[None]
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x, None)
        return self.post_norm(x[:, 0])


class CLIP(nnx.Module):
    """Both towers, their projections and the logit scale (a scalar, stored as its log as in HF)."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.text = CLIPTextTower(cfg, rngs)
        self.vision = CLIPVisionTower(cfg, rngs)
        self.text_projection = _dense(cfg, rngs, cfg.text_width, cfg.projection_dim, ("embed", None), use_bias=False)
        self.visual_projection = _dense(cfg, rngs, cfg.vision_width, cfg.projection_dim, ("embed", None),
                                        use_bias=False)
        self.logit_scale = param(None, (), (), cfg.param_dtype, fill=2.6592)  # HF's init: log(1 / 0.07)

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """text_embeds [B, projection_dim] (not normalised), as HF `get_text_features`."""
        return self.text_projection(self.text(input_ids, attention_mask)).astype(F32)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """image_embeds [B, projection_dim] (not normalised), as HF `get_image_features`."""
        return self.visual_projection(self.vision(pixels)).astype(F32)

    def __call__(self, input_ids: jax.Array, pixels: jax.Array, attention_mask: jax.Array | None = None
                 ) -> dict[str, jax.Array]:
        text, image = self.text_features(input_ids, attention_mask), self.image_features(pixels)
        logits_per_image = similarity_logits(image, text, self.logit_scale[...])
        return dict(text_embeds=normalise(text), image_embeds=normalise(image), logits_per_image=logits_per_image)


def normalise(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis (float32)."""
    x = x.astype(F32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def similarity_logits(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """exp(logit_scale) * cos(image, text): [N_images, N_texts]."""
    cos = jnp.matmul(normalise(image_embeds), normalise(text_embeds).T, precision="highest")
    return cos * jnp.exp(jnp.asarray(logit_scale, F32))


# ---- pure-function view -----------------------------------------------------------------------------

def init_params(cfg: CLIPConfig, seed: int = 0) -> nnx.State:
    """Freshly initialised parameters (an `nnx.State`), for tests."""
    return state.init_state(CLIP, cfg, seed)


def abstract_params(cfg: CLIPConfig) -> nnx.State:
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s (no memory)."""
    return state.abstract_state(CLIP, cfg)


def state_from_flat(cfg: CLIPConfig, flat: dict[tuple[str, ...], Any]) -> nnx.State:
    """Parameter state of `cfg` from {path: array}; every path must be present, shapes must match."""
    return state.fill_state(abstract_params(cfg), flat)


def bind(params: nnx.State, cfg: CLIPConfig) -> CLIP:
    return state.bind(CLIP, params, cfg)


def _text_features(params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array | None, cfg: CLIPConfig
                   ) -> jax.Array:
    return bind(params, cfg).text_features(input_ids, attention_mask)


def _image_features(params: nnx.State, pixels: jax.Array, cfg: CLIPConfig) -> jax.Array:
    return bind(params, cfg).image_features(pixels)


def _forward(params: nnx.State, input_ids: jax.Array, pixels: jax.Array, attention_mask: jax.Array | None,
             cfg: CLIPConfig) -> dict[str, jax.Array]:
    return bind(params, cfg)(input_ids, pixels, attention_mask)


# Jitted entry points: text_features(params, ids [B, T] int32, mask [B, T] or None, cfg) -> [B, P];
# image_features(params, pixels [B, S, S, 3] float32, cfg) -> [B, P]; forward(params, ids, pixels, mask, cfg).
text_features = jax.jit(_text_features, static_argnames=("cfg",))
image_features = jax.jit(_image_features, static_argnames=("cfg",))
forward = jax.jit(_forward, static_argnames=("cfg",))
