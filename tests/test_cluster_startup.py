"""Start-up detection without a cluster: the environment of each kind of job is faked (env vars, the TPU VM
flag, the GCE metadata server) and `jax.distributed.initialize` is replaced by a recorder, so these check
exactly which arguments varejax would join with."""

from __future__ import annotations

import os

import pytest

from varejax.parallel import distributed

# Every variable the detection reads: cleared first, so the machine running the tests cannot leak in.
READ = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
        "VAREJAX_CLUSTER", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
        "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY", "MEGASCALE_NUM_SLICES",
        "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "VAREJAX_HEARTBEAT_TIMEOUT_S",
        "VAREJAX_SHUTDOWN_TIMEOUT_S", "VAREJAX_INITIALIZATION_TIMEOUT_S")


@pytest.fixture
def joined(monkeypatch):
    """A clean environment (no cluster, not a TPU VM, no GPUs) and a recorder in place of JAX's initialize;
    yields the list of kwargs each call received."""
    for name in list(os.environ):
        if name in READ or name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(distributed, "_tpu_metadata", lambda key: pytest.fail(f"metadata asked for {key}"))
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(distributed, "_joined", None)
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def _slurm(monkeypatch, tasks: int, nodes: int, procid: int = 1, **extra: str) -> None:
    env = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NTASKS=str(tasks),
               SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid % (tasks // nodes)),
               SLURM_STEP_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes), **extra)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _timeouts(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in ("initialization_timeout", "heartbeat_timeout_seconds",
                                       "shutdown_timeout_seconds")}


def test_a_single_host_joins_nothing(joined, monkeypatch):
    assert not distributed.is_multi_host_environment()
    assert distributed.initialize() is False and joined == []
    assert distributed.describe_cluster() == distributed.SINGLE_HOST
    # srun's variables without a step (varejax run in the batch script itself): JAX sees no SLURM either
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.initialize() is False and joined == []
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")  # explicitly one
    assert distributed.initialize() is False and joined == []


def test_explicit_variables_as_the_local_launcher_sets_them(joined, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:4001")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("VAREJAX_HEARTBEAT_TIMEOUT_S", "7")
    assert distributed.initialize() is True
    (kwargs,) = joined
    assert _timeouts(kwargs) == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 7,
                                 "shutdown_timeout_seconds": 60}
    assert kwargs == {"coordinator_address": "127.0.0.1:4001", "num_processes": 2, "process_id": 1}
    assert distributed.describe_cluster() == "explicit, coordinator 127.0.0.1:4001"
    assert distributed.initialize() is True and len(joined) == 1  # idempotent


def test_explicit_variables_win_over_slurm(joined, monkeypatch):
    _slurm(monkeypatch, tasks=8, nodes=2, SLURM_NTASKS_PER_NODE="4")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "head:5000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    distributed.initialize()
    (kwargs,) = joined
    _timeouts(kwargs)
    assert kwargs == {"coordinator_address": "head:5000", "num_processes": 3, "process_id": 2}
    assert distributed.describe_cluster().startswith("explicit")


