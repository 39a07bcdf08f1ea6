#!/usr/bin/env bash
# Run one varejax command on every worker of a multi-host TPU VM slice.
#
#   launch/tpu_pod.sh my-tpu us-central2-b "varejax erase --config configs/sweep.py --workdir gs://bucket/run1"
#
# Every host runs the same program; varejax.parallel.distributed.initialize() joins them through
# jax.distributed (TPU VMs need no coordinator flags). The repo is assumed checked out and installed
# at ~/varejax on each worker (see README, "Pods and clusters").
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE 'COMMAND'" >&2
  exit 2
fi
tpu_name=$1 zone=$2 command=$3
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all \
  --command "cd ~/varejax && source .venv/bin/activate && $command"
