"""The cluster launchers without a cluster: `launch/slurm.sbatch` under a faked SLURM allocation (fake
`scontrol` and `srun` on PATH) and `launch/tpu_pod.sh` with a fake `gcloud` that plays every worker on this
machine (its `ssh --command` runs the command in a fake home, its `scp` copies there). Dry runs must print
the commands, shell-quoted so that an override like --config.mesh.shape='(2, 1, 1)' stays one argument,
and run none of them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
TPU_POD = REPO / "launch" / "tpu_pod.sh"
OVERRIDE = "--config.mesh.shape=(2, 1, 1)"
PRINT_ARGV = [sys.executable, "-c", "import sys; print(sys.argv[1:])"]

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$*" == "show hostnames gpu[07-08]" ]] || exit 9
printf 'gpu07\\ngpu08\\n'
"""
# srun records its argv (NUL-separated) and the coordinator it was given, then runs the command itself
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_LOG/srun.argv"
echo "$JAX_COORDINATOR_ADDRESS" > "$FAKE_LOG/srun.coordinator"
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
# gcloud records each call's argv; ssh runs --command in the fake worker's home, scp copies there
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\0' "$@" >> "$FAKE_LOG/gcloud.argv"
printf '\\n' >> "$FAKE_LOG/gcloud.argv"
case $4 in
  ssh) while [[ $1 != --command ]]; do shift; done; cd "$FAKE_HOME" && HOME=$FAKE_HOME exec bash -c "$2" ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    """A PATH with fake scontrol, srun and gcloud; returns (env, log dir, fake worker home)."""
    bin_dir, log, home = tmp_path / "bin", tmp_path / "log", tmp_path / "worker_home"
    for d in (bin_dir, log, home):
        d.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("gcloud", FAKE_GCLOUD)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "VAREJAX_")) and k != "XLA_FLAGS"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), FAKE_HOME=str(home),
               TMPDIR=str(tmp_path))
    return env, log, home


def _slurm_env(env: dict, **extra: str) -> dict:
    return {**env, "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "1", **extra}


def _run(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=30)


def _argv_file(path: Path) -> list[list[str]]:
    """The calls a fake recorded: one list of arguments per call."""
    return [call.split("\0")[:-1] for call in path.read_text().split("\0\n") if call]


def test_slurm_dry_run_prints_the_environment_and_srun_command_and_runs_nothing(fake):
    env, log, _ = fake
    command = ["varejax", "erase", "--config", "configs/sweep.py", OVERRIDE, "--workdir", "/scratch/it's"]
    out = _run([SBATCH, "--dry-run", *command], _slurm_env(env, VAREJAX_HEARTBEAT_TIMEOUT_S="20"))
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
    assert ["export", f"JAX_COORDINATOR_ADDRESS=gpu07:{20000 + 123456 % 20000}"] in lines
    assert ["export", "VAREJAX_HEARTBEAT_TIMEOUT_S=20"] in lines
    assert lines[-1] == ["srun", "--kill-on-bad-exit=1", "--label", *command]  # the override: one argument
    assert not (log / "srun.argv").exists()
    # the same through the environment (sbatch hands its own options to sbatch, not to the script)
    out = _run([SBATCH, *command], _slurm_env(env, VAREJAX_DRY_RUN="1", JAX_COORDINATOR_PORT="4444"))
    assert out.returncode == 0 and "export JAX_COORDINATOR_ADDRESS=gpu07:4444\n" in out.stdout
    assert not (log / "srun.argv").exists()


def test_slurm_runs_srun_with_the_arguments_unchanged(fake):
    env, log, _ = fake
    out = _run([SBATCH, *PRINT_ARGV, OVERRIDE, "two words"], _slurm_env(env))
    assert out.returncode == 0, out.stderr
    assert _argv_file(log / "srun.argv") == [["--kill-on-bad-exit=1", "--label", *PRINT_ARGV, OVERRIDE,
                                              "two words"]]
    assert (log / "srun.coordinator").read_text() == "gpu07:23456\n"
    assert out.stdout == f"{[OVERRIDE, 'two words']}\n"
    # one argument with spaces: a shell command line, parsed once on the task by bash -c
    line = shlex.join(PRINT_ARGV) + " --config.mesh.shape='(2, 1, 1)' \"two words\""
    out = _run([SBATCH, line], _slurm_env(env))
    assert _argv_file(log / "srun.argv") == [["--kill-on-bad-exit=1", "--label", "bash", "-c", line]]
    assert out.stdout == f"{[OVERRIDE, 'two words']}\n"


def test_slurm_outside_an_allocation_says_so(fake):
    env, log, _ = fake
    out = _run([SBATCH, "--dry-run", "varejax", "erase"], env)
    assert out.returncode == 2 and "not inside a SLURM allocation" in out.stderr


def test_tpu_pod_dry_run_prints_each_gcloud_command_and_runs_nothing(fake):
    env, log, _ = fake
    command = f"varejax erase --workdir gs://bucket/r1 {shlex.quote(OVERRIDE)} --config.name='my run'"
    out = _run([TPU_POD, "--dry-run", "--sync", "--install", "--run", "r1", "my-tpu", "us-central2-b", command],
               env)
    assert out.returncode == 0, out.stderr
    archive, scp, unpack, install, launch = [shlex.split(line) for line in out.stdout.splitlines()]
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "my-tpu:varejax-r1.tar.gz"
    for ssh in (unpack, install, launch):
        assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                           "--worker=all"] and ssh[9] == "--command"
    assert "tar -xzf varejax-r1.tar.gz -C ~/varejax" in unpack[10]
    assert "pip install -q -r requirements.txt -e . 'jax[tpu]'" in install[10]
    remote = shlex.split(launch[10])
    assert "setsid" in remote and "nohup" in remote and remote[remote.index(">") + 1] == "logs/r1/worker.log"
    user_command = remote[remote.index("run") + 1]
    assert user_command == command
    assert shlex.split(user_command)[4:] == [OVERRIDE, "--config.name=my run"]
    assert "log ~/varejax/logs/r1/worker.log" in launch[10]
    assert not (log / "gcloud.argv").exists()
    assert not (Path(env["TMPDIR"]) / "varejax-r1.tar.gz").exists()  # not even the archive

    out = _run([TPU_POD, "--logs", "r1", "--worker", "2", "my-tpu", "zone"], {**env, "VAREJAX_DRY_RUN": "1"})
    assert shlex.split(out.stdout)[-3:] == ["--worker=2", "--command", "tail -n +1 -F ~/varejax/logs/r1/worker.log"]
    assert not (log / "gcloud.argv").exists()