def test_an_incomplete_explicit_job_is_refused_with_what_to_set(joined, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:4001")
    with pytest.raises(distributed.ClusterError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        distributed.initialize()
    assert joined == []


def test_slurm_one_process_per_gpu_keeps_jax_default(joined, monkeypatch):
    _slurm(monkeypatch, tasks=8, nodes=2, procid=5, SLURM_NTASKS_PER_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "gpu07:24242")  # as launch/slurm.sbatch sets it
    assert distributed.initialize() is True
    (kwargs,) = joined
    _timeouts(kwargs)
    # JAX's SLURM detection gives the rank, the count and GPU number SLURM_LOCALID; we pass only the address
    assert kwargs == {"coordinator_address": "gpu07:24242"}
    assert distributed.describe_cluster() == "slurm, one process per GPU, coordinator gpu07:24242"


def test_slurm_one_process_per_node_drives_all_its_gpus(joined, monkeypatch):
    _slurm(monkeypatch, tasks=2, nodes=2, SLURM_NTASKS_PER_NODE="1", CUDA_VISIBLE_DEVICES="4,5,6,7")
    distributed.initialize()
    (kwargs,) = joined
    _timeouts(kwargs)
    assert kwargs == {"local_device_ids": [0, 1, 2, 3]}  # the visible GPUs, as the runtime numbers them
    assert distributed.describe_cluster() == "slurm, one process per node, local devices 0,1,2,3"


def test_slurm_one_process_per_node_without_ntasks_per_node(joined, monkeypatch):
    """`sbatch --nodes=4 --ntasks=4`: as many tasks as nodes; the GPU count from SLURM_GPUS_ON_NODE."""
    _slurm(monkeypatch, tasks=4, nodes=4, procid=3, SLURM_GPUS_ON_NODE="2")
    distributed.initialize()
    assert joined[0]["local_device_ids"] == [0, 1]


def test_jax_local_device_ids_names_the_devices(joined, monkeypatch):
    _slurm(monkeypatch, tasks=8, nodes=2, SLURM_NTASKS_PER_NODE="4")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "2,3")
    distributed.initialize()
    assert joined[0]["local_device_ids"] == [2, 3]
    assert "local devices 2,3 (JAX_LOCAL_DEVICE_IDS)" in distributed.describe_cluster()
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0;1")
    with pytest.raises(distributed.ClusterError, match="JAX_LOCAL_DEVICE_IDS"):
        distributed.detect_cluster()


def test_open_mpi_one_process_per_node(joined, monkeypatch):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    distributed.initialize()
    assert joined[0]["local_device_ids"] == [0, 1]
    assert distributed.describe_cluster().startswith("open-mpi, one process per node")


def test_plain_tpu_vm_slice_is_found_in_the_gce_metadata(joined, monkeypatch):
    """No TPU_WORKER_HOSTNAMES on a plain TPU VM: the workers are the metadata's worker-network-endpoints
    (old name:id:ip triples or plain hostnames), and JAX's TPU detection supplies everything else."""
    metadata = {"worker-network-endpoints": "w0:0:10.0.0.2,w1:1:10.0.0.3,w2:2:10.0.0.4,w3:3:10.0.0.5",
                "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\nMEGASCALE_NUM_SLICES: '2'\n"}
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(distributed, "_tpu_metadata", metadata.get)
    cluster = distributed.detect_cluster()
    assert (cluster.kind, cluster.num_processes) == ("tpu-vm", 8)
    distributed.initialize()
    (kwargs,) = joined
    _timeouts(kwargs)
    assert kwargs == {}  # JAX never restricts TPU devices; its GceTpuCluster reads the same metadata
    assert distributed.describe_cluster() == "tpu-vm, 4 workers x 2 slices"


def test_single_host_tpu_vm_and_gke_tpu(joined, monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(distributed, "_tpu_metadata", {"worker-network-endpoints": "t1v-n-0-w-0"}.get)
    assert not distributed.is_multi_host_environment()
    monkeypatch.setattr(distributed, "_tpu_metadata", lambda key: None)  # not on GCE at all
    assert not distributed.is_multi_host_environment()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "pod-0,pod-1")
    assert distributed.detect_cluster().kind == "gke-tpu" and distributed.initialize() is True
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)  # the variable alone is not a TPU
    assert not distributed.is_multi_host_environment()


def test_varejax_cluster_forces_or_disables_detection(joined, monkeypatch):
    _slurm(monkeypatch, tasks=8, nodes=2, SLURM_NTASKS_PER_NODE="4")
    monkeypatch.setenv("VAREJAX_CLUSTER", "none")
    assert distributed.initialize() is False
    monkeypatch.setenv("VAREJAX_CLUSTER", "mpi4py")
    distributed.initialize()
    assert joined[0]["cluster_detection_method"] == "mpi4py"


def test_the_startup_line_keeps_its_prefix_and_names_the_cluster(joined, monkeypatch):
    monkeypatch.setattr(distributed, "_joined", distributed.Cluster("slurm", 2, note="one process per GPU"))
    line = distributed.describe()
    assert line.endswith(", via slurm, one process per GPU")
    assert line.startswith("1 process, ")
