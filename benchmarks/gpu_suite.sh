#!/usr/bin/env bash
# The one command of a GPU session: every measurement of benchmarks/gpu_suite.py, results as JSON in $OUT.
#
#   bash benchmarks/gpu_suite.sh                  # on the GPU machine: Infinity-2B shapes, 1024 px
#   bash benchmarks/gpu_suite.sh --size tiny      # the CPU rehearsal (the same code path at test sizes)
#   GPU_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh   # only print the python and the command it would run
#
# Other arguments go to gpu_suite.py (e.g. --config.svare.batch=1). Environment:
#   OUT                        results folder (default runs/gpu_suite); gpu_suite.json and gpu_suite.log go there
#   GPU_SUITE_LIMIT_S          wall-clock limit of the whole script, setup included (default 470 s; a GPU session
#                              has 15 minutes of device time in all, so this leaves room for a second try)
#   JAX_COMPILATION_CACHE_DIR  persistent compilation cache (default .jax_cache/ in the repo; on for every command)
#   PYTHON                     the interpreter to try first
#   VAREJAX_UPSTREAM_INFINITY  an upstream Infinity checkout for the upstream stage (nothing is downloaded)
#   GPU_SUITE_FORCE_SETUP=1    take the "install the missing dependencies" path even when nothing is missing
#
# The python used is the first of $PYTHON, .venv/bin/python, python3, python that imports jax. Only when none
# does is a venv made (build/venv-gpu, jax[cuda12] when nvidia-smi is present); when jax imports but flax,
# optax, ml_collections, etils or absl do not, a venv on top of the system packages (keeping its jax) gets them.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
START_S=$(date +%s)
LIMIT_S="${GPU_SUITE_LIMIT_S:-470}"
OUT_DIR="${OUT:-$REPO/runs/gpu_suite}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.log"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$REPO/.jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

log() { echo "[gpu_suite.sh] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START_S )); }
: > "$LOG"
HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1; then HAS_GPU=1; fi
log "repo $REPO, out $OUT_DIR, limit ${LIMIT_S}s, gpu=$HAS_GPU, compilation cache $JAX_COMPILATION_CACHE_DIR"

DEPS_CHECK="import jax, flax, optax, ml_collections, varejax.erase.step, varejax.sample.sampler"
# On a GPU machine a python counts only if its jax sees the GPU (a carried CPU-only venv would run 2B on CPU).
JAX_PROBE="import jax"
if [ "$HAS_GPU" = 1 ]; then JAX_PROBE="import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')"; fi
PY=""
for cand in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
  [ -n "$cand" ] || continue
  command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c "$JAX_PROBE" >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
  log "$cand: no jax$([ "$HAS_GPU" = 1 ] && echo ' that sees the GPU')"
done

REQS="$REPO/build/gpu-suite-requirements.txt"
write_reqs() {  # $1: 1 to add jax. Only what the suite imports, pinned as in requirements.txt.
  mkdir -p "$REPO/build"
  grep -E '^(flax|optax|ml_collections|etils\[epath\]|absl-py)==' "$REPO/requirements.txt" > "$REQS"
  if [ "$1" = 1 ]; then
    if [ "$HAS_GPU" = 1 ]; then echo "jax[cuda12]==0.10.2" >> "$REQS"; else echo "jax==0.10.2" >> "$REQS"; fi
  fi
}
pip_install() {  # $1: the python whose environment gets $REQS (an installed jax satisfies flax's and stays)
  log "installing into $("$1" -c 'import sys; print(sys.prefix)'): $(tr '\n' ' ' < "$REQS")"
  timeout 300 "$1" -m pip install -q --retries 1 --timeout 10 -r "$REQS" 2>&1 | tail -5 | tee -a "$LOG"
}
make_venv() {  # $1: the base python; $2: extra venv flag. Sets PY to the venv's python.
  local venv="$REPO/build/venv-gpu"
  [ -x "$venv/bin/python" ] || "$1" -m venv $2 "$venv" || return 1
  PY="$venv/bin/python"
}

if [ -z "$PY" ]; then
  log "no python here has a usable jax: making build/venv-gpu"
  BASE="$(command -v python3 || command -v python)" || { log "no python3 at all"; exit 3; }
  write_reqs 1; make_venv "$BASE" "" && pip_install "$PY" || { log "venv setup failed"; exit 3; }
elif [ "${GPU_SUITE_FORCE_SETUP:-0}" = 1 ] || ! "$PY" -c "$DEPS_CHECK" >/dev/null 2>&1; then
  write_reqs 0
  if "$PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
    log "$PY (a venv) imports jax but not all of flax, optax, ml_collections, etils: installing them there"
    pip_install "$PY"
  else
    log "$PY imports jax but not all of flax, optax, ml_collections, etils: a venv over its site-packages"
    make_venv "$PY" --system-site-packages && pip_install "$PY" || { log "venv setup failed"; exit 3; }
  fi
fi
if ! VERSIONS=$("$PY" -c "$DEPS_CHECK, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)" 2>>"$LOG")
then log "$PY still cannot import varejax's dependencies"; exit 3; fi
log "python $PY: $VERSIONS"

if [ -n "${VAREJAX_UPSTREAM_INFINITY:-}" ] && [ "$HAS_GPU" = 1 ] && ! "$PY" -c "import flash_attn" >/dev/null 2>&1; then
  # flash-attn ships no binary wheels on PyPI as a rule; try one quickly, never a source build.
  log "upstream needs flash-attn: trying a binary wheel (60 s at most)"
  timeout 60 "$PY" -m pip install -q --retries 1 --timeout 10 --only-binary=:all: flash-attn 2>&1 | tail -2 | tee -a "$LOG"
fi

REMAINING=$(( LIMIT_S - $(elapsed) ))
# The suite stops starting stages 25 s before the kill, so its last write is a complete JSON file.
BUDGET=$(( REMAINING - 25 ))
CMD=("$PY" "$REPO/benchmarks/gpu_suite.py" --out "$OUT_DIR/gpu_suite.json" "--config.budget_s=$BUDGET" "$@")
if [ "${GPU_SUITE_DRY_RUN:-0}" = 1 ]; then
  echo "python: $PY"
  echo "command: ${CMD[*]}"
  echo "limit_s: $REMAINING"
  exit 0
fi
if [ "$BUDGET" -lt 60 ]; then log "only ${REMAINING}s left after setup: not starting"; exit 4; fi
log "running (${REMAINING}s left): ${CMD[*]}"
timeout --signal=TERM --kill-after=15 "$REMAINING" "${CMD[@]}" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then log "killed at the ${LIMIT_S}s limit: $OUT_DIR/gpu_suite.json has the stages that finished"; fi
log "exit $RC after $(elapsed)s; results $OUT_DIR/gpu_suite.json"
exit "$RC"
