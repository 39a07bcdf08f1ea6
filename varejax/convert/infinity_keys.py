"""The key table of the Infinity transformer: upstream state_dict key <-> our NNX parameter path.

Generated from the abstract parameter tree of a config, so it covers every parameter by construction:

  blocks.{i}.*                  <- block_chunks.{i // per_chunk}.module.{i % per_chunk}.*
  text_proj_for_sos.*           <- text_proj_for_sos.ca.*
  text_proj_for_ca.fc1/fc2      <- text_proj_for_ca.0 / .2
  shared_ada_lin                <- shared_ada_lin.1
  head_nm                       <- head_nm.ada_lin.1
  lvl_embed                     <- lvl_embed.weight
  Dense `kernel` [in, out]      <- Linear `weight` [out, in] (transposed)
  norm `scale`                  <- `weight`

LoRA factors (`lora_a`, `lora_b`, present when the config enables LoRA) are not upstream parameters and
have no key: the table is the same with or without adapters.

Buffers: every attention's `zero_k_bias` (must be zero, then dropped). Caches that old checkpoints
may carry (`lvl_1L`, `attn_bias_for_masking`, ...) are dropped as upstream's loader drops them.
"""

from __future__ import annotations

from varejax.convert.strict import BufferRule, KeyRule, must_be_zero, transpose_2d
from varejax.models.config import InfinityConfig, is_lora_path

_TOP_LEVEL = {
    "text_proj_for_sos": "text_proj_for_sos.ca",
    "shared_ada_lin": "shared_ada_lin.1",
    "head_nm": "head_nm.ada_lin.1",
}
_SUBMODULE = {("text_proj_for_ca", "fc1"): "text_proj_for_ca.0", ("text_proj_for_ca", "fc2"): "text_proj_for_ca.2"}
DERIVED_CACHES = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def upstream_key(path: tuple[str, ...], cfg: InfinityConfig) -> tuple[str, bool]:
    """(upstream key, transpose?) of one of our parameter paths."""
    parts = list(path)
    leaf = parts.pop()
    if parts and parts[0] == "blocks":
        i = int(parts[1])
        prefix = [f"block_chunks.{i // cfg.blocks_per_chunk}.module.{i % cfg.blocks_per_chunk}"]
        parts = prefix + parts[2:]
    elif tuple(parts[:2]) in _SUBMODULE:
        parts = [_SUBMODULE[tuple(parts[:2])]] + parts[2:]
    elif parts and parts[0] in _TOP_LEVEL:
        parts = [_TOP_LEVEL[parts[0]]] + parts[1:]
    transpose = leaf == "kernel"
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    if not parts and leaf == "lvl_embed":
        return "lvl_embed.weight", False
    return ".".join(parts + [leaf]), transpose


def infinity_rules(cfg: InfinityConfig) -> tuple[list[KeyRule], list[BufferRule]]:
    """Key rules and buffer rules of the transformer described by `cfg`."""
    from varejax.models.apply import abstract_params, flat_params  # local: keeps `varejax --help` light

    rules = []
    for parts, leaf in flat_params(abstract_params(cfg)).items():
        if is_lora_path(parts):
            continue
        key, transpose = upstream_key(parts, cfg)
        shape = tuple(leaf.shape)
        rules.append(KeyRule(key, parts, shape[::-1] if transpose else shape,
                             transpose_2d if transpose else (lambda x: x)))
    attention_prefixes = ["text_proj_for_sos.ca"] + [
        f"block_chunks.{i // cfg.blocks_per_chunk}.module.{i % cfg.blocks_per_chunk}.{m}"
        for i in range(cfg.depth) for m in ("sa", "ca")]
    buffers = [BufferRule(f"{p}.zero_k_bias", (cfg.cond_dim if p.startswith("text") else cfg.embed_dim,), must_be_zero)
               for p in attention_prefixes]
    buffers += [BufferRule(k, None, None, required=False) for k in DERIVED_CACHES]
    return rules, buffers


def expected_shapes(cfg: InfinityConfig) -> dict[str, tuple[int, ...]]:
    """The upstream state_dict key -> shape table of `cfg` (parameters and required buffers)."""
    rules, buffers = infinity_rules(cfg)
    table = {r.key: r.shape for r in rules}
    table.update({b.key: b.shape for b in buffers if b.required})
    return table
