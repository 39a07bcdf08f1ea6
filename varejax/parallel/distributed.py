"""Multi-host start-up: every host runs the same program; JAX's own coordinator joins them.

`initialize()` calls `jax.distributed.initialize()` when this process is one of several and does nothing
on a single host, so the same command works on a laptop, a TPU pod slice and a SLURM cluster. The `varejax`
command calls it first, before anything can start the XLA backend (JAX refuses to join a job after).

`detect_cluster()` decides "one of several" the way JAX's own cluster detection (`jax/_src/clusters/`)
picks an environment, in JAX's order, so that the environment we count processes in is the one JAX
joins through:

- explicit variables win: JAX_NUM_PROCESSES (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID, as
  launch/local.sh sets them); JAX_COORDINATOR_ADDRESS or JAX_PROCESS_ID alone override a detected cluster;
- Open MPI (`mpirun`: OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE);
- SLURM inside an `srun` step (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
  SLURM_LOCALID all set; `varejax` run directly in a batch script is one process, as JAX sees it);
- a TPU VM (libtpu and TPU chips, as JAX's `running_in_cloud_tpu_vm`): on GKE the workers are listed in
  TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES, on a plain TPU VM slice in the GCE metadata
  (`worker-network-endpoints`); times the slices of a multislice job (MEGASCALE_NUM_SLICES);
- VAREJAX_CLUSTER=auto joins through whatever JAX detects (Kubernetes), VAREJAX_CLUSTER=<method> through
  one of JAX's detection methods (e.g. mpi4py, opt-in in JAX), VAREJAX_CLUSTER=none never joins.

Devices per process: JAX gives each SLURM / Open MPI process only the GPU numbered by its local rank.
That is right for one process per GPU, wrong for one process per node: when a node runs one process
(SLURM_NTASKS_PER_NODE=1, as many tasks as nodes, or OMPI_COMM_WORLD_LOCAL_SIZE=1) it drives every GPU
it sees; JAX_LOCAL_DEVICE_IDS ("0,1,2,3") names them explicitly anywhere.

A process that dies or stops answering is noticed by the others within `heartbeat_timeout_s` (default
30 s, env VAREJAX_HEARTBEAT_TIMEOUT_S) instead of JAX's default of minutes; a finished process waits at
most `shutdown_timeout_s` (default 60 s, env VAREJAX_SHUTDOWN_TIMEOUT_S) for the others at exit; joining
gives up after VAREJAX_INITIALIZATION_TIMEOUT_S (default 300 s).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import urllib.request
from collections.abc import Callable
from typing import Any

import jax

from varejax.errors import UserError

HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 60
INITIALIZATION_TIMEOUT_S = 300
SINGLE_HOST = "single host"


class ClusterError(UserError):
    """The environment names a multi-host job that cannot be joined as it stands (says what to set)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process runs, as start-up sees it (read from the environment, before the XLA backend).

    `kind` names the environment ("explicit", "slurm", "open-mpi", "tpu-vm", "gke-tpu", SINGLE_HOST, or a
    forced JAX method); the other fields are passed to `jax.distributed.initialize` when set (None leaves
    them to JAX's own detection of the same environment).
    """

    kind: str
    num_processes: int | None = 1
    process_id: int | None = None
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None
    detection_method: str | None = None
    note: str = ""
    count_is_explicit: bool = False  # JAX_NUM_PROCESSES: passed on (a detected count is JAX's to find again)

    @property
    def is_multi_host(self) -> bool:
        return self.kind != SINGLE_HOST and (self.num_processes is None or self.num_processes > 1)

    def describe(self) -> str:
        """E.g. "slurm, one process per node, local devices 0,1,2,3"."""
        return ", ".join(filter(None, [self.kind, self.note]))

    def initialize_kwargs(self) -> dict[str, Any]:
        """The arguments of `jax.distributed.initialize` this environment fixes (the rest: JAX's detection)."""
        count = self.num_processes if self.count_is_explicit else None
        kwargs = {"coordinator_address": self.coordinator_address, "num_processes": count,
                  "process_id": self.process_id, "cluster_detection_method": self.detection_method,
                  "local_device_ids": list(self.local_device_ids) if self.local_device_ids is not None else None}
        return {key: value for key, value in kwargs.items() if value is not None}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ClusterError(f"{name}={value!r} is not a whole number") from None


def _on_cloud_tpu_vm() -> bool:
    """JAX's own verdict (set by `import jax`: libtpu installed and TPU chips present)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a JAX that moved it: the same test by hand
        return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _tpu_metadata(key: str) -> str | None:
    """A TPU VM's GCE metadata attribute (None when the metadata server does not answer)."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                     headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode() if response.status == 200 else None
    except OSError:
        return None


def _tpu_env_value(key: str, from_metadata: bool) -> str | None:
    """A MEGASCALE_* value: the environment first, then (GCE) the metadata's `tpu-env` lines `KEY: 'value'`."""
    if key in os.environ:
        return os.environ[key]
    for line in ((_tpu_metadata("tpu-env") or "").splitlines() if from_metadata else []):
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip().strip("'")
    return None


def _tpu_cluster() -> Cluster | None:
    """A TPU VM: GKE lists the slice's workers in the environment, a plain TPU VM in the GCE metadata."""
    if not _on_cloud_tpu_vm():
        return None
    env = os.environ
    workers = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
    kind, from_metadata = "gke-tpu", False
    if workers is None:
        if env.get("TPU_SKIP_MDS_QUERY") is not None:
            return None
        workers = _tpu_metadata("worker-network-endpoints")
        if workers is None:
            return None
        kind, from_metadata = "tpu-vm", True
    hosts = len([w for w in workers.split(",") if w.strip()])
    slices = int(_tpu_env_value("MEGASCALE_NUM_SLICES", from_metadata) or 1)
    return Cluster(kind, hosts * slices, note=f"{hosts} worker{'s' if hosts != 1 else ''} x {slices} slice"
                                              f"{'s' if slices != 1 else ''}")


def _gpu_count() -> int | None:
    """GPUs this process can see (the runtime numbers them 0..n-1), from what SLURM / the driver expose."""
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None and value.strip() not in ("", "NoDevFiles"):
            return len([d for d in value.split(",") if d.strip()])
    if (on_node := _env_int("SLURM_GPUS_ON_NODE")) is not None:
        return on_node
    return len(glob.glob("/dev/nvidia[0-9]*")) or None


def _one_process_per_node(kind: str) -> bool:
    env = os.environ
    if kind == "slurm":
        nodes = _env_int("SLURM_STEP_NUM_NODES") or _env_int("SLURM_NNODES")
        return env.get("SLURM_NTASKS_PER_NODE") == "1" or nodes == _env_int("SLURM_NTASKS")
    if kind == "open-mpi":
        return env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"
    return False


def _local_devices(kind: str) -> tuple[tuple[int, ...] | None, str]:
    """(local_device_ids, note): JAX_LOCAL_DEVICE_IDS, else every GPU of a node that runs one process."""
    if value := os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip():
        try:
            ids = tuple(int(i) for i in value.split(","))
        except ValueError:
            raise ClusterError(f"JAX_LOCAL_DEVICE_IDS={value!r}: expected device numbers like 0,1,2,3") from None
        return ids, "local devices " + ",".join(map(str, ids)) + " (JAX_LOCAL_DEVICE_IDS)"
    if kind not in ("slurm", "open-mpi"):
        return None, ""
    if not _one_process_per_node(kind):
        return None, "one process per GPU"
    count = _gpu_count()
    if not count:  # no GPU (a CPU job) or none found: JAX's default, which restricts only GPUs
        return None, "one process per node"
    return tuple(range(count)), "one process per node, local devices " + ",".join(map(str, range(count)))


def _scheduler() -> str | None:
    """The batch system that started this process, as JAX checks for it: "open-mpi", "slurm" or None."""
    env = os.environ
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "open-mpi"
    if all(name in env for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                    "SLURM_LOCALID")):
        return "slurm"
    return None


def _detected_cluster() -> Cluster | None:
    """The first environment JAX's detection would pick (its order: Open MPI, SLURM, TPU)."""
    scheduler = _scheduler()
    if scheduler == "open-mpi":
        return Cluster(scheduler, _env_int("OMPI_COMM_WORLD_SIZE"))
    if scheduler == "slurm":
        return Cluster(scheduler, _env_int("SLURM_NTASKS"))
    return _tpu_cluster()


def detect_cluster() -> Cluster:
    """Which multi-host environment this process is in (Cluster(SINGLE_HOST) when none); reads only the
    environment (and, on a TPU VM, the GCE metadata), never the XLA backend."""
    env = os.environ
    forced = env.get("VAREJAX_CLUSTER", "").strip()
    if forced.lower() in ("none", "single"):
        return Cluster(SINGLE_HOST)
    explicit_count, explicit_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    coordinator = env.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    if forced:  # the user names JAX's method (or "auto": JAX's own choice); counts are JAX's business
        base = Cluster(forced, explicit_count, detection_method=None if forced.lower() == "auto" else forced)
    elif explicit_count is not None:
        base = Cluster("explicit", explicit_count)
    else:
        base = _detected_cluster()
        if base is None:
            if coordinator is None and explicit_id is None:
                return Cluster(SINGLE_HOST)
            base = Cluster("explicit", None)
    # Under SLURM / Open MPI, JAX restricts each process to one GPU even when the counts are explicit.
    local_ids, device_note = _local_devices(_scheduler() or base.kind)
    notes = [base.note, device_note, f"coordinator {coordinator}" if coordinator else ""]
    return dataclasses.replace(base, process_id=explicit_id, coordinator_address=coordinator,
                               local_device_ids=local_ids, note=", ".join(filter(None, notes)),
                               count_is_explicit=explicit_count is not None)


def is_multi_host_environment() -> bool:
    """True when this process is one of several (see `detect_cluster`)."""
    return detect_cluster().is_multi_host


_joined: Cluster | None = None  # what initialize() found, so that later lines name it without asking again


def describe_cluster() -> str:
    """The environment this process joined through (or would), e.g. "slurm, one process per GPU"."""
    return (_joined or detect_cluster()).describe()


def _env_seconds(name: str, default: int) -> int:
    return value if (value := _env_int(name)) is not None else default


def initialize(heartbeat_timeout_s: int | None = None, shutdown_timeout_s: int | None = None) -> bool:
    """Joins the hosts of a multi-host job (idempotent); a no-op on one host. Returns True when joined.

    Must run before anything starts the XLA backend (`jax.devices()`, the first array, a jit call).
    """
    global _joined
    cluster = detect_cluster()
    if not cluster.is_multi_host:
        _joined = cluster
        return False
    if jax.distributed.is_initialized():
        _joined = _joined or cluster
        return True
    if cluster.kind == "explicit" and None in (cluster.coordinator_address, cluster.num_processes,
                                               cluster.process_id) and _detected_cluster() is None:
        raise ClusterError("a multi-host job outside SLURM / Open MPI / a TPU slice needs all three of "
                           "JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
                           "JAX_PROCESS_ID (launch/local.sh sets them); unset them to run on one host")
    jax.distributed.initialize(
        **cluster.initialize_kwargs(),
        initialization_timeout=_env_seconds("VAREJAX_INITIALIZATION_TIMEOUT_S", INITIALIZATION_TIMEOUT_S),
        heartbeat_timeout_seconds=heartbeat_timeout_s or _env_seconds("VAREJAX_HEARTBEAT_TIMEOUT_S",
                                                                      HEARTBEAT_TIMEOUT_S),
        shutdown_timeout_seconds=shutdown_timeout_s or _env_seconds("VAREJAX_SHUTDOWN_TIMEOUT_S",
                                                                    SHUTDOWN_TIMEOUT_S))
    _joined = cluster
    return True


def is_main_process() -> bool:
    """True on the process that writes reports and logs (process 0)."""
    return jax.process_index() == 0


def describe(mesh: Any = None) -> str:
    """One line: processes, devices (per process, platform), the mesh's axis sizes and the environment the
    processes joined through, e.g. "2 processes, 2 cpu devices (1 here), mesh data=2 x fsdp=1 x tensor=1,
    via explicit, coordinator 127.0.0.1:4001"."""
    devices = jax.devices()
    text = (f"{jax.process_count()} process{'es' if jax.process_count() != 1 else ''}, {len(devices)} "
            f"{devices[0].platform} device{'s' if len(devices) != 1 else ''} ({jax.local_device_count()} here)")
    if mesh is not None:
        text += ", mesh " + " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    cluster = describe_cluster()
    return text + (f", {cluster}" if cluster == SINGLE_HOST else f", via {cluster}")


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


def run_on_main(work: Callable[[], int], what: str) -> int:
    """Runs `work` (returning an exit status) on process 0 alone; every process returns its status.

    For commands with one writer and no collectives (convert, merge): the others wait for process 0's
    status, so every process ends together and a failure on process 0 fails them all.
    """
    if jax.process_count() == 1:
        return work()
    import sys

    import numpy as np
    from jax.experimental import multihost_utils

    status = work() if jax.process_index() == 0 else 0
    status = int(multihost_utils.broadcast_one_to_all(np.int32(status)))
    if jax.process_index() != 0:
        print(f"process {jax.process_index()}: {what} ran on process 0 (status {status})", file=sys.stderr)
    return status
