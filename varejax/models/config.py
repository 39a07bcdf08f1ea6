"""Typed configuration of the Infinity transformer, with the released presets.

`InfinityConfig` is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`). It
holds the architecture (what the checkpoint must match) and the numerics (parameter dtype, compute
dtype, the bf16 cross-attention emulation, attention kernel, remat, optional LoRA adapters), which a
user may change freely.

LoRA (`lora_rank > 0`): the Dense layers of every block named by `lora_targets` get factors
`lora_a` [in, r] and `lora_b` [r, out] and compute y = x W + b + (x A) B * alpha / r (see
`varejax.models.lora`). The factors are not upstream parameters: the converter's key table skips them,
and a converted model loads with them added (A initialised from `lora_seed`, B = 0, so the model is
unchanged until B is trained).

Presets: `infinity_2b`, `infinity_8b` (the released models, see docs/infinity.md section 1) and
`tiny` / `small` for tests. `from_upstream_kwargs` reads the constructor arguments that upstream
`Infinity(...)` takes (as stored in a fixture's `config.json`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from varejax.models.config_base import ModelConfig, lookup_preset

# Fields that fix the parameter shapes; everything else is numerics or training behaviour.
ARCH_FIELDS = (
    "depth", "embed_dim", "num_heads", "mlp_ratio", "text_channels", "text_maxlen", "codebook_dim",
    "apply_spatial_patchify", "block_chunks", "num_levels",
)

# The Dense layers inside a block that may carry LoRA factors ("part.module"), and the factor leaves.
LORA_MODULES = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")
LORA_LEAVES = ("lora_a", "lora_b")
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_seed")


def is_lora_path(path: tuple[str, ...]) -> bool:
    """True for the LoRA factor leaves (`...lora_a`, `...lora_b`), which are not upstream parameters."""
    return bool(path) and path[-1] in LORA_LEAVES


def resolve_lora_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """Qualified module names ("sa.proj", ...) that `targets` selects, in LORA_MODULES order.

    A target is a qualified name from LORA_MODULES or a bare module name that selects every block
    module of that name: "proj" = sa.proj and ca.proj, "mat_kv" = ca.mat_kv, "mat_qkv" = sa.mat_qkv.
    """
    selected, unknown = set(), []
    for target in targets:
        hits = [m for m in LORA_MODULES if target in (m, m.split(".")[1])]
        if not hits:
            unknown.append(target)
        selected.update(hits)
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(LORA_MODULES)} or the bare names "
                         f"{sorted({m.split('.')[1] for m in LORA_MODULES})}")
    return tuple(m for m in LORA_MODULES if m in selected)


def _round_half_even(x: float) -> int:
    # Python's round() is banker's rounding, exactly what upstream uses for the FFN width.
    return int(round(x))


@dataclasses.dataclass(frozen=True)
class InfinityConfig(ModelConfig):
    """Architecture and numerics of an Infinity transformer.

    Attributes:
      depth: number of transformer blocks.
      embed_dim: model width C (the condition width D equals C in every released model).
      num_heads: self- and cross-attention heads.
      mlp_ratio: FFN hidden = round(C * mlp_ratio / 256) * 256.
      text_channels: width of the text features (Flan-T5-XL: 2048).
      text_maxlen: rows of the learned null-text `cfg_uncond` (512 for the released models).
      codebook_dim: bits per VAE token d (32 for the 2B tokenizer, 14 for the 8B one).
      apply_spatial_patchify: 8B: 2x2 latent patches are one transformer token (4d bits per token).
      block_chunks: how upstream groups the blocks in its state_dict (`block_chunks.{c}.module.{j}`).
      num_levels: rows of the level (scale) embedding; upstream fixes 15.
      norm_eps: epsilon of every LayerNorm/RMSNorm.
      pad_to_multiplier: pad the sequence to a multiple of this (rows see only token 0, then dropped).
      drop_path_rate: stochastic depth, linearly increasing from 0 over the blocks (training only).
      cond_drop_rate: probability of replacing a sample's text by `cfg_uncond[:len]` (training only).
      param_dtype: dtype parameters are created/stored in.
      compute_dtype: dtype of matmul inputs; norms, ada-LN, rope, softmax and the head stay float32.
      ca_bf16_rounding: round q, k, v and the output of every cross-attention (and the SOS pool) to
        bfloat16 as upstream's flash-attn call does (fixture mode `cabf16`).
      matmul_precision: `jax.lax.Precision` name for float32 matmuls ("highest" gives true fp32 on
        GPU/TPU, needed for parity; "default" lets the backend use TF32/bf16 passes).
      attention_impl: "xla" (any backend), "chunked" (the same math over blocks of 256 queries, each
        rematerialised: memory chunk x L instead of L x L, what 1024 px training needs), "cudnn"
        (GPU, bf16/fp16 compute only) or "scales" (no mask, no padding: each scale's queries attend to
        the key prefix they see, big scales chunked; the fastest on CPU, `models/attention.py`) or
        "splash" (TPU: JAX's Pallas splash kernel under the static block-causal mask, hidden tiles
        skipped, `models/splash.py`; interpret mode elsewhere; the sequence is padded to a multiple of 128).
      remat: rematerialise each block in the backward pass (saves activation memory).
      scan_blocks: run the blocks as one `lax.scan` over their stacked parameters (with `remat`, each
        scanned block rematerialised): compile time stops growing with depth; parameters stay stored per
        block. Costs a copy of the block weights per call; per-block activation captures are not recorded.
      grad_boundaries: "auto" (on for the CPU backend only), "on" or "off": materialise the residual
        stream's gradient after every sub-layer (`layers.materialize_cotangent`). An identity; on XLA:CPU
        it stops the compiler from recomputing the whole residual-gradient chain inside every weight
        gradient's transposed copy (measured: the issue-16 gradient's copies 95 -> 28 ms). Off on
        accelerators, where the boundary (a conditional) would cost a device-to-host sync.
      lora_rank: rank r of the LoRA factors (0 = no LoRA; the official code's optional LoRA uses 4).
      lora_alpha: LoRA scale numerator: scale = alpha / r; 0 means alpha = r (scale 1).
      lora_targets: block modules that get LoRA factors (see `resolve_lora_targets`); the official
        targets are mat_qkv, mat_kv and proj.
      lora_seed: seed of the deterministic initialisation of the `lora_a` factors.
    """

    arch_fields = ARCH_FIELDS  # not a field: no annotation

    depth: int = 2
    embed_dim: int = 128
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_channels: int = 256
    text_maxlen: int = 16
    codebook_dim: int = 32
    apply_spatial_patchify: bool = False
    block_chunks: int = 1
    num_levels: int = 15
    norm_eps: float = 1e-6
    pad_to_multiplier: int = 128
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    ca_bf16_rounding: bool = False
    matmul_precision: str = "highest"
    attention_impl: str = "scales"
    remat: bool = False
    scan_blocks: bool = False
    grad_boundaries: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ("mat_qkv", "mat_kv", "proj")
    lora_seed: int = 0

    def __post_init__(self):
        # JSON and config overrides give lists (or one string); keep the config hashable.
        targets = self.lora_targets
        targets = tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) \
            else tuple(targets)
        object.__setattr__(self, "lora_targets", targets)
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // max(self.num_heads, 1)) % 4:
            problems.append("head_dim must be a multiple of 4 (2-D rope uses head_dim/4 frequencies per axis)")
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            problems.append(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.pool_heads < 1 or self.embed_dim % self.pool_heads:
            problems.append(
                f"the text pool has {self.pool_heads} heads (text_channels // {self.pool_head_divisor}), "
                f"which must divide embed_dim {self.embed_dim}")
        if self.grad_boundaries not in ("auto", "on", "off"):
            problems.append(f"grad_boundaries must be auto, on or off, not {self.grad_boundaries!r}")
        if self.attention_impl not in ("xla", "chunked", "cudnn", "scales", "splash"):
            problems.append(f"attention_impl must be xla, chunked, cudnn, scales or splash, not "
                            f"{self.attention_impl!r}")
        if self.matmul_precision not in ("default", "high", "highest"):
            problems.append(f"matmul_precision must be default/high/highest, not {self.matmul_precision!r}")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            problems.append(f"lora_rank ({self.lora_rank}) and lora_alpha ({self.lora_alpha}) must be >= 0")
        try:
            resolved = resolve_lora_targets(targets)
            if self.lora_rank > 0 and not resolved:
                problems.append("lora_rank > 0 but lora_targets is empty")
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("invalid InfinityConfig: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return _round_half_even(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def cond_dim(self) -> int:
        return self.embed_dim

    @property
    def pool_head_divisor(self) -> int:
        # Upstream TextAttentivePool: head_dim 128, or 64 when D > 4096; heads = Ct5 // that.
        return 64 if self.cond_dim > 4096 else 128

    @property
    def pool_heads(self) -> int:
        return self.text_channels // self.pool_head_divisor

    @property
    def pool_head_dim(self) -> int:
        return self.cond_dim // self.pool_heads

    @property
    def bits_per_token(self) -> int:
        """d: bits the head predicts per transformer token (4 * codebook_dim with patchify)."""
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)

    @property
    def num_logits(self) -> int:
        """V = 2 d: two logits per bit."""
        return 2 * self.bits_per_token

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def lora_scale(self) -> float:
        """alpha / r of the LoRA update (alpha = r when lora_alpha is 0)."""
        if self.lora_rank <= 0:
            return 0.0
        return (self.lora_alpha or float(self.lora_rank)) / self.lora_rank

    def lora_modules(self) -> tuple[str, ...]:
        """The qualified block modules ("ca.proj", ...) that carry LoRA factors (empty without LoRA)."""
        return resolve_lora_targets(self.lora_targets) if self.lora_rank > 0 else ()

    def has_lora(self, part: str, module: str) -> bool:
        """Whether block module `part.module` (e.g. "sa", "mat_qkv") gets LoRA factors."""
        return f"{part}.{module}" in self.lora_modules()

    def without_lora(self) -> InfinityConfig:
        """The same model without adapters (the LoRA fields at their defaults)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in LORA_FIELDS}
        return dataclasses.replace(self, **defaults)

    def drop_path_rates(self) -> list[float]:
        if self.depth == 1:
            return [0.0]
        return [self.drop_path_rate * i / (self.depth - 1) for i in range(self.depth)]

    # ---- (de)serialisation (replace, to_dict, from_dict, arch_dict: ModelConfig) ------------------
    @classmethod
    def from_upstream_kwargs(cls, kwargs: dict[str, Any], codebook_dim: int, **overrides: Any) -> InfinityConfig:
        """Builds a config from upstream `Infinity(**kwargs)` constructor arguments.

        Flags our port does not implement (they are fixed in every released model) are checked.
        """
        expected = {"shared_aln": True, "head_aln": True, "rms_norm": False, "nm0": False, "cos_attn": True,
                    "swiglu": False, "head_depth": 1, "use_bit_label": 1, "rope2d_each_sa_layer": 1,
                    "rope2d_normalized_by_hw": 2, "add_lvl_embeding_only_first_block": 1}
        bad = {k: kwargs[k] for k, v in expected.items() if k in kwargs and kwargs[k] != v}
        if kwargs.get("cross_attn_layer_scale", -1) >= 0:
            bad["cross_attn_layer_scale"] = kwargs["cross_attn_layer_scale"]
        if bad:
            raise ValueError(f"upstream flags not supported by this port (released models use {expected}): {bad}")
        fields = dict(
            depth=int(kwargs["depth"]), embed_dim=int(kwargs["embed_dim"]), num_heads=int(kwargs["num_heads"]),
            mlp_ratio=float(kwargs.get("mlp_ratio", 4.0)), text_channels=int(kwargs["text_channels"]),
            text_maxlen=int(kwargs["text_maxlen"]), codebook_dim=int(codebook_dim),
            apply_spatial_patchify=bool(kwargs.get("apply_spatial_patchify", 0)),
            block_chunks=int(kwargs.get("block_chunks", 1) or 1), norm_eps=float(kwargs.get("norm_eps", 1e-6)),
            pad_to_multiplier=max(1, int(kwargs.get("pad_to_multiplier", 1) or 1)),
            drop_path_rate=float(kwargs.get("drop_path_rate", 0.0)),
            cond_drop_rate=float(kwargs.get("cond_drop_rate", 0.1)),
        )
        fields.update(overrides)
        return cls(**fields)


