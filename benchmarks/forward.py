"""Teacher-forced forward + gradient throughput of the Infinity transformer.

    python benchmarks/forward.py --config configs/forward_benchmark.py:tiny
    python benchmarks/forward.py --config configs/forward_benchmark.py:2b --config.batch=2

Times the jitted loss+gradient step (median over `steps` after one compile) for the configured numerics,
and in the same run the baseline variants (remat toggled), and prints tokens/s and ratios as JSON.
Random parameters: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from varejax.configlib import parse_config_args, rules_tuple
from varejax.models import apply, bit_loss, schedules
from varejax.models.config import get_preset
from varejax.parallel import batch_sharding, make_mesh, shard_state, sharding_context


def time_step(cfg, config, schedule):
    mesh = make_mesh(tuple(config.mesh.shape))
    rules = rules_tuple(config.mesh.rules)
    L = schedules.sequence_length(schedule)
    rng = np.random.RandomState(config.seed)
    B, T = config.batch, config.text_len
    batch = (rng.randn(B, T, cfg.text_channels).astype(np.float32), np.ones((B, T), np.int32),
             rng.randn(B, L - 1, cfg.bits_per_token).astype(np.float32),
             rng.randint(0, 2, (B, L, cfg.bits_per_token)).astype(np.int8))
    with sharding_context(mesh, rules):
        params = shard_state(jax.jit(lambda: apply.init_params(cfg, config.seed))(), mesh, rules)
        batch = [jax.device_put(a, batch_sharding(mesh, rules, a.ndim)) for a in batch]
        step = jax.jit(jax.value_and_grad(
            lambda p, *b: bit_loss.loss_fn(p, *b, schedule, cfg=cfg, reweight_by_scale=True)))
        start = time.perf_counter()
        jax.block_until_ready(step(params, *batch))
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(config.steps):
            start = time.perf_counter()
            jax.block_until_ready(step(params, *batch))
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"remat": cfg.remat, "compile_s": round(compile_s, 3), "step_s": round(median, 5),
            "tokens_per_s": round(B * L / median, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/forward_benchmark.py:tiny")
    _, config = parse_config_args(parser)
    cfg = get_preset(config.model_preset).replace(**config.numerics)
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    measured = time_step(cfg, config, schedule)
    baseline = time_step(cfg.replace(remat=not cfg.remat), config, schedule)
    print(json.dumps({"size": config.size, "device": str(jax.devices()[0].platform), "L": schedules.sequence_length(
        schedule), "batch": config.batch, "measured": measured, "baseline_remat_toggled": baseline,
        "step_time_ratio_vs_baseline": round(measured["step_s"] / baseline["step_s"], 3)}))


if __name__ == "__main__":
    main()
