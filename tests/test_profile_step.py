"""benchmarks/profile_step.py's measured timeline: the profiler trace is found and summed by thunk kind."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import profile_step  # noqa: E402


def test_thunk_timeline_sums_the_executed_thunks_by_kind():
    fn = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((256, 256))  # big enough that the thunks take measurable time
    timeline = profile_step.thunk_timeline(fn, (a, a), calls=2, top=50)
    kinds = timeline["kinds"]
    assert kinds and timeline["total_ms"] > 0
    assert all(kind[-1].isalpha() or kind[-1] == "_" for kind in kinds)  # numbered instances merged into kinds
    assert not any(kind.startswith(("$", "Thunk")) for kind in kinds)    # python and runtime frames left out
    assert sum(k["ms"] for k in kinds.values()) <= timeline["total_ms"] + 0.001 * len(kinds)
    assert all(k["count"] > 0 for k in kinds.values())
