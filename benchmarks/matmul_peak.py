"""What one matmul reaches on this CPU: JAX (XLA:CPU) against torch, fp32 and bf16, at the benchmark's shapes.

    python benchmarks/matmul_peak.py --out benchmarks/results/matmul_peak.json
    python benchmarks/matmul_peak.py --shapes 64x64x64 --runs 1 --calls 3        # seconds (tests)

The ceiling under issue 16's bf16 target: our bf16-compute paths can only beat upstream's fp32 by as much
as XLA:CPU's bf16 dots beat its fp32 ones. Shapes M x K x N: the transformer's token rows at width 256 (the
`small` preset, batch 2 x L = 521 = 1042 rows; QKV, FFN up and down) and a 2048 cube. Per shape and dtype:
`--runs` runs, each the median of `--calls` timed calls after a warm-up; the figure is the median over runs
and the spread min..max, in GFLOP/s. torch (if installed) runs with as many threads as JAX sees cores. Also
records the CPU model and whether it has AVX512-BF16 / AMX (what torch's bf16 kernels use).
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

DEFAULT_SHAPES = "1042x256x768,1042x256x1024,1042x1024x256,2048x2048x2048"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"MxKxN,..." -> [(M, K, N), ...]; ValueError naming the bad entry."""
    shapes = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: {entry!r} is not MxKxN with positive integers")
        shapes.append(tuple(int(p) for p in parts))
    if not shapes:
        raise ValueError("--shapes names no shape")
    return shapes


def _gflops(run, flops: float, calls: int) -> float:
    run()  # warm-up: compile, allocate
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def jax_gflops(m: int, k: int, n: int, dtype: str, calls: int) -> float:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((k, n)), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    return _gflops(lambda: matmul(a, b).block_until_ready(), 2.0 * m * k * n, calls)


def torch_gflops(m: int, k: int, n: int, dtype: str, calls: int) -> float:
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(torch_dtype)
    b = torch.randn(k, n, generator=gen).to(torch_dtype)
    return _gflops(lambda: a @ b, 2.0 * m * k * n, calls)


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def cpu_features() -> dict:
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "cores_seen_by_jax": os.cpu_count()}


def measure(shapes, runs: int, calls: int, with_torch: bool) -> list[dict]:
    """One row per shape: per side and dtype the median GFLOP/s over `runs` and its min..max."""
    sides = [("jax", jax_gflops)] + ([("torch", torch_gflops)] if with_torch else [])
    rows = []
    for m, k, n in shapes:
        row = {"shape": [m, k, n]}
        for side, fn in sides:
            for dtype in ("float32", "bfloat16"):
                values = [fn(m, k, n, dtype, calls) for _ in range(runs)]
                # 4 significant digits: a tiny shape on a loaded machine runs at well under 0.1 GFLOP/s
                row[f"{side}_{dtype}"] = {"gflops": _sig(statistics.median(values)), "min": _sig(min(values)),
                                          "max": _sig(max(values))}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxKxN")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per run (median)")
    parser.add_argument("--no_torch", action="store_true", help="time JAX only")
    parser.add_argument("--out", default="", help="also write the result (and this command) to this JSON file")
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as e:
        parser.error(str(e))
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: timing JAX only (install the .[torch] extra to compare)", file=sys.stderr)
            with_torch = False
        else:
            torch.set_num_threads(os.cpu_count() or 1)
    result = {"cpu": cpu_features(), "jax": jax.__version__, "runs": args.runs, "calls": args.calls,
              "rows": measure(shapes, args.runs, args.calls, with_torch)}
    if with_torch:
        import torch
        result["torch"] = torch.__version__
    print(json.dumps(result))
    if args.out:
        result["command"] = "python " + " ".join(["benchmarks/matmul_peak.py", *(argv or sys.argv[1:])])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
