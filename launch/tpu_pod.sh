#!/usr/bin/env bash
# Run one varejax command on every worker of a multi-host TPU VM slice, detached from ssh.
#
#   launch/tpu_pod.sh --sync --install my-tpu us-central2-b \
#     "varejax sweep --config configs/sweep.py --workdir gs://bucket/sweep --config.base.model.infinity=..."
#   launch/tpu_pod.sh my-tpu us-central2-b \
#     "varejax erase --config configs/erase.py:church --workdir gs://bucket/church --config.mesh.shape='(1, 2, 8)'"
#   launch/tpu_pod.sh --logs RUN my-tpu us-central2-b     # follow worker 0's log (--worker N|all)
#   launch/tpu_pod.sh --stop RUN my-tpu us-central2-b     # stop RUN on every worker
#
# --sync     copies the committed HEAD of this checkout (git archive) to ~/varejax on every worker
# --install  makes ~/varejax/.venv there: pip install -r requirements.txt -e . plus $VAREJAX_TPU_PIP
#            (default "jax[tpu]"), with $VAREJAX_PYTHON (default python3, must be >= 3.11)
# --run NAME names the run (default: UTC date and time); logs go to ~/varejax/logs/NAME/worker.log on
#            each worker, with pid and exit_status beside it
# --dry-run  (or VAREJAX_DRY_RUN=1) prints every command it would run, shell-quoted, one per line, and
#            runs nothing
#
# The command runs under setsid + nohup with its output in the worker's log, so a dropped ssh connection
# does not stop it. Every worker runs the same program; varejax.parallel.distributed.initialize() finds
# the slice as JAX does (GCE metadata) and joins the workers (no coordinator variables needed).
# gcloud's own settings apply (e.g. CLOUDSDK_CORE_PROJECT for the project).
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $0 [--dry-run] [--sync] [--install] [--run NAME] TPU_NAME ZONE ['COMMAND']
       $0 [--dry-run] --logs RUN [--worker N|all] TPU_NAME ZONE
       $0 [--dry-run] --stop RUN TPU_NAME ZONE
EOF
  exit 2
}

dry_run=${VAREJAX_DRY_RUN:-0}
[[ $dry_run == 0 ]] || dry_run=1
sync=0 install=0 run=$(date -u +%Y%m%d-%H%M%S) logs= stop= worker=
while (($# > 0)) && [[ $1 == --* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --sync) sync=1 ;;
    --install) install=1 ;;
    --run) run=${2:?--run needs a NAME}; shift ;;
    --logs) logs=${2:?--logs needs a RUN}; shift ;;
    --stop) stop=${2:?--stop needs a RUN}; shift ;;
    --worker) worker=${2:?--worker needs N or all}; shift ;;
    *) usage ;;
  esac
  shift
done
(($# == 2 || $# == 3)) || usage
tpu_name=$1 zone=$2 command=${3:-}
for name in "$run" "$logs" "$stop"; do  # run names go into remote paths unquoted
  [[ $name =~ ^[A-Za-z0-9._-]*$ ]] || { echo "$0: run names are letters, digits, '.', '_', '-': $name" >&2; exit 2; }
done
if [[ -z $command && -z $logs && -z $stop ]] && ((!sync && !install)); then
  usage
fi

remote_dir='~/varejax'  # expanded by the worker's shell
quote() {  # the words as one shell line, each single-quoted only when it needs it (as Python's shlex.quote)
  local word words=() sq="'\"'\"'"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/$sq}'"); fi
  done
  echo "${words[*]}"
}
step() {  # one command: printed (dry run) or echoed to stderr and run
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}
on_workers() {  # on_workers WORKER REMOTE_COMMAND: ssh into the slice's workers
  step gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker="$1" --command "$2"
}

if [[ -n $logs ]]; then
  on_workers "${worker:-0}" "tail -n +1 -F $remote_dir/logs/$logs/worker.log"
  exit
fi
if [[ -n $stop ]]; then
  on_workers "${worker:-all}" "kill -- -\$(cat $remote_dir/logs/$stop/pid) && echo \"\$(hostname): stopped $stop\""
  exit
fi

if ((sync)); then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive="${TMPDIR:-/tmp}/varejax-$run.tar.gz"
  if ((!dry_run)) && [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    echo "$0: note: --sync sends the committed HEAD; uncommitted changes stay here" >&2
  fi
  step git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  step gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:varejax-$run.tar.gz" --zone "$zone" --worker=all
  on_workers all "mkdir -p $remote_dir && tar -xzf varejax-$run.tar.gz -C $remote_dir && rm varejax-$run.tar.gz"
  ((dry_run)) || rm -f "$archive"
fi

if ((install)); then
  read -r -a extra <<<"${VAREJAX_TPU_PIP-jax[tpu]}"  # words, never globbed
  on_workers all "cd $remote_dir && ${VAREJAX_PYTHON:-python3} -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -r requirements.txt -e . $(quote "${extra[@]}")"
fi

if [[ -n $command ]]; then
  log_dir="logs/$run"
  command_q=$(quote "$command")
  # The command is one argument of the inner `bash -c`, so its quotes arrive as typed; the outer bash
  # records its exit status. Everything is redirected: ssh returns at once, SIGHUP does not reach it.
  launch="cd $remote_dir || exit 1; mkdir -p $log_dir; if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi; "
  launch+="setsid nohup bash -c 'bash -c \"\$1\"; status=\$?; echo \"tpu_pod.sh: exit status \$status\"; "
  launch+="echo \$status > \"\$2\"' run $command_q $log_dir/exit_status > $log_dir/worker.log 2>&1 < /dev/null & "
  launch+="echo \$! > $log_dir/pid; echo \"\$(hostname): started $run, log $remote_dir/$log_dir/worker.log\""
  on_workers all "$launch"
  if ((!dry_run)); then
    echo "run $run started; follow it with: $0 --logs $run $tpu_name $zone   (stop: --stop $run)" >&2
  fi
fi
