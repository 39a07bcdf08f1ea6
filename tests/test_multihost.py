"""Multi-host with real processes: `launch/local.sh N 'COMMAND'` joins N processes on this machine over
loopback (one CPU device each, gloo collectives), and the toy erase job on two processes ends where the
one-process run with the same global batch ends."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local.sh"

# The toy job made small (the same for both runs): 4 pairs, 4 steps, 4 prompts per evaluation set.
SMALL = ["--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.toy.pairs_per_concept=4",
         "--config.prepare.batch_size=4", "--config.eval.concept_prompts=4", "--config.eval.other_prompts=4",
         "--config.eval.following_prompts=4", "--config.eval.batch_size=4"]
RESULT_SKIP = {"wall_time_s", "command", "config"}


def _env() -> dict[str, str]:
    """One CPU device per process (not conftest's 8), and XLA's fastest compiles (both runs alike)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    return env


def _launch(n: int, command: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH), str(n), command], cwd=REPO, env=env or _env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def test_local_launcher_prefixes_ranks_and_stops_all_when_one_fails():
    out = _launch(3, 'echo "rank $JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS"', 30)
    assert out.returncode == 0, out.stdout
    for rank in range(3):
        assert f"[{rank}] rank {rank} of 3 at 127.0.0.1:" in out.stdout
    start = time.time()
    out = _launch(2, 'if [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60; echo never', 30)
    assert out.returncode == 3, out.stdout
    assert time.time() - start < 10
    assert "rank 1 exited with status 3" in out.stdout and "never" not in out.stdout
