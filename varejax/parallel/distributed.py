"""Multi-host start-up: every host runs the same program; JAX's own coordinator joins them.

`initialize()` calls `jax.distributed.initialize()` when the process is one of several (a TPU pod
slice, SLURM, or explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables)
and does nothing on a single host, so the same command works on a laptop and on a pod. The `varejax`
command calls it first, before anything can start the XLA backend (JAX refuses to join a job after).

A process that dies or stops answering is noticed by the others within `heartbeat_timeout_s` (default
30 s, env VAREJAX_HEARTBEAT_TIMEOUT_S) instead of JAX's default of minutes; a finished process waits at
most `shutdown_timeout_s` (default 60 s, env VAREJAX_SHUTDOWN_TIMEOUT_S) for the others at exit.
"""

from __future__ import annotations

import os
from typing import Any

import jax

HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 60
INITIALIZATION_TIMEOUT_S = 300


def is_multi_host_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    # TPU VMs of a multi-host slice list every worker here.
    return len([w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w]) > 1


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def initialize(heartbeat_timeout_s: int | None = None, shutdown_timeout_s: int | None = None) -> bool:
    """Joins the hosts of a multi-host job (idempotent); a no-op on one host. Returns True when joined.

    Must run before anything starts the XLA backend (`jax.devices()`, the first array, a jit call).
    """
    if not is_multi_host_environment():
        return False
    if jax.distributed.is_initialized():
        return True
    heartbeat = heartbeat_timeout_s or _env_seconds("VAREJAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S)
    shutdown = shutdown_timeout_s or _env_seconds("VAREJAX_SHUTDOWN_TIMEOUT_S", SHUTDOWN_TIMEOUT_S)
    # JAX itself reads only JAX_COORDINATOR_ADDRESS; the count and rank come from our variables when set
    # (launch/local.sh, launch/slurm.sbatch), else from JAX's cluster detection (TPU, SLURM, MPI, k8s).
    env = os.environ
    explicit = {}
    if env.get("JAX_NUM_PROCESSES", "").strip():
        explicit["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID", "").strip():
        explicit["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**explicit, initialization_timeout=_env_seconds("VAREJAX_INITIALIZATION_TIMEOUT_S",
                                                                   INITIALIZATION_TIMEOUT_S),
                               heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=shutdown)
    return True


def is_main_process() -> bool:
    """True on the process that writes reports and logs (process 0)."""
    return jax.process_index() == 0


def describe(mesh: Any = None) -> str:
    """One line: processes, devices (per process, platform) and the mesh's axis sizes."""
    devices = jax.devices()
    text = (f"{jax.process_count()} process{'es' if jax.process_count() != 1 else ''}, {len(devices)} "
            f"{devices[0].platform} device{'s' if len(devices) != 1 else ''} ({jax.local_device_count()} here)")
    if mesh is not None:
        text += ", mesh " + " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return text


def announce(mesh: Any = None) -> None:
    """Prints `describe(mesh)` on process 0 (every run says where it runs)."""
    if is_main_process():
        print(f"varejax: {describe(mesh)}", flush=True)


def sync(name: str) -> None:
    """A barrier over all processes (a no-op on one): where one process writes and the others read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_local(tree: Any) -> Any:
    """Arrays that span several processes -> full copies on this process's default device (a collective
    gather: every process calls it, in the same order); everything else unchanged."""
    if jax.process_count() == 1:
        return tree
    import jax.numpy as jnp

    from varejax.models.lora import host_array

    def local(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jnp.asarray(host_array(x))
        return x

    return jax.tree.map(local, tree)
