"""XLA's cost of the compiled forward and gradient: FLOPs, bytes accessed, and the ops that move memory.

    python benchmarks/profile_step.py --config configs/vs_upstream.py
    python benchmarks/profile_step.py --config configs/vs_upstream.py --config.attention_impl=chunked

For the sizes of `configs/vs_upstream.py`, compiles the teacher-forced forward and the gradient of the bit
loss and prints, per program, XLA's cost analysis (GFLOP, GB accessed) and the number of transposes,
copies, gathers and scatters in the optimised HLO (fused computations included), as one JSON line.
With `--config.attention_impl` both the given implementation and `xla` (the masked, padded path) are
profiled in the same run. Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

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
    programs = {"forward": jax.jit(lambda p, *a: apply.forward(p, *a[:3], schedule, cfg=cfg)),
                "gradient": jax.jit(jax.value_and_grad(loss))}
    out = {}
    for name, fn in programs.items():
        compiled = fn.lower(params, *args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        counts = collections.Counter(re.findall(r"= \S+ (" + "|".join(OPS) + r")\(", compiled.as_text()))
        out[name] = {"gflop": round(cost["flops"] / 1e9, 2), "gb_accessed": round(cost["bytes accessed"] / 1e9, 3),
                     **{op: counts.get(op, 0) for op in OPS}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vs_upstream.py")
    _, config = parse_config_args(parser)
    base = get_preset(config.model_preset)
    cfg = base.replace(codebook_dim=config.codebook_dim, compute_dtype="float32", remat=False,
                       text_maxlen=max(base.text_maxlen, max(config.text_lengths)))
    schedule = schedules.get_schedule(config.h_div_w, config.pn)
    inputs = make_inputs(config, cfg, schedule)
    impls = [config.attention_impl] + (["xla"] if config.attention_impl != "xla" else [])
    result = {"size": config.size, "L": schedules.sequence_length(schedule), "batch": config.batch,
              "programs": {impl: profile(cfg.replace(attention_impl=impl), schedule, inputs) for impl in impls}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
