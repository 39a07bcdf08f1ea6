"""Every transformer hot path, ours against upstream PyTorch Infinity, in one process on one machine.

    VAREJAX_UPSTREAM_INFINITY=/path/to/Infinity python benchmarks/vs_upstream.py --config configs/vs_upstream.py
    python benchmarks/vs_upstream.py --config configs/vs_upstream.py:tiny --config.out=/tmp/v.json

Paths (config.paths): `forward` (teacher-forced logits), `grad` (forward + backward of the bit loss),
`grad_remat` (the same with per-block remat; upstream: checkpointing='full-block'), `svare` (one official
S-VARE iteration: erase pass + preserve pass, each forward + backward + clip + AdamW on CA + FFN, the
teacher's logits precomputed as in training), `sample` (CFG sampling of every scale with the KV cache).
Both sides get the same sizes and random weights of the same shapes (speed does not depend on values).
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
from varejax.erase import step as svare
from varejax.models import apply, bit_loss, schedules
from varejax.models.config import get_preset
from varejax.sample.sampler import SamplingConfig, generate_jit

HERE = os.path.dirname(os.path.abspath(__file__))


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
            "teacher_logits": rng.randn(B, L, 2 * d).astype(np.float32)}


# ---- ours ---------------------------------------------------------------------------------------------

def our_paths(config, cfg, schedule, inputs) -> dict:
    """name -> a callable that runs the path once and blocks until done."""
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

def upstream_paths(config, cfg, schedule, inputs, path: str) -> dict:
    """The same paths on upstream's torch modules (imported from the checkout at `path`)."""
    sys.path.insert(0, HERE)
    import upstream_shims

    upstream_shims.install(path)
    import torch
    import torch.nn.functional as F

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
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
            "sample": sample, "_torch": f"{torch.__version__}, {torch.get_num_threads()} threads"}


# ---- the run ------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vs_upstream.py")
    _, config = parse_config_args(parser)
    base = get_preset(config.model_preset)
    cfg = base.replace(codebook_dim=config.codebook_dim, compute_dtype="float32", matmul_precision="highest",
                       attention_impl=config.attention_impl, remat=False, drop_path_rate=0.0, cond_drop_rate=0.0,
                       text_maxlen=max(base.text_maxlen, max(config.text_lengths)))
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    inputs = make_inputs(config, cfg, schedule)
    names = [p.strip() for p in config.paths.split(",") if p.strip()]
    sides = {"ours_fp32": our_paths(config, cfg, schedule, inputs)}
    if config.bf16:
        sides["ours_bf16"] = our_paths(config, cfg.replace(compute_dtype="bfloat16", matmul_precision="default"),
                                       schedule, inputs)
    upstream_dir = os.environ.get("VAREJAX_UPSTREAM_INFINITY")
    torch_info = None
    if upstream_dir:
        sides["upstream_fp32"] = upstream_paths(config, cfg, schedule, inputs, upstream_dir)
        torch_info = sides["upstream_fp32"].pop("_torch")
    times = {side: {name: [] for name in names} for side in sides}
    for _ in range(config.runs):
        for name in names:
            for side, paths in sides.items():
                times[side][name].append(_median_ms(paths[name], config.steps))
    result = {"command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:]),
              "upstream_checkout": "$VAREJAX_UPSTREAM_INFINITY" if upstream_dir else None,
              "size": config.size, "preset": config.model_preset, "L": schedules.sequence_length(schedule),
              "scales": len(schedule), "batch": config.batch, "text_lengths": list(config.text_lengths),
              "d": cfg.bits_per_token, "attention_impl": config.attention_impl, "runs": config.runs,
              "steps_per_run": config.steps, "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                                         "jax": jax.__version__, "torch": torch_info},
              "ms": {side: {name: _summary(v) for name, v in per.items()} for side, per in times.items()}}
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


if __name__ == "__main__":
    main()
