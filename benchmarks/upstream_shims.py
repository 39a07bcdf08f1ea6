"""Import shims that let upstream Infinity (FoundationVision/Infinity, PyTorch) run on a CPU machine.

Upstream imports flash-attn (CUDA only), timm (which needs torchvision) and pytz at module level. For
benchmarks we install small stand-ins before importing it: flash-attn's two functions as exact
per-sequence softmax attention in torch, timm's DropPath/register_model/SoftTargetCrossEntropy, and
pytz's UTC. Nothing here is upstream code; it only provides the names upstream imports.

Builders of the upstream models the benchmarks time: `build_infinity` (the transformer), `build_bsq_vae`
(the tokenizer, through upstream's own `vae_model`) and `build_t5_encoder` (HF's T5 encoder, which upstream
Infinity encodes prompts with).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types


def _stub(name: str) -> types.ModuleType:
    """An empty module standing in for `name`, marked as ours (see `_without_stubs`)."""
    module = types.ModuleType(name)
    module._varejax_stub = True
    return module


@contextlib.contextmanager
def _without_stubs():
    """Our stand-in modules out of sys.modules while the block runs (then back): libraries that probe for
    optional packages with importlib.util.find_spec (transformers probes flash_attn, timm) fail on a module
    without a spec."""
    hidden = {name: m for name, m in sys.modules.items() if getattr(m, "_varejax_stub", False)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


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

    module = _stub("flash_attn")
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

    timm, models, layers, loss = (_stub(name) for name in ("timm", "timm.models", "timm.models.layers", "timm.loss"))
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
            pytz = _stub("pytz")
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



@contextlib.contextmanager
def _import_stubs(names: tuple[str, ...]):
    """Empty modules for `names` while the block runs (only those not importable), removed afterwards.

    Upstream's tokenizer module imports torchvision and imageio at module level but uses neither for
    encoding or decoding; the stubs are removed again so that other libraries (transformers probes
    torchvision) do not mistake them for the real packages.
    """
    installed = {top for top in {n.split(".")[0] for n in names}
                 if top in sys.modules or importlib.util.find_spec(top) is not None}
    added = []
    for name in names:
        if name.split(".")[0] not in installed:
            sys.modules[name] = _stub(name)
            added.append(name)
    if "torchvision.transforms" in added and "torchvision" in added:
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def build_bsq_vae(vae_cfg, seed: int = 0):
    """Upstream's BSQ-VAE `AutoEncoder` (from the installed checkout), built by its own `vae_model` with the
    layout of our VAEConfig `vae_cfg` (d, patch, ch_mult; base width and blocks per level overridden, since
    `vae_model` fixes them at 128 and 2), torch's default random init seeded by `seed`, eval mode, no grads.

    Encode as upstream's training does: `model.encode_for_raw_features(images_BCHW, None)[0]`;
    decode: `model.decode(summed_codes_BdHW)` (clamped to [-1, 1])."""
    import torch

    with _import_stubs(("torchvision", "torchvision.transforms", "imageio")):
        from infinity.models.bsq_vae import vae as upstream_vae

    real_autoencoder = upstream_vae.AutoEncoder

    def reduced(args):
        args.base_ch, args.num_res_blocks = vae_cfg.base_ch, vae_cfg.num_res_blocks
        return real_autoencoder(args)

    torch.manual_seed(seed)
    upstream_vae.AutoEncoder = reduced
    try:
        # schedule_mode "dynamic" and codebook_size 2**d as tools/run_infinity.py passes them
        model = upstream_vae.vae_model(None, "dynamic", vae_cfg.codebook_dim, 2 ** vae_cfg.codebook_dim,
                                       test_mode=True, patch_size=vae_cfg.patch_size,
                                       encoder_ch_mult=list(vae_cfg.ch_mult), decoder_ch_mult=list(vae_cfg.ch_mult))
    finally:
        upstream_vae.AutoEncoder = real_autoencoder
    return model.eval()


def build_t5_encoder(t5_cfg, seed: int = 0):
    """HF `transformers.T5EncoderModel` (what upstream Infinity encodes prompts with) of the sizes of our
    T5Config `t5_cfg`, in Flan-T5's settings (gated-GELU, untied, dropout off), HF's random init seeded by
    `seed`; the layer-norm scales and the relative-position table are then drawn away from their init
    (ones, and a narrow normal) so that a port that dropped either would not match. Eval mode, no grads."""
    import torch

    with _without_stubs():  # transformers' import-time probes for optional packages
        import transformers
        from transformers.models.t5 import modeling_t5  # noqa: F401  (the lazy import happens here)

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=t5_cfg.vocab_size, d_model=t5_cfg.d_model, num_layers=t5_cfg.num_layers,
        num_heads=t5_cfg.num_heads, d_kv=t5_cfg.d_kv, d_ff=t5_cfg.d_ff, feed_forward_proj=t5_cfg.feed_forward_proj,
        relative_attention_num_buckets=t5_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=t5_cfg.relative_attention_max_distance,
        layer_norm_epsilon=t5_cfg.layer_norm_epsilon, dropout_rate=0.0, tie_word_embeddings=False)
    with _without_stubs():
        model = transformers.T5EncoderModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
        for p in model.parameters():
            p.requires_grad_(False)
    return model