PRESETS: dict[str, InfinityConfig] = {
    # tools/run_infinity.py load_transformer: depth 32, width 2048, 16 heads, 8 block chunks, d = 32.
    "infinity_2b": InfinityConfig(depth=32, embed_dim=2048, num_heads=16, text_channels=2048, text_maxlen=512,
                                  codebook_dim=32, block_chunks=8, drop_path_rate=0.1, cond_drop_rate=0.1),
    # depth 40, width 3584, 28 heads, d = 14 with 2x2 spatial patchify (56 bits per token).
    "infinity_8b": InfinityConfig(depth=40, embed_dim=3584, num_heads=28, text_channels=2048, text_maxlen=512,
                                  codebook_dim=14, apply_spatial_patchify=True, block_chunks=8,
                                  drop_path_rate=0.1, cond_drop_rate=0.1),
    # Test sizes: as the infinity_tiny fixture, and a slightly larger one.
    "tiny": InfinityConfig(depth=2, embed_dim=128, num_heads=4, text_channels=256, text_maxlen=16,
                           codebook_dim=32, block_chunks=2),
    "small": InfinityConfig(depth=4, embed_dim=256, num_heads=4, text_channels=256, text_maxlen=32,
                            codebook_dim=16, block_chunks=2),
}
PRESET_ALIASES = {"2b": "infinity_2b", "8b": "infinity_8b"}


def get_preset(name: str) -> InfinityConfig:
    return lookup_preset(name, PRESETS, PRESET_ALIASES, "Infinity")


def count_params_formula(cfg: InfinityConfig) -> int:
    """Parameter count of upstream's state_dict (without buffers), from the config alone."""
    C, D, T, d, V = cfg.embed_dim, cfg.cond_dim, cfg.text_channels, cfg.bits_per_token, cfg.num_logits
    hff = cfg.ffn_hidden
    block = (6 * C + cfg.num_heads + 3 * C * C + 2 * C + C * C + C  # ada_gss, scale_mul, qkv, q/v bias, proj
             + C * C + C + 2 * C * D + C + C * C + C                 # ca: q, kv, v_bias, proj
             + C * hff + hff + hff * C + C + 2 * C)                  # ffn, ca_norm
    top = (cfg.text_maxlen * T + C + T + cfg.pool_heads * cfg.pool_head_dim + 2 * D * T + D + D * D + D
           + D * T + D + D * D + D + cfg.num_levels * C + C * d + C + 6 * C * D + 6 * C + 2 * C * D + 2 * C
           + V * C + V)
    return top + cfg.depth * block

