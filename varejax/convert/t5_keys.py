"""The key table of the T5 encoder: HF `T5EncoderModel` state_dict key <-> our NNX parameter path.

Generated from the config, then checked against the abstract parameter tree (every parameter is covered
exactly once):

  shared                                 <- shared.weight [vocab, d_model]
  relative_attention_bias                <- encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
  blocks.{i}.attn.{q,k,v,o}.kernel       <- encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight (transposed)
  blocks.{i}.attn_norm.scale             <- encoder.block.{i}.layer.0.layer_norm.weight
  blocks.{i}.ffn.{wi_0,wi_1,wo}.kernel   <- encoder.block.{i}.layer.1.DenseReluDense.{...}.weight (gated-gelu)
  blocks.{i}.ffn.{wi,wo}.kernel          <- encoder.block.{i}.layer.1.DenseReluDense.{wi,wo}.weight (relu)
  blocks.{i}.ffn_norm.scale              <- encoder.block.{i}.layer.1.layer_norm.weight
  final_norm.scale                       <- encoder.final_layer_norm.weight

`encoder.embed_tokens.weight` (tied to `shared.weight`; some files hold both) is an optional buffer that
must equal `shared.weight`. Keys of a full T5ForConditionalGeneration (`decoder.*`, `lm_head.*`) are
dropped by the converter before matching (see DROPPED_PREFIXES).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from varejax.convert.strict import BufferRule, KeyRule, transpose_2d
from varejax.models.t5 import T5Config

EMBED_TOKENS = "encoder.embed_tokens.weight"
DROPPED_PREFIXES = ("decoder.", "lm_head.")


def _linear(key: str, path: tuple[str, ...], n_in: int, n_out: int) -> KeyRule:
    return KeyRule(key, path + ("kernel",), (n_out, n_in), transpose_2d)


def t5_rules(cfg: T5Config, embed_tokens_check: Callable[[np.ndarray], str | None] | None = None
             ) -> tuple[list[KeyRule], list[BufferRule]]:
    """Key rules and buffer rules of the T5 encoder described by `cfg`.

    Args:
      embed_tokens_check: check of the tied `encoder.embed_tokens.weight` copy (the converter passes one
        that compares it with `shared.weight`).
    """
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
    rules = [
        KeyRule("shared.weight", ("shared",), (cfg.vocab_size, d)),
        KeyRule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("relative_attention_bias",),
                (cfg.relative_attention_num_buckets, cfg.num_heads)),
    ]
    ffn = ("wi_0", "wi_1") if cfg.gated else ("wi",)
    for i in range(cfg.num_layers):
        key, path = f"encoder.block.{i}.layer", ("blocks", str(i))
        for name in "qkv":
            rules.append(_linear(f"{key}.0.SelfAttention.{name}.weight", path + ("attn", name), d, inner))
        rules.append(_linear(f"{key}.0.SelfAttention.o.weight", path + ("attn", "o"), inner, d))
        rules.append(KeyRule(f"{key}.0.layer_norm.weight", path + ("attn_norm", "scale"), (d,)))
        for name in ffn:
            rules.append(_linear(f"{key}.1.DenseReluDense.{name}.weight", path + ("ffn", name), d, ff))
        rules.append(_linear(f"{key}.1.DenseReluDense.wo.weight", path + ("ffn", "wo"), ff, d))
        rules.append(KeyRule(f"{key}.1.layer_norm.weight", path + ("ffn_norm", "scale"), (d,)))
    rules.append(KeyRule("encoder.final_layer_norm.weight", ("final_norm", "scale"), (d,)))
    _check_covers_model(cfg, rules)
    buffers = [BufferRule(EMBED_TOKENS, (cfg.vocab_size, d), embed_tokens_check, required=False)]
    return rules, buffers


def _check_covers_model(cfg: T5Config, rules: list[KeyRule]) -> None:
    from varejax.models.apply import flat_params
    from varejax.models.t5 import abstract_params

    model = {k: tuple(v.shape) for k, v in flat_params(abstract_params(cfg)).items()}
    table = {r.path: (r.shape[::-1] if r.transform is transpose_2d else r.shape) for r in rules}
    if model != table:  # a bug in this table, not in the user's file
        raise AssertionError(f"T5 key table and model differ: only in model {sorted(set(model) - set(table))[:5]}, "
                             f"only in table {sorted(set(table) - set(model))[:5]}, shapes "
                             f"{[(k, model[k], table[k]) for k in model if k in table and model[k] != table[k]][:5]}")


def expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """The HF T5EncoderModel state_dict key -> shape table of `cfg` (parameters only)."""
    rules, _ = t5_rules(cfg)
    return {r.key: r.shape for r in rules}
