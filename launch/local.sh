#!/usr/bin/env bash
# Run N processes of one command on this machine, joined over loopback as one multi-host JAX job.
#
#   launch/local.sh 2 "varejax erase --config configs/toy_circle.py:ci --workdir runs/w2"
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port), JAX_NUM_PROCESSES=N and its
# JAX_PROCESS_ID, one CPU device (JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES=1) and gloo collectives;
# varejax.parallel.distributed.initialize() joins them. Every output line is prefixed with "[rank] ".
# When a process fails, the others are stopped; the exit status is the first failure's (0 when all succeed).
set -uo pipefail
if [[ $# -ne 2 ]] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N 'COMMAND'" >&2
  exit 2
fi
n=$1 command=$2
port=${VAREJAX_COORDINATOR_PORT:-$(python3 -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

set -m  # each rank in its own process group, so that stopping one stops its children too
declare -A rank_of=()
pids=()
for ((rank = 0; rank < n; rank++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$rank"
    export JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$port"
    # one CPU device per process, whatever the caller's XLA_FLAGS force (pytest's conftest asks for 8)
    XLA_FLAGS=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")
    export XLA_FLAGS
    export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=1 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    bash -c "$command" 2>&1 | sed -u "s/^/[$rank] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
  rank_of[$!]=$rank
done
set +m  # no job notices on stderr (the process groups stay)

stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null
  done
}
trap 'stop_all; exit 130' INT TERM

status=0
remaining=$n
while ((remaining > 0)); do
  done_pid=
  wait -n -p done_pid
  rc=$?
  [[ -z ${done_pid:-} ]] && break
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch/local.sh: rank ${rank_of[$done_pid]} exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
wait
exit "$status"
