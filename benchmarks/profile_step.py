"""XLA's cost of the compiled forward and gradient: FLOPs, bytes accessed, and the ops that move memory.

    python benchmarks/profile_step.py --config configs/vs_upstream.py
    python benchmarks/profile_step.py --config configs/vs_upstream.py --config.attention_impl=chunked
    python benchmarks/profile_step.py --config configs/vs_upstream.py --timeline \
        --out benchmarks/results/profile_step.json

For the sizes of `configs/vs_upstream.py`, compiles the teacher-forced forward and the gradient of the bit
loss and prints, per program, XLA's cost analysis (GFLOP, GB accessed) and the number of transposes,
copies, gathers and scatters in the optimised HLO (fused computations included), as one JSON line; the
gradient also without the residual-gradient boundaries (`gradient_boundaries_off`). `--out FILE` writes
the same result, with its command, to FILE.
With `--config.attention_impl` both the given implementation and `xla` (the masked, padded path) are
profiled in the same run. Deterministic: no timing.

`--timeline` adds a measured breakdown: the programs run under `jax.profiler` and every executed XLA
thunk's time is summed by kind (`ynn_fusion` = XNNPACK dots with their fused epilogues, `copy_bitcast_fusion`
= layout copies, `dot` = Eigen dots, ...), ms per call over `--calls` calls, for the gradient with the
residual-gradient boundaries (`grad_boundaries`) on and off. This is how the recomputed residual-gradient
chains were found (README, "Against upstream PyTorch"). Timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vs_upstream import make_inputs  # noqa: E402

from varejax.configlib import parse_config_args  # noqa: E402
from varejax.models import apply, bit_loss, schedules  # noqa: E402
from varejax.models.config import get_preset  # noqa: E402

OPS = ("transpose", "copy", "gather", "scatter", "dot")


def profile(cfg, schedule, inputs) -> dict:
    params = jax.eval_shape(lambda: apply.init_params(cfg, 0))
    args = (inputs["text"], inputs["mask"], inputs["x"], inputs["bits"])
    loss = lambda p, *a: bit_loss.loss_fn(p, *a, schedule, cfg=cfg, reweight_by_scale=True)
    loss_unbounded = lambda p, *a: bit_loss.loss_fn(p, *a, schedule, cfg=cfg.replace(grad_boundaries="off"),
                                                    reweight_by_scale=True)
    programs = {"forward": jax.jit(lambda p, *a: apply.forward(p, *a[:3], schedule, cfg=cfg)),
                "gradient": jax.jit(jax.value_and_grad(loss)),
                "gradient_boundaries_off": jax.jit(jax.value_and_grad(loss_unbounded))}
    out = {}
    for name, fn in programs.items():
        compiled = fn.lower(params, *args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        counts = collections.Counter(re.findall(r"= \S+ (" + "|".join(OPS) + r")\(", compiled.as_text()))
        out[name] = {"gflop": round(cost["flops"] / 1e9, 2), "gb_accessed": round(cost["bytes accessed"] / 1e9, 3),
                     **{op: counts.get(op, 0) for op in OPS}}
    return out


def thunk_timeline(fn, args, calls: int = 5, top: int = 12) -> dict:
    """{kind: {"ms": per call, "count": per call, a fraction when not every call ran it}} of the XLA
    thunks `fn(*args)` executes (top kinds by time),
    plus "total_ms": the sum over every thunk kind."""
    jax.block_until_ready(fn(*args))  # compiled and warm
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (trace,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    host = ("$", "Thunk", "Slinky", "Pjit", "Common", "Parse", "Handle", "end:")  # python and runtime frames
    time_us, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "dur" in event and not event["name"].startswith(host):
            kind = re.sub(r"\.\d+$", "", event["name"])
            time_us[kind] += event["dur"]
            count[kind] += 1
    # count per call as a fraction: a thunk that ran once in `calls` calls (a one-off transfer) is not 0
    kinds = {kind: {"ms": round(us / calls / 1e3, 3), "count": round(count[kind] / calls, 2)}
             for kind, us in time_us.most_common(top)}
    return {"total_ms": round(sum(time_us.values()) / calls / 1e3, 3), "kinds": kinds}


def timelines(cfg, schedule, inputs, calls: int, runs: int = 3) -> dict:
    """Measured thunk time by kind: forward, and gradient with grad_boundaries on and off (same run).

    Each program is profiled `runs` times, the programs interleaved (drift on a shared machine hits them
    alike); per program the run with the median total is kept, with every run's total in "total_ms_runs".
    """
    params = jax.jit(lambda: apply.init_params(cfg, 0))()
    args = (params, inputs["text"], inputs["mask"], inputs["x"], inputs["bits"])
    programs = {"forward": jax.jit(lambda p, *a: apply.forward(p, *a[:3], schedule, cfg=cfg))}
    for mode in ("on", "off"):
        c = cfg.replace(grad_boundaries=mode)
        loss = lambda p, *a, c=c: bit_loss.loss_fn(p, *a, schedule, cfg=c, reweight_by_scale=True)
        programs[f"gradient_boundaries_{mode}"] = jax.jit(jax.value_and_grad(loss))
    measured = {name: [] for name in programs}
    for _ in range(runs):
        for name, fn in programs.items():
            measured[name].append(thunk_timeline(fn, args, calls))
    out = {}
    for name, results in measured.items():
        ordered = sorted(results, key=lambda r: r["total_ms"])
        out[name] = {**ordered[(len(ordered) - 1) // 2], "total_ms_runs": [r["total_ms"] for r in results]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vs_upstream.py")
    parser.add_argument("--timeline", action="store_true", help="also time every XLA thunk (needs a quiet machine)")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per program for --timeline")
    parser.add_argument("--runs", type=int, default=3, help="--timeline runs per program (the median is kept)")
    parser.add_argument("--out", default="", help="also write the result (and this command) to this JSON file")
    args, config = parse_config_args(parser)
    base = get_preset(config.model_preset)
    cfg = base.replace(codebook_dim=config.codebook_dim, compute_dtype="float32", remat=False,
                       text_maxlen=max(base.text_maxlen, max(config.text_lengths)))
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    inputs = make_inputs(config, cfg, schedule)
    impls = [config.attention_impl] + (["xla"] if config.attention_impl != "xla" else [])
    result = {"size": config.size, "L": schedules.sequence_length(schedule), "batch": config.batch,
              "programs": {impl: profile(cfg.replace(attention_impl=impl), schedule, inputs) for impl in impls}}
    if args.timeline:
        result["timeline"] = timelines(cfg.replace(attention_impl=config.attention_impl), schedule, inputs, args.calls,
                                       args.runs)
    print(json.dumps(result))
    if args.out:
        result["command"] = "python " + " ".join(sys.argv)
        result["jax"] = jax.__version__
        result["timeline_calls"] = args.calls
        result["timeline_runs"] = args.runs
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
