#!/usr/bin/env bash
# One task of a slurm array over the sweep's cells: SLURM_ARRAY_TASK_ID picks the (size, seed) cell, in the order of
# `scripts/sweep.sh --list_cells`, and scripts/sweep.sh runs STAGE for that cell (so slurm runs exactly the commands
# of the local sweep, and a requeued task skips the stages already done).
#   usage: scripts/slurm/array_task.sh STAGE        env: SLURM_ARRAY_TASK_ID, SWEEP_ARGS (sweep.sh flags, set by submit.sh)
set -euo pipefail
stage=${1:?usage: scripts/slurm/array_task.sh STAGE}
task=${SLURM_ARRAY_TASK_ID:?SLURM_ARRAY_TASK_ID is not set: submit the sweep with scripts/slurm/submit.sh}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
read -r -a sweep_args <<<"${SWEEP_ARGS:-}"
cell=$(bash scripts/sweep.sh ${sweep_args[@]+"${sweep_args[@]}"} --list_cells | sed -n "$((task + 1))p")
if [[ -z $cell ]]; then
  echo "array_task.sh: array task $task has no cell (SWEEP_ARGS: ${SWEEP_ARGS:-})" >&2
  exit 2
fi
read -r size seed <<<"$cell"
echo "array task $task: size $size, seed $seed, stage $stage" >&2
# Preemption: the sbatch files ask for --signal=B:USR1@<seconds> (this shell) and --requeue. The signal goes on to
# sweep.sh, which has the running stage checkpoint at its next update boundary and exits 124 (core.REQUEUE_EXIT_CODE);
# the task then requeues itself, and the requeued task's sweep.sh skips finished stages and resumes the stopped one.
bash scripts/sweep.sh ${sweep_args[@]+"${sweep_args[@]}"} --sizes "$size" --seeds "$seed" --stages "$stage" &
sweep_pid=$!
trap 'echo "array_task.sh: preemption signal, forwarded to sweep.sh" >&2; kill -USR1 "$sweep_pid" 2>/dev/null || true' USR1 TERM
status=0
wait "$sweep_pid" || status=$?
while ((status > 128)) && kill -0 "$sweep_pid" 2>/dev/null; do  # the trap interrupted the wait
  status=0
  wait "$sweep_pid" || status=$?
done
if ((status == 124)) && [[ -n ${SLURM_JOB_ID:-} ]]; then
  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  echo "array_task.sh: $stage stopped after a checkpoint; requeueing ${job:-$SLURM_JOB_ID}" >&2
  scontrol requeue "${job:-$SLURM_JOB_ID}"
fi
exit "$status"
