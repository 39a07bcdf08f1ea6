"""Images/s and latency of sampling, against upstream PyTorch Infinity when a checkout is available.

    python benchmarks/sample.py --config configs/sample_benchmark.py:tiny
    VAREJAX_UPSTREAM_INFINITY=/path/to/Infinity python benchmarks/sample.py --config configs/sample_benchmark.py:small

Measures, for one (schedule, batch) and CFG on logits: our jitted whole-schedule sampler (one compile,
then the median of `repeats` runs), the tokenizer decode, and, if $VAREJAX_UPSTREAM_INFINITY points at
an upstream checkout, upstream's `autoregressive_infer_cfg` on the same sizes (same device class: CPU
here), printing the latency ratio upstream / ours. Weights are random for both (speed does not depend
on them). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from varejax.configlib import parse_config_args
from varejax.models import apply, bsq_vae, schedules
from varejax.models.config import get_preset
from varejax.sample.sampler import SamplingConfig, generate_jit


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(config, cfg, schedule, text, mask):
    params = jax.jit(lambda: apply.init_params(cfg, config.seed))()
    sampling = SamplingConfig(guidance=(config.guidance,), tau=(config.tau,), top_p=0.97)
    keys = jax.random.split(jax.random.key(config.seed), config.batch)
    run = lambda: jax.block_until_ready(generate_jit(params, text, mask, schedule, cfg=cfg, sampling=sampling,
                                                     rng=keys))
    start = time.perf_counter()
    out = run()
    compile_s = time.perf_counter() - start
    latency = _median_time(run, config.repeats)
    vae_cfg = bsq_vae.get_vae_preset(config.vae_preset).replace(codebook_dim=cfg.codebook_dim)
    vae_params = jax.jit(lambda: bsq_vae.init_vae_params(vae_cfg, config.seed))()
    decode = lambda: jax.block_until_ready(bsq_vae.decode_jit(vae_params, out.summed_codes, vae_cfg))
    decode()
    decode_s = _median_time(decode, config.repeats)
    return {"compile_s": round(compile_s, 2), "sampler_latency_s": round(latency, 4),
            "decode_latency_s": round(decode_s, 4), "images_per_s": round(config.batch / (latency + decode_s), 3)}


def upstream(config, cfg, schedule, text, mask, path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import upstream_shims

    upstream_shims.install(path)
    import torch

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    model, Tokenizer = upstream_shims.build_infinity(cfg, inference=True)
    model = model.eval()
    lens = mask.sum(1).astype(int)
    kv = torch.from_numpy(np.concatenate([t[:n] for t, n in zip(text, lens, strict=True)]))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    cond = (kv, lens.tolist(), cu, int(lens.max()))
    n = len(schedule)

    def run():
        with torch.no_grad():
            model.autoregressive_infer_cfg(vae=Tokenizer(), scale_schedule=list(schedule), label_B_or_BLT=cond,
                                           B=config.batch, cfg_list=[config.guidance] * n, tau_list=[config.tau] * n,
                                           top_k=900, top_p=0.97, g_seed=config.seed, returns_vemb=1,
                                           cfg_insertion_layer=[0], vae_type=1, ret_img=False, inference_mode=True)

    run()
    latency = _median_time(run, config.repeats)
    return {"sampler_latency_s": round(latency, 4), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sample_benchmark.py:tiny")
    _, config = parse_config_args(parser)
    cfg = get_preset(config.model_preset).replace(compute_dtype=config.compute_dtype,
                                                  block_chunks=get_preset(config.model_preset).block_chunks)
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    rng = np.random.RandomState(config.seed)
    text_len = min(config.text_len, cfg.text_maxlen)
    lens = rng.randint(text_len // 2, text_len + 1, size=config.batch)
    mask = (np.arange(text_len)[None] < lens[:, None]).astype(np.int32)
    text = (rng.randn(config.batch, text_len, cfg.text_channels) * 0.25 * mask[..., None]).astype(np.float32)
    result = {"size": config.size, "device": jax.devices()[0].device_kind, "schedule_scales": len(schedule),
              "L": schedules.sequence_length(schedule), "batch": config.batch, "guidance": config.guidance,
              "ours": ours(config, cfg, schedule, text, mask)}
    path = os.environ.get("VAREJAX_UPSTREAM_INFINITY")
    if path:
        result["upstream"] = upstream(config, cfg, schedule, text, mask, path)
        result["upstream_over_ours_sampler_latency"] = round(
            result["upstream"]["sampler_latency_s"] / result["ours"]["sampler_latency_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
