"""Import shims that let upstream Infinity (FoundationVision/Infinity, PyTorch) run on a CPU machine.

Upstream imports flash-attn (CUDA only), timm (which needs torchvision) and pytz at module level. For
benchmarks we install small stand-ins before importing it: flash-attn's two functions as exact
per-sequence softmax attention in torch, timm's DropPath/register_model/SoftTargetCrossEntropy, and
pytz's UTC. Nothing here is upstream code; it only provides the names upstream imports.
"""

from __future__ import annotations

import os
import sys
import types


def _flash_attn_module():
    import torch
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):
        # q, k, v: [B, L, H, c]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale)
        return out.transpose(1, 2)

    def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        dropout_p=0.0, softmax_scale=None, **_):
        # q: [Nq, H, c]; kv: [Nk, 2, H, c]; each sequence attends to its own keys.
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)[None]
            ks = kv[cu_seqlens_k[i]:cu_seqlens_k[i + 1], 0].transpose(0, 1)[None]
            vs = kv[cu_seqlens_k[i]:cu_seqlens_k[i + 1], 1].transpose(0, 1)[None]
            outs.append(F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(),
                                                       scale=softmax_scale)[0].transpose(0, 1).to(q.dtype))
        return torch.cat(outs, 0)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    return module


def _timm_modules():
    import torch

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    loss = types.ModuleType("timm.loss")
    models.register_model = lambda fn: fn
    layers.DropPath = DropPath
    layers.drop_path = lambda x, *a, **k: x
    loss.SoftTargetCrossEntropy = type("SoftTargetCrossEntropy", (torch.nn.Module,), {})
    timm.models, timm.loss, models.layers = models, loss, layers
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.loss": loss}


def install(upstream_path: str) -> None:
    """Makes `import infinity...` load the upstream checkout at `upstream_path` on CPU."""
    import datetime

    if not os.path.isdir(os.path.join(upstream_path, "infinity")):
        raise FileNotFoundError(f"{upstream_path} is not an Infinity checkout (no infinity/ folder)")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # its fused ops are torch.compile'd
    sys.modules.setdefault("flash_attn", _flash_attn_module())
    for name, module in _timm_modules().items():
        sys.modules.setdefault(name, module)
    if "pytz" not in sys.modules:
        try:
            import pytz  # noqa: F401
        except ImportError:
            pytz = types.ModuleType("pytz")
            pytz.timezone = lambda name: datetime.UTC
            pytz.utc = datetime.UTC
            sys.modules["pytz"] = pytz
    if upstream_path not in sys.path:
        sys.path.insert(0, upstream_path)


def bits_tokenizer(d: int):
    """A stand-in for upstream's tokenizer with the parts its transformer and sampler touch (bits -> codes)."""
    import torch

    class Codes:
        z_interplote_up = "trilinear"

        class lfq:  # noqa: N801 - mirrors upstream's attribute name
            mask = 2 ** torch.arange(d - 1, -1, -1)

            @staticmethod
            def indices_to_codes(bits, label_type):
                return ((2 * bits.float() - 1) / d ** 0.5).permute(0, 4, 1, 2, 3)

    class Tokenizer:
        embed_dim, vocab_size, quantizer = d, 2 ** d, Codes

    return Tokenizer


def build_infinity(cfg, inference: bool):
    """Upstream's `Infinity` (from the installed checkout) with the sizes of our InfinityConfig `cfg`, in the
    released models' settings (shared ada-LN, cosine attention, 2-D rope, bit labels, padding to 128),
    condition dropout off. Returns (model, tokenizer stand-in class)."""
    from infinity.models.infinity import Infinity

    tokenizer = bits_tokenizer(cfg.bits_per_token)
    model = Infinity(tokenizer(), text_channels=cfg.text_channels, text_maxlen=cfg.text_maxlen,
                     embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                     block_chunks=max(2, cfg.block_chunks), shared_aln=True, cos_attn=True, rope2d_each_sa_layer=1,
                     rope2d_normalized_by_hw=2, pad_to_multiplier=128, fused_norm=True, use_bit_label=1,
                     add_lvl_embeding_only_first_block=1, inference_mode=inference, cond_drop_rate=0.0)
    return model, tokenizer

