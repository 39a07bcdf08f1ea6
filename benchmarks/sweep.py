"""Throughput of K erasure runs trained as one stack vs the same K runs one after another.

    python benchmarks/sweep.py
    python benchmarks/sweep.py --runs 8 --steps 10 --repeats 5
    python benchmarks/sweep.py --runs 8 --config.train.batch_size=2 --out /tmp/sweep_b2.json

(the first: the toy world, K = 1, 2, 4, 8; `--config.x=y` sets any field of the toy erase config).

The toy world's model and its real VARE trajectories (the main job's "circle" pairs, sampled once into
`--workdir/trajectories`), the toy erase config's training settings (batch 8, condition dropout, float32).
Run r has seed r (its own batches and keys) and its own learning rate, as in a sweep. For each K, after
compiling both programs, every repeat times

  sequential  K runs one after another, `--steps` steps each, with the trainer's step
              (`jit_step(update, donate=True)`, one compiled program for all runs);
  stacked     the K runs in one stack, `--steps` stacked steps (`varejax.sweep.stack.stacked_step`,
              donated), batches stacked with `stack_batches`;

both including the host work of a step except reading the trajectories (every step's batches are
loaded before the clock starts: the loader costs both sides the same, see `loader_ms_per_batch`), so
with stacking, the PRNG keys and the optimiser's initial state, and ending when the parameters are
ready. Throughput is training steps of single runs per second (K * steps / time); the speedup is the
sequential time / the stacked time of the same repeat (the two alternate in order). Writes `--out` (JSON:
one row per K with the median and min / max over repeats, the load average before and after, the
command) and prints one line per K.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def setup(config, workdir: Path, pairs: int):
    """(train cfg, params, schedule, trajectory files) of the toy world's main job."""
    from varejax.erase.data import text_length
    from varejax.erase.prepare import prepare_trajectories
    from varejax.erase.trainer import trajectory_config
    from varejax.toy.assets import TOY_SCHEDULE, load_toy_pipeline
    from varejax.toy.job import erasure_pairs

    pipeline = load_toy_pipeline(text_cache_dir=str(workdir / "text_cache"), **dict(config.numerics))
    concept = config.toy.concepts[0]
    chosen = erasure_pairs(config)[concept][:pairs]
    files = prepare_trajectories(chosen, params=pipeline.infinity_params, cfg=pipeline.infinity_cfg,
                                 encode_text=pipeline.text_encoder.encode, schedule=TOY_SCHEDULE,
                                 tcfg=trajectory_config(config), out_dir=workdir / "trajectories", progress=False)
    t = config.train
    cfg = pipeline.infinity_cfg.replace(cond_drop_rate=float(t.cond_drop_rate), drop_path_rate=float(t.drop_path_rate),
                                        remat=bool(t.remat))
    return cfg, pipeline.infinity_params, TOY_SCHEDULE, files, text_length(files)


