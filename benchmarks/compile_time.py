"""Compile time of the training gradient against depth: blocks unrolled vs `scan_blocks` (one `lax.scan`).

    python benchmarks/compile_time.py --config configs/compile_time.py --config.out=benchmarks/results/compile_time.json
    python benchmarks/compile_time.py --config configs/compile_time.py:tiny

For each depth, lowers and compiles `value_and_grad` of the bit loss (with `config.remat`) for both layouts
of the blocks, `config.runs` times each with the persistent compilation cache off, and reports the
minimum seconds of trace + lower and of XLA compile, and the ratio unrolled / scanned. Prints one JSON
object (and writes it to config.out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from varejax.configlib import parse_config_args
from varejax.models import apply, bit_loss, schedules
from varejax.models.config import get_preset


def compile_seconds(cfg, schedule, batch: int, text_length: int) -> dict[str, float]:
    """Seconds to trace + lower and to compile the gradient of the bit loss of `cfg` (abstract inputs)."""
    L, d = schedules.sequence_length(schedule), cfg.bits_per_token
    params = jax.eval_shape(lambda: apply.init_params(cfg, 0))
    args = (jax.ShapeDtypeStruct((batch, text_length, cfg.text_channels), np.float32),
            jax.ShapeDtypeStruct((batch, text_length), np.int32),
            jax.ShapeDtypeStruct((batch, L - 1, d), np.float32),
            jax.ShapeDtypeStruct((batch, L, d), np.int32))
    grad = jax.jit(jax.value_and_grad(
        lambda p, *a: bit_loss.loss_fn(p, *a, schedule, cfg=cfg, reweight_by_scale=True)))
    start = time.perf_counter()
    lowered = grad.lower(params, *args)
    traced = time.perf_counter()
    lowered.compile()
    return {"lower_s": traced - start, "compile_s": time.perf_counter() - traced}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/compile_time.py")
    _, config = parse_config_args(parser, argv)
    jax.config.update("jax_enable_compilation_cache", False)  # measure the compiler, not the cache
    base = get_preset(config.model_preset)
    schedule = schedules.get_schedule(1.0, config.pn)
    rows = []
    for depth in config.depths:
        row = {"depth": depth}
        for name, scan in (("unrolled", False), ("scanned", True)):
            cfg = base.replace(depth=depth, block_chunks=1, remat=bool(config.remat), scan_blocks=scan,
                               text_maxlen=max(base.text_maxlen, config.text_length))
            runs = [compile_seconds(cfg, schedule, config.batch, config.text_length) for _ in range(config.runs)]
            row[name] = {key: round(min(r[key] for r in runs), 2) for key in runs[0]}
        row["unrolled_over_scanned"] = round(
            sum(row["unrolled"].values()) / max(sum(row["scanned"].values()), 1e-9), 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    args = sys.argv[1:] if argv is None else list(argv)
    result = {"command": " ".join(["python", "benchmarks/compile_time.py"] + args),
              "preset": config.model_preset, "pn": config.pn, "L": schedules.sequence_length(schedule),
              "batch": config.batch, "remat": bool(config.remat), "runs": config.runs, "depths": rows,
              "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version()}}
    print(json.dumps(result))
    if config.out:
        with open(config.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