def _wait_for(path: Path, seconds: float = 10) -> str:
    deadline = time.time() + seconds
    while not path.exists() or not path.read_text():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def test_tpu_pod_syncs_and_runs_detached_with_a_log_per_worker(fake):
    """The fake worker receives HEAD, runs the command in its own session (setsid) past the end of the ssh
    call, and writes the command's output, pid and exit status under ~/varejax/logs/RUN/."""
    env, log, home = fake
    go = home / "go"
    script = f"import os, sys, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.02)\n" \
             "print(sys.argv[1:], os.getsid(0), os.getcwd())"
    command = shlex.join([sys.executable, "-c", script]) + " --config.mesh.shape='(2, 1, 1)' 'two words'"
    out = _run([TPU_POD, "--sync", "--run", "r1", "my-tpu", "zone", command], env)
    assert out.returncode == 0, out.stderr
    calls = _argv_file(log / "gcloud.argv")
    assert [call[3] for call in calls] == ["scp", "ssh", "ssh"]
    assert (home / "varejax" / "launch" / "tpu_pod.sh").exists() and not list(home.glob("*.tar.gz"))
    assert not (home / "varejax" / "logs" / "r1" / "exit_status").exists()  # ssh returned, the job runs on
    assert "--logs r1 my-tpu zone" in out.stderr
    go.touch()
    run_dir = home / "varejax" / "logs" / "r1"
    assert _wait_for(run_dir / "exit_status") == "0\n"
    printed = (run_dir / "worker.log").read_text()
    pid = (run_dir / "pid").read_text().strip()
    assert printed.startswith(f"{[OVERRIDE, 'two words']} {pid} {home / 'varejax'}\n"), printed
    assert "tpu_pod.sh: exit status 0" in printed


def test_tpu_pod_stop_ends_the_run_on_every_worker(fake):
    env, log, home = fake
    (home / "varejax").mkdir()
    out = _run([TPU_POD, "--run", "r2", "my-tpu", "zone", "sleep 60"], env)
    assert out.returncode == 0, out.stderr
    pid = int(_wait_for(home / "varejax" / "logs" / "r2" / "pid"))
    out = _run([TPU_POD, "--stop", "r2", "my-tpu", "zone"], env)
    assert out.returncode == 0 and "stopped r2" in out.stdout, out.stderr
    deadline = time.time() + 10
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.time() < deadline, "the run survived --stop"
        time.sleep(0.05)
