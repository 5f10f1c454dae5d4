#!/usr/bin/env bash
# A tiny "training" job that follows costmesh's job protocol:
#   - it resumes from $COSTMESH_RESUME_FROM when the scheduler hands one back;
#   - on SIGUSR1 it writes a checkpoint under $COSTMESH_CHECKPOINT_DIR and
#     reports it with one stdout line: COSTMESH_CHECKPOINT <path>;
#   - on SIGTERM it checkpoints, reports, and exits 0 (a clean stop).
# STEPS (default 1000000) and STEP_SECONDS (default 0.05) shape the run.
set -u
dir=${COSTMESH_CHECKPOINT_DIR:-/tmp/costmesh-train-$$}
step=0
if [ -n "${COSTMESH_RESUME_FROM:-}" ] && [ -f "$COSTMESH_RESUME_FROM" ]; then
  step=$(cat "$COSTMESH_RESUME_FROM")
  echo "resumed from $COSTMESH_RESUME_FROM at step $step"
fi
checkpoint() {
  mkdir -p "$dir"
  local f="$dir/step-$step.ckpt"
  echo "$step" > "$f.tmp" && mv "$f.tmp" "$f"
  echo "COSTMESH_CHECKPOINT $f"
}
trap checkpoint USR1
trap 'checkpoint; echo "stopped at step $step"; exit 0' TERM
# Printed once the handlers are in place (a signal before this would kill it).
echo "job ${COSTMESH_JOB_ID:-?} attempt ${COSTMESH_ATTEMPT:-?} on GPUs ${CUDA_VISIBLE_DEVICES:-none}: ready"
total=${STEPS:-1000000}
while [ "$step" -lt "$total" ]; do
  step=$((step + 1))
  sleep "${STEP_SECONDS:-0.05}" & wait $!
done
echo "finished $total steps"
