"""The key table of the BSQ-VAE tokenizer: upstream state_dict key <-> our NNX parameter path.

Generated from the abstract parameter tree of a `VAEConfig`, so it covers every parameter:

  X.kernel [kh, kw, I, O]   <- X.conv.weight [O, I, kh, kw]   (upstream `Conv` wraps nn.Conv2d as `.conv`)
  X.bias (a conv)           <- X.conv.bias
  X.scale / X.bias (norm*)  <- X.norm.weight / X.norm.bias    (upstream `Normalize` wraps nn.GroupNorm)

Module paths are the same as upstream's (`encoder.down.{i}.block.{j}.conv1`,
`encoder.down.{i}.downsample.conv`, `decoder.up.{i}.upsample.conv`, `decoder.mid.block_1`, ...).

Upstream's loader (`load_cnn`) also accepts the plain naming of unwrapped modules: `X.weight` /
`X.bias` for `X.conv.*` when the name contains conv / nin_shortcut (or q, k, v, proj_out), and for
`X.norm.*` when it contains norm. `normalise_key_names` maps such keys onto this table before planning.

Buffers: `quantizer.lfq.mask` and `quantize.lfq.mask` (the same module registered twice), int64 [d]
= 2**arange(d-1, ..., 0); checked, then dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from varejax.convert.strict import BufferRule, KeyRule, conv_to_hwio
from varejax.models.bsq_vae import VAEConfig

MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
_CONV_NAME_HINTS = ("conv", ".q.", ".k.", ".v.", ".proj_out.", ".nin_shortcut.")


def _is_norm(module: tuple[str, ...]) -> bool:
    return module[-1].startswith("norm")


def upstream_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """(upstream key, is a conv kernel?) of one of our parameter paths."""
    *module, leaf = path
    module = tuple(module)
    if leaf == "kernel":
        return ".".join(module) + ".conv.weight", True
    if leaf == "scale":
        return ".".join(module) + ".norm.weight", False
    if leaf == "bias":
        return ".".join(module) + (".norm.bias" if _is_norm(module) else ".conv.bias"), False
    raise AssertionError(f"unexpected parameter leaf {leaf!r} in {path}")


def mask_check(d: int):
    expected = 2 ** np.arange(d - 1, -1, -1, dtype=np.int64)

    def check(x: np.ndarray) -> str | None:
        if not np.issubdtype(x.dtype, np.integer):
            return f"expected an integer buffer 2**arange({d - 1}..0), found dtype {x.dtype}"
        if x.shape != expected.shape or not np.array_equal(x.astype(np.int64), expected):
            head = x.reshape(-1)[:4].tolist()
            return f"expected 2**arange({d - 1}..0) = {expected[:4].tolist()}..., found {head}..."
        return None

    return check


def vae_rules(cfg: VAEConfig) -> tuple[list[KeyRule], list[BufferRule]]:
    """Key rules and buffer rules of the tokenizer described by `cfg`."""
    from varejax.models.apply import flat_params
    from varejax.models.bsq_vae import abstract_vae_params

    rules = []
    for parts, leaf in flat_params(abstract_vae_params(cfg)).items():
        key, is_kernel = upstream_key(parts)
        shape = tuple(leaf.shape)
        if is_kernel:
            kh, kw, n_in, n_out = shape
            rules.append(KeyRule(key, parts, (n_out, n_in, kh, kw), conv_to_hwio))
        else:
            rules.append(KeyRule(key, parts, shape))
    buffers = [BufferRule(k, (cfg.codebook_dim,), mask_check(cfg.codebook_dim), required=False) for k in MASK_KEYS]
    return rules, buffers


def expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The upstream state_dict key -> shape table of `cfg` (parameters and the two mask buffers)."""
    rules, buffers = vae_rules(cfg)
    table = {r.key: r.shape for r in rules}
    table.update({b.key: b.shape for b in buffers})
    return table


def _module_names(key: str) -> list[str]:
    """Upstream `load_cnn`'s plain -> module naming candidates for one key (none if it does not apply)."""
    for leaf in (".weight", ".bias"):
        if key.endswith(leaf):
            stem = key[: -len(leaf)]
            break
    else:
        return []
    candidates = []
    if any(h in key for h in _CONV_NAME_HINTS):
        candidates.append(f"{stem}.conv{leaf}")
    if "norm" in key:
        candidates.append(f"{stem}.norm{leaf}")
    return candidates


def normalise_key_names(keys: list[str], expected: Mapping[str, object]) -> tuple[dict[str, str], list[str]]:
    """Maps source keys onto the expected (module) naming, as upstream `load_cnn` does.

    A key already in `expected` is kept. Otherwise `X.weight` / `X.bias` becomes `X.conv.*` (for
    conv-like names) or `X.norm.*` (for norm names) when that is an expected key. Other keys are kept
    as they are (the plan reports them as unexpected).

    Returns:
      ({source key: canonical key}, [problems]) where problems name tensors given twice (in both
      naming schemes).
    """
    mapping: dict[str, str] = {}
    for key in keys:
        if key in expected:
            mapping[key] = key
            continue
        hits = [c for c in _module_names(key) if c in expected]
        mapping[key] = hits[0] if len(hits) == 1 else key
    by_target: dict[str, list[str]] = {}
    for src, dst in mapping.items():
        by_target.setdefault(dst, []).append(src)
    problems = [f"  duplicate  {dst} is given {len(srcs)} times: {sorted(srcs)}"
                for dst, srcs in by_target.items() if len(srcs) > 1]
    return mapping, problems