def measure(config, cfg, params, schedule, files, text_len, runs: int, steps: int, repeats: int, mode: str) -> dict:
    """Sequential and stacked throughput of `runs` runs (steps of single runs per second), `repeats` times."""
    import jax

    from varejax.erase.data import TrajectoryBatches
    from varejax.erase.step import init_opt_state, jit_step
    from varejax.erase.trainer import UPDATES, svare_config
    from varejax.sweep import stack as sk

    base = svare_config(config)
    scfgs = [base.replace(optim=base.optim.replace(learning_rate=base.optim.learning_rate * (1 + 0.5 * r)))
             for r in range(runs)]
    batch_size = int(config.train.batch_size)
    loaders = [TrajectoryBatches(files, batch_size, r, text_len) for r in range(runs)]
    # Loaded before timing: a TrajectoryBatches lookup costs ~2 ms per row on this CPU (grain's index
    # shuffle), the same for both sides; `loader_ms_per_batch` records it.
    start = time.perf_counter()
    batches = [[loader[k] for k in range(steps * (repeats + 1))] for loader in loaders]
    loader_ms = (time.perf_counter() - start) / (runs * steps * (repeats + 1)) * 1e3
    keys = [jax.random.key(r) for r in range(runs)]
    alone_step = jit_step(UPDATES[mode], donate=True)
    stacked = sk.stacked_step(UPDATES[mode], donate=True)
    numerics = sk.stack_numerics(scfgs)
    kw = dict(cfg=cfg, schedule=schedule)

    def sequential(first_step: int) -> float:
        start = time.perf_counter()
        for r, scfg in enumerate(scfgs):
            p, o = jax.tree.map(lambda x: x.copy(), params), init_opt_state(params, scfg)
            for k in range(first_step, first_step + steps):
                p, o, _ = alone_step(p, o, batches[r][k], jax.random.fold_in(keys[r], k), scfg=scfg, **kw)
            jax.block_until_ready(p)
        return time.perf_counter() - start

    def together(first_step: int) -> float:
        start = time.perf_counter()
        train, opt = sk.init_stack(params, scfgs)
        for k in range(first_step, first_step + steps):
            batch = sk.stack_batches([b[k] for b in batches])
            rngs = jax.numpy.stack([jax.random.fold_in(key, k) for key in keys])
            train, opt, _ = stacked(params, train, opt, batch, rngs, numerics, scfg=scfgs[0], **kw)
        jax.block_until_ready(train)
        return time.perf_counter() - start

    compile_start = time.perf_counter()
    p, o, _ = alone_step(jax.tree.map(lambda x: x.copy(), params), init_opt_state(params, scfgs[0]),
                         batches[0][0], keys[0], scfg=scfgs[0], **kw)
    jax.block_until_ready(p)
    together(0)  # compiles the stack of K runs
    compile_s = time.perf_counter() - compile_start
    seq, stk, ratio = [], [], []
    for i in range(repeats):
        first = steps * (i + 1)
        if i % 2:  # alternate the order: a change of machine load hits both sides alike
            t, s = together(first), sequential(first)
        else:
            s, t = sequential(first), together(first)
        seq.append(runs * steps / s)
        stk.append(runs * steps / t)
        ratio.append(s / t)
    return {"runs": runs, "steps_per_run": steps, "sequential_steps_per_s": _summary(seq),
            "stacked_steps_per_s": _summary(stk), "speedup": _summary(ratio), "first_calls_s": round(compile_s, 1),
            "loader_ms_per_batch": round(loader_ms, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_circle.py", help="a toy erase config (relative: to the repo)")
    parser.add_argument("--workdir", default="/tmp/varejax_sweep_benchmark", help="trajectories are kept here")
    parser.add_argument("--runs", default="1,2,4,8", help="comma-separated K")
    parser.add_argument("--steps", type=int, default=5, help="steps of each run per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=16, help="trajectories to sample and train on")
    parser.add_argument("--mode", default="alternating", choices=("alternating", "summed", "erase_only"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sweep.json"))
    from varejax.configlib import load_config, parse_args

    args, overrides = parse_args(parser, argv)

    import jax

    spec = args.config if os.path.exists(args.config.partition(":")[0]) else str(REPO / args.config)
    config = load_config(spec, overrides)
    workdir = Path(args.workdir)
    load_before = _load()
    start = time.time()
    cfg, params, schedule, files, text_len = setup(config, workdir, args.pairs)
    rows = []
    for runs in sorted({int(k) for k in args.runs.split(",")}):
        row = measure(config, cfg, params, schedule, files, text_len, runs, args.steps, args.repeats, args.mode)
        rows.append(row)
        print(f"K={runs}: sequential {row['sequential_steps_per_s']['median']:.2f} steps/s, stacked "
              f"{row['stacked_steps_per_s']['median']:.2f} steps/s, speedup {row['speedup']['median']:.2f}x "
              f"[{row['speedup']['min']:.2f}, {row['speedup']['max']:.2f}]", flush=True)
    result = {
        "what": "steps of single runs per second: K runs stacked (vmapped, one program) vs one after another",
        "model": "toy world (varejax/toy/assets/infinity)", "mode": args.mode,
        "batch_size": int(config.train.batch_size), "text_length": text_len,
        "sequence_length": sum(h * w for _, h, w in schedule), "steps_per_repeat": args.steps,
        "repeats": args.repeats, "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
        "load_average_before": load_before, "load_average_after": _load(),
        "wall_time_s": round(time.time() - start, 1), "rows": rows,
        "command": shlex.join(["python", *[os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a
                                           for a in sys.argv]]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
