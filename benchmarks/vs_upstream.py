"""Every hot path (transformer, tokenizer, text encoder), ours against upstream PyTorch Infinity, in one process.

    VAREJAX_UPSTREAM_INFINITY=/path/to/Infinity python benchmarks/vs_upstream.py --config configs/vs_upstream.py
    python benchmarks/vs_upstream.py --config configs/vs_upstream.py:tiny --config.out=/tmp/v.json

Paths (config.paths): `forward` (teacher-forced logits), `grad` (forward + backward of the bit loss),
`grad_remat` (the same with per-block remat; upstream: checkpointing='full-block'), `svare` (one official
S-VARE iteration: erase pass + preserve pass, each forward + backward + clip + AdamW on CA + FFN, the
teacher's logits precomputed as in training), `sample` (CFG sampling of every scale with the KV cache);
and the codecs around it: `vae_encode` (images -> the tokenizer encoder's raw features, upstream
`encode_for_raw_features`, which training feeds to the bit quantiser), `vae_decode` (summed codes -> images
clamped to [-1, 1], upstream `decode`, what sampling ends with) and `t5_encode` (token ids + mask -> T5
last hidden states, upstream: HF `T5EncoderModel`), at the sizes of `config.vae` / `config.t5`.
Both sides get the same sizes and random weights of the same shapes (speed does not depend on values).
For the codecs the weights are the same too: with an upstream checkout, upstream's random torch weights
are loaded into ours through varejax/convert's key tables, and (`config.check_outputs`) both sides'
outputs must agree within `config.vae_tolerance` / `config.t5_tolerance` before anything is timed.
`config.runs` independent runs, each the median of `config.steps` timed calls after a warm-up; the
figure is the median over runs and the spread is min..max. Ratios are upstream / ours (> 1: we are
faster), computed per run. Without $VAREJAX_UPSTREAM_INFINITY (or torch) only our side is timed.
Prints one JSON object (and writes it to config.out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from varejax.configlib import parse_config_args
from varejax.convert import strict
from varejax.convert.t5_keys import EMBED_TOKENS, t5_rules
from varejax.convert.vae_keys import vae_rules
from varejax.erase import step as svare
from varejax.models import apply, bit_loss, bitwise, bsq_vae, schedules, t5
from varejax.models.config import get_preset
from varejax.sample.sampler import SamplingConfig, generate_jit

HERE = os.path.dirname(os.path.abspath(__file__))
TRANSFORMER_PATHS = ("forward", "grad", "grad_remat", "svare", "sample")
CODEC_PATHS = ("vae_encode", "vae_decode", "t5_encode")


def _median_ms(fn, steps: int) -> float:
    fn()  # warm-up (compile, allocator)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def make_inputs(config, cfg, schedule) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(config.seed)
    B, L, d = config.batch, schedules.sequence_length(schedule), cfg.bits_per_token
    lens = np.asarray([config.text_lengths[i % len(config.text_lengths)] for i in range(B)])
    T = int(lens.max())
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    text = (rng.randn(B, T, cfg.text_channels) * 0.25 * mask[..., None]).astype(np.float32)
    target = (rng.randn(B, T, cfg.text_channels) * 0.25 * mask[..., None]).astype(np.float32)
    return {"text": text, "target_text": target, "mask": mask, "lens": lens,
            "x": (rng.randn(B, L - 1, d) * 0.1).astype(np.float32),
            "bits": rng.randint(0, 2, (B, L, d)).astype(np.int8),
            "teacher_logits": rng.randn(B, L, 2 * d).astype(np.float32),
            **codec_inputs(config, schedule, rng)}


# ---- the codecs: sizes, inputs, weights ---------------------------------------------------------------

def codec_configs(config, compute_dtype: str = "float32") -> tuple[bsq_vae.VAEConfig, t5.T5Config]:
    """Our tokenizer and T5 configs of `config.vae` / `config.t5` (Flan-T5's gated GELU, 32 buckets)."""
    precision = "highest" if compute_dtype == "float32" else "default"
    v = config.vae
    vae_cfg = bsq_vae.VAEConfig(codebook_dim=config.codebook_dim, patch_size=v.patch_size, ch_mult=tuple(v.ch_mult),
                                base_ch=v.base_ch, num_res_blocks=v.num_res_blocks, compute_dtype=compute_dtype,
                                matmul_precision=precision)
    c = config.t5
    t5_cfg = t5.T5Config(vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers, num_heads=c.num_heads,
                         d_kv=c.d_kv, d_ff=c.d_ff, feed_forward_proj="gated-gelu", compute_dtype=compute_dtype,
                         matmul_precision=precision)
    return vae_cfg, t5_cfg


def codec_inputs(config, schedule, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """Images [B, H, W, 3] in [-1, 1]; summed codes [B, h, w, d] of random bits on the schedule's scales that
    fit the latent grid (as sampling accumulates them); T5 token ids [B, T] (EOS = 1 last, pad = 0 after,
    T = the longest of config.text_lengths, the same padding both sides) and their mask."""
    vae_cfg, t5_cfg = codec_configs(config)
    B, size = config.batch, config.vae.image_size
    h, w = vae_cfg.latent_size(size, size)
    sizes = [s for s in bitwise.scale_sizes(schedule) if s[0] <= h and s[1] <= w]
    if not sizes or sizes[-1] != (h, w):
        sizes.append((h, w))
    bits = [rng.randint(0, 2, (B, *s, vae_cfg.codebook_dim)).astype(np.int8) for s in sizes]
    lens = np.asarray([config.text_lengths[i % len(config.text_lengths)] for i in range(B)])
    T = int(lens.max())
    ids = rng.randint(2, t5_cfg.vocab_size, (B, T)).astype(np.int32)
    ids[np.arange(B), lens - 1] = 1
    token_mask = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    return {"images": rng.uniform(-1.0, 1.0, (B, size, size, 3)).astype(np.float32),
            "summed_codes": np.asarray(bitwise.decode_bits(bits), np.float32),
            "token_ids": ids * token_mask, "token_mask": token_mask}


def params_from_torch(module, rules: list[strict.KeyRule], buffers: list[strict.BufferRule], fill, what: str):
    """Our parameters from a torch module's state_dict through a converter's key table: every key must map
    (or be a buffer whose check passes), every shape must match; `fill(flat)` builds the state."""
    tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    plan = strict.plan({k: v.shape for k, v in tensors.items()}, rules, buffers)
    strict.check(plan, f"upstream {what} state_dict", "the benchmark's sizes")
    for rule in buffers:
        problem = rule.check(tensors[rule.key]) if rule.check and rule.key in tensors else None
        if problem:
            raise strict.ConversionError(f"upstream {what} state_dict: {rule.key}: {problem}")
    return fill({r.path: r.transform(tensors[r.key]) for r in rules})


def codec_params(config, upstream_models: dict | None = None) -> dict:
    """{"vae": ..., "t5": ...} parameters of ours: upstream's torch weights converted (the same function on
    both sides) for the models `upstream_models` holds, our own random init for the others."""
    vae_cfg, t5_cfg = codec_configs(config)
    upstream_models = upstream_models or {}
    vae = (params_from_torch(upstream_models["vae"], *vae_rules(vae_cfg),
                             lambda flat: bsq_vae.vae_state_from_flat(vae_cfg, flat), "tokenizer")
           if "vae" in upstream_models else bsq_vae.init_vae_params(vae_cfg, config.seed))
    if "t5" not in upstream_models:
        return {"vae": vae, "t5": t5.init_params(t5_cfg, config.seed)}
    shared = upstream_models["t5"].state_dict()["shared.weight"].numpy()

    def tied(x):  # the encoder's embed_tokens is the shared table
        return None if np.array_equal(x, shared) else f"{EMBED_TOKENS} differs from shared.weight (not a tied copy)"

    t5_params = params_from_torch(upstream_models["t5"], *t5_rules(t5_cfg, tied),
                                  lambda flat: t5.state_from_flat(t5_cfg, flat), "T5 encoder")
    return {"vae": vae, "t5": t5_params}


# ---- ours ---------------------------------------------------------------------------------------------

def our_paths(config, cfg, schedule, inputs, names=TRANSFORMER_PATHS + CODEC_PATHS, codecs=None) -> dict:
    """name -> a callable that runs the path once and blocks until done (codec paths return their output).

    Only the groups `names` asks for are built; `codecs`: the codec parameters (`codec_params`; default:
    our random init). `cfg.compute_dtype` is the compute dtype of the codecs too."""
    paths = {}
    if set(names) & set(TRANSFORMER_PATHS):
        paths.update(_our_transformer_paths(config, cfg, schedule, inputs))
    if set(names) & set(CODEC_PATHS):
        paths.update(_our_codec_paths(config, cfg.compute_dtype, inputs, codecs or codec_params(config)))
    return paths


def _our_codec_paths(config, compute_dtype: str, inputs, params) -> dict:
    vae_cfg, t5_cfg = codec_configs(config, compute_dtype)
    images, codes = jnp.asarray(inputs["images"]), jnp.asarray(inputs["summed_codes"])
    ids, mask = jnp.asarray(inputs["token_ids"]), jnp.asarray(inputs["token_mask"])
    return {"vae_encode": lambda: jax.block_until_ready(bsq_vae.encode_jit(params["vae"], images, cfg=vae_cfg)),
            "vae_decode": lambda: jax.block_until_ready(bsq_vae.decode_jit(params["vae"], codes, cfg=vae_cfg)),
            "t5_encode": lambda: jax.block_until_ready(t5.encode(params["t5"], ids, mask, t5_cfg))}


def _our_transformer_paths(config, cfg, schedule, inputs) -> dict:
    params = jax.jit(lambda: apply.init_params(cfg, config.seed))()
    text, mask, x, bits = (jnp.asarray(inputs[k]) for k in ("text", "mask", "x", "bits"))
    paths = {}
    forward = jax.jit(lambda p, *a: apply.forward(p, *a, schedule, cfg=cfg))
    paths["forward"] = lambda: jax.block_until_ready(forward(params, text, mask, x))
    for name, c in (("grad", cfg.replace(remat=False)), ("grad_remat", cfg.replace(remat=True))):
        grad = jax.jit(jax.value_and_grad(
            lambda p, *a, c=c: bit_loss.loss_fn(p, *a, schedule, cfg=c, reweight_by_scale=True)))
        paths[name] = lambda grad=grad: jax.block_until_ready(grad(params, text, mask, x, bits))

    batch = {"target_text": jnp.asarray(inputs["target_text"]), "target_mask": mask, "anchor_text": text,
             "anchor_mask": mask, "x_BLC_wo_prefix": x, "gt_bits": bits,
             "teacher_logits": jnp.asarray(inputs["teacher_logits"])}
    state = {"params": params, "opt": svare.init_opt_state(params)}

    def svare_iteration():
        state["params"], state["opt"], metrics = svare.alternating_iteration(
            state["params"], state["opt"], batch, cfg=cfg, schedule=schedule)
        jax.block_until_ready(metrics)
    paths["svare"] = svare_iteration

    sampling = SamplingConfig(guidance=(config.guidance,), tau=(config.tau,), top_p=0.97)
    keys = jax.random.split(jax.random.key(config.seed), config.batch)
    paths["sample"] = lambda: jax.block_until_ready(
        generate_jit(params, text, mask, schedule, cfg=cfg, sampling=sampling, rng=keys).summed_codes)
    return paths


# ---- upstream -----------------------------------------------------------------------------------------

def _shims(path: str):
    """`upstream_shims`, with upstream's checkout at `path` importable."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import upstream_shims

    upstream_shims.install(path)
    return upstream_shims


def upstream_codec_models(config, path: str) -> dict:
    """Upstream's tokenizer and HF's T5 encoder (torch, random init seeded by config.seed) at our sizes."""
    shims = _shims(path)
    vae_cfg, t5_cfg = codec_configs(config)
    return {"vae": shims.build_bsq_vae(vae_cfg, config.seed), "t5": shims.build_t5_encoder(t5_cfg, config.seed)}


def upstream_paths(config, cfg, schedule, inputs, path: str, names=TRANSFORMER_PATHS + CODEC_PATHS,
                   codecs: dict | None = None) -> dict:
    """The same paths on upstream's torch modules (imported from the checkout at `path`); `codecs`: the
    models of `upstream_codec_models` (built here when not given)."""
    _shims(path)
    import torch

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    paths = {"_torch": f"{torch.__version__}, {torch.get_num_threads()} threads"}
    if set(names) & set(TRANSFORMER_PATHS):
        paths.update(_upstream_transformer_paths(config, cfg, schedule, inputs))
    if set(names) & set(CODEC_PATHS):
        paths.update(_upstream_codec_paths(inputs, codecs or upstream_codec_models(config, path)))
    return paths


def _upstream_codec_paths(inputs, models) -> dict:
    import torch

    images = torch.from_numpy(np.ascontiguousarray(inputs["images"].transpose(0, 3, 1, 2)))
    codes = torch.from_numpy(np.ascontiguousarray(inputs["summed_codes"].transpose(0, 3, 1, 2)))
    ids, mask = (torch.from_numpy(inputs[k].astype(np.int64)) for k in ("token_ids", "token_mask"))

    def vae_encode():
        with torch.no_grad():
            return models["vae"].encode_for_raw_features(images, None)[0]

    def vae_decode():
        with torch.no_grad():
            return models["vae"].decode(codes)

    def t5_encode():
        with torch.no_grad():
            return models["t5"](input_ids=ids, attention_mask=mask).last_hidden_state

    return {"vae_encode": vae_encode, "vae_decode": vae_decode, "t5_encode": t5_encode}


def check_codec_outputs(config, ours: dict, upstream: dict, inputs, names) -> dict:
    """Max abs error of our codec outputs against upstream's (same weights and inputs), per path, with the
    largest |upstream value| for scale; raises when one exceeds its tolerance (a timing of two different
    functions would mean nothing). T5 rows past each prompt's length are not compared (nobody uses them)."""
    report = {}
    for name in (n for n in CODEC_PATHS if n in names):
        ref = upstream[name]().numpy()
        out = np.asarray(ours[name]())
        if name.startswith("vae"):
            ref = ref.transpose(0, 2, 3, 1)  # channels first -> ours
        valid = inputs["token_mask"].astype(bool) if name == "t5_encode" else np.ones(out.shape[:1], bool)
        if out.shape != ref.shape:
            raise AssertionError(f"{name}: ours has shape {out.shape}, upstream {ref.shape}")
        err = float(np.abs(out[valid].astype(np.float64) - ref[valid]).max())
        tolerance = config.t5_tolerance if name == "t5_encode" else config.vae_tolerance
        report[name] = {"max_abs_err": err, "max_abs_upstream": float(np.abs(ref[valid]).max()),
                        "tolerance": tolerance}
        if not err <= tolerance:
            raise AssertionError(f"{name}: ours differs from upstream by {err:.3g} (max abs) > {tolerance:g} with "
                                 f"the same weights and inputs: the timings would compare different functions")
    return report


def _upstream_transformer_paths(config, cfg, schedule, inputs) -> dict:
    import torch
    import torch.nn.functional as F
    import upstream_shims

    torch.manual_seed(config.seed)
    d = cfg.bits_per_token

    def build(inference: bool):
        return upstream_shims.build_infinity(cfg, inference)[0]

    lens = inputs["lens"]

    def compact(text):
        kv = torch.from_numpy(np.concatenate([t[:n] for t, n in zip(text, lens, strict=True)]))
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
        return kv, lens.tolist(), cu, int(lens.max())

    anchor, target = compact(inputs["text"]), compact(inputs["target_text"])
    x = torch.from_numpy(inputs["x"])
    bits = torch.from_numpy(inputs["bits"]).long()
    teacher = torch.from_numpy(inputs["teacher_logits"])
    weights = torch.from_numpy(bit_loss.token_weights(schedules.as_schedule(schedule), True).copy())
    sched = [tuple(s) for s in schedule]
    model = build(False).train()
    B, L = x.shape[0], bits.shape[1]

    def bit_ce(logits):  # [B, L, d] cross entropy of the two-class bit logits
        return F.cross_entropy(logits.reshape(B, L, d, 2).permute(0, 3, 1, 2), bits, reduction="none")

    def train_loss(logits):
        return (bit_ce(logits).mean(-1) * weights).sum(-1).mean()

    def forward():
        with torch.no_grad():
            model(anchor, x, sched)

    def grad(checkpointing):
        def run():
            model.checkpointing = checkpointing
            model.zero_grad(set_to_none=True)
            train_loss(model(anchor, x, sched)).backward()
        return run

    trainable = [p for n, p in model.named_parameters() if ".ca." in n or ".ffn." in n]
    opt = torch.optim.AdamW(trainable, lr=2.34375e-5, betas=(0.9, 0.97), eps=1e-8, weight_decay=0.005)

    def svare_iteration():
        model.checkpointing = None
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        # erase pass: filtered cross entropy (tokens with >= 25% wrong bits) under the concept prompt
        logits = model(target, x, sched)
        ce = bit_ce(logits)
        pairs = logits.detach().reshape(B, L, d, 2)
        wrong = ((pairs[..., 1] > pairs[..., 0]).long() != bits).float()
        keep = (wrong.mean(-1) >= 0.25).float()
        loss = (ce.mean(-1) * keep).sum(-1).div(L).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        opt.step()
        # preserve pass: KL(teacher || student) per bit under the anchor prompt, on the updated weights
        logits = model(anchor, x, sched)
        p_t = teacher.reshape(B, L, d, 2).softmax(-1)
        log_q = logits.reshape(B, L, d, 2).log_softmax(-1)
        kl = (torch.special.xlogy(p_t, p_t) - p_t * log_q).reshape(B, L, -1).mean(-1).sum(-1).div(L).mean()
        opt.zero_grad(set_to_none=True)
        (0.5 * kl).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        opt.step()

    sampler, tokenizer = build(True).eval(), upstream_shims.bits_tokenizer(d)
    n = len(sched)

    def sample():
        with torch.no_grad():
            sampler.autoregressive_infer_cfg(vae=tokenizer(), scale_schedule=sched, label_B_or_BLT=anchor, B=B,
                                             cfg_list=[config.guidance] * n, tau_list=[config.tau] * n, top_k=900,
                                             top_p=0.97, g_seed=config.seed, returns_vemb=1, cfg_insertion_layer=[0],
                                             vae_type=1, ret_img=False, inference_mode=True)

    return {"forward": forward, "grad": grad(None), "grad_remat": grad("full-block"), "svare": svare_iteration,
            "sample": sample}


# ---- the run ------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def model_config(config):
    """The transformer's InfinityConfig of `config`: fp32, highest precision, no dropout, no remat."""
    base = get_preset(config.model_preset)
    return base.replace(codebook_dim=config.codebook_dim, compute_dtype="float32", matmul_precision="highest",
                        attention_impl=config.attention_impl, remat=False, drop_path_rate=0.0, cond_drop_rate=0.0,
                        text_maxlen=max(base.text_maxlen, max(config.text_lengths)))


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark of `--config` (argv: the command line after the program name); returns the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vs_upstream.py")
    _, config = parse_config_args(parser, argv)
    cfg = model_config(config)
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    inputs = make_inputs(config, cfg, schedule)
    names = [p.strip() for p in config.paths.split(",") if p.strip()]
    unknown = sorted(set(names) - set(TRANSFORMER_PATHS + CODEC_PATHS))
    if unknown or not names:
        parser.error(f"--config.paths: unknown {unknown} (known: {','.join(TRANSFORMER_PATHS + CODEC_PATHS)})")
    upstream_dir = os.environ.get("VAREJAX_UPSTREAM_INFINITY")
    upstream_codecs = (upstream_codec_models(config, upstream_dir)
                       if upstream_dir and set(names) & set(CODEC_PATHS) else None)
    codecs = codec_params(config, upstream_codecs) if set(names) & set(CODEC_PATHS) else None
    sides = {"ours_fp32": our_paths(config, cfg, schedule, inputs, names, codecs)}
    if config.bf16:
        sides["ours_bf16"] = our_paths(config, cfg.replace(compute_dtype="bfloat16", matmul_precision="default"),
                                       schedule, inputs, names, codecs)
    torch_info, output_check = None, None
    if upstream_dir:
        sides["upstream_fp32"] = upstream_paths(config, cfg, schedule, inputs, upstream_dir, names, upstream_codecs)
        torch_info = sides["upstream_fp32"].pop("_torch")
        if config.check_outputs and upstream_codecs:
            output_check = check_codec_outputs(config, sides["ours_fp32"], sides["upstream_fp32"], inputs, names)
    times = {side: {name: [] for name in names} for side in sides}
    for _ in range(config.runs):
        for name in names:
            for side, paths in sides.items():
                times[side][name].append(_median_ms(paths[name], config.steps))
    args = sys.argv[1:] if argv is None else list(argv)
    result = {"command": " ".join(["python", os.path.relpath(os.path.join(HERE, "vs_upstream.py"))] + args),
              "upstream_checkout": "$VAREJAX_UPSTREAM_INFINITY" if upstream_dir else None,
              "size": config.size, "preset": config.model_preset, "L": schedules.sequence_length(schedule),
              "scales": len(schedule), "batch": config.batch, "text_lengths": list(config.text_lengths),
              "d": cfg.bits_per_token, "attention_impl": config.attention_impl, "runs": config.runs,
              "steps_per_run": config.steps, "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                                         "jax": jax.__version__, "torch": torch_info},
              "ms": {side: {name: _summary(v) for name, v in per.items()} for side, per in times.items()}}
    if set(names) & set(CODEC_PATHS):
        vae_cfg, t5_cfg = codec_configs(config)
        result["codecs"] = {"vae": {**vae_cfg.arch_dict(), "ch_mult": list(vae_cfg.ch_mult),
                                    "image_size": config.vae.image_size},
                            "t5": t5_cfg.arch_dict(), "token_length": int(inputs["token_ids"].shape[1])}
    if output_check is not None:
        result["output_check_fp32"] = output_check
    if "upstream_fp32" in times:
        result["upstream_over_ours"] = {
            side: {name: _summary([u / o for u, o in zip(times["upstream_fp32"][name], times[side][name],
                                                            strict=True)]) for name in names}
            for side in sides if side != "upstream_fp32"}
    text = json.dumps(result)
    print(text)
    if config.out:
        with open(config.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
