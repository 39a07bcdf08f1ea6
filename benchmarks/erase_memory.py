"""Memory estimate per device of one S-VARE iteration, from an AOT compile on CPU without weights.

    python benchmarks/erase_memory.py --config configs/erase_memory.py:2b

Builds abstract parameters, optimiser state and batch (jax.ShapeDtypeStruct: nothing is allocated),
lowers and compiles the jitted official iteration (erase step + preserve step, donated state) for the
configured mesh, and prints XLA's memory analysis per device as JSON. With
`--config.baseline_remat_toggled=True` the same step is also compiled with remat flipped and the ratio
is printed (a baseline measured in the same run). Fake a mesh of N CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the script sets it from config.mesh.shape).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def _configure_devices(mesh_shape: tuple[int, ...]) -> None:
    """A fake CPU device per mesh slot. Runs before any device is touched: XLA reads its flags when
    the backend starts, not when JAX is imported."""
    import jax

    count = math.prod(s for s in mesh_shape if s > 0)
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def estimate(config, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from varejax.configlib import rules_tuple
    from varejax.erase import optim
    from varejax.erase.step import SvareConfig, alternating_update, summed_update
    from varejax.models import apply, schedules
    from varejax.models.config import get_preset
    from varejax.parallel import abstract_sharded_state, batch_sharding, make_mesh, sharding_context

    cfg = get_preset(config.model_preset).replace(**{**dict(config.numerics), "remat": remat})
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    L, B, T = schedules.sequence_length(schedule), config.batch, min(config.text_len, cfg.text_maxlen)
    mesh = make_mesh(tuple(config.mesh.shape))
    rules = rules_tuple(config.mesh.rules)
    scfg = SvareConfig(optim=optim.OptimConfig(trainable=config.trainable))
    abstract = apply.abstract_params(cfg)
    params = abstract_sharded_state(abstract, mesh, rules)
    opt_state = jax.eval_shape(lambda p: optim.init_opt_state(p, scfg.optim), params)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, shape=shape))

    d, V, C = cfg.bits_per_token, cfg.num_logits, cfg.text_channels
    batch = {"target_text": spec((B, T, C), jnp.float32), "target_mask": spec((B, T), jnp.int32),
             "anchor_text": spec((B, T, C), jnp.float32), "anchor_mask": spec((B, T), jnp.int32),
             "x_BLC_wo_prefix": spec((B, L - 1, d), jnp.float32), "gt_bits": spec((B, L, d), jnp.int8),
             "teacher_logits": spec((B, L, V), jnp.float32)}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    update = {"alternating": alternating_update, "summed": summed_update}[config.mode]
    step = jax.jit(update, static_argnames=("cfg", "schedule", "scfg", "diagnostics"), donate_argnums=(0, 1))
    start = time.perf_counter()
    with sharding_context(mesh, rules):
        lowered = step.lower(params, opt_state, batch, rng, cfg=cfg, schedule=schedule, scfg=scfg.static())
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    mem = compiled.memory_analysis()
    gib = 1024 ** 3
    fields = {name: getattr(mem, f"{name}_size_in_bytes", None) for name in
              ("argument", "output", "alias", "temp", "generated_code")}
    peak = (fields["argument"] or 0) + (fields["output"] or 0) - (fields["alias"] or 0) + (fields["temp"] or 0)
    trainable = sum(math.prod(v.shape) for v in optim.trainable_params(abstract, config.trainable).values())
    return {"remat": remat, "devices": mesh.devices.size, "L": L, "batch": B,
            "params": apply.count_params(abstract), "trainable": trainable,
            "per_device_GiB": {k: round(v / gib, 3) for k, v in fields.items() if v is not None},
            "estimated_peak_per_device_GiB": round(peak / gib, 3),
            "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1)}


def main() -> None:
    from varejax.configlib import parse_config_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/erase_memory.py:2b")
    _, config = parse_config_args(parser)
    _configure_devices(tuple(config.mesh.shape))
    result = {"size": config.size, "mode": config.mode, "measured": estimate(config, bool(config.numerics.remat))}
    if config.baseline_remat_toggled:
        base = estimate(config, not config.numerics.remat)
        result["baseline_remat_toggled"] = base
        result["peak_ratio_vs_baseline"] = round(result["measured"]["estimated_peak_per_device_GiB"]
                                                 / base["estimated_peak_per_device_GiB"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
