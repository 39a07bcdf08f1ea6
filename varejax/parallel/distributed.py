"""Multi-host start-up: every host runs the same program; JAX's own coordinator joins them.

`initialize()` calls `jax.distributed.initialize()` when the process is one of several (a TPU pod
slice, SLURM, or explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables)
and does nothing on a single host, so the same command works on a laptop and on a pod.
"""

from __future__ import annotations

import os

import jax


def is_multi_host_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    # TPU VMs of a multi-host slice list every worker here.
    return len([w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w]) > 1


def initialize() -> None:
    """Joins the hosts of a multi-host job (idempotent); a no-op on one host."""
    if not is_multi_host_environment():
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize()


def is_main_process() -> bool:
    """True on the process that writes reports and logs (process 0)."""
    return jax.process_index() == 0
