#!/usr/bin/env bash
# Submit the sweep of scripts/sweep.sh to slurm: one job array per step over the sweep's (size, seed) cells,
# chained with dependencies
#     sft -> reward -> ppo, dpo (and rloo: --stages "sft reward ppo rloo dpo judge figures") -> judge -> figures
# Each array task runs `scripts/sweep.sh <sweep args> --sizes SIZE --seeds SEED --stages STEP` (scripts/slurm/
# array_task.sh), so slurm runs exactly the commands of the local sweep. Submit from an environment where the
# package is installed (the jobs inherit it, and OPENAI_API_KEY for the judge).
#
#   scripts/slurm/submit.sh                                   # Pythia 1b 2.8b 6.9b x 4 seeds: 6 arrays of 12 tasks
#   scripts/slurm/submit.sh --sizes 1b --seeds "44413 55513" --sweep_args "--dataset me/tldr_processed"
#   scripts/slurm/submit.sh --stages "ppo dpo judge figures"  # resume: earlier steps are done
#   scripts/slurm/submit.sh --dry_run                         # print the sbatch commands, submit nothing
#   scripts/slurm/submit.sh --gpus 4 --cpus_per_gpu 16        # a 4-GPU node (accelerate gets --num_processes 4)
#   scripts/slurm/submit.sh --cpu_only --cpus 2 --sweep_args "--embedded --reduced"   # the embedded sweep on CPUs
# Training steps get --signal=B:USR1@600 and --requeue: a task warned of its end checkpoints, requeues itself and
# resumes (scripts/slurm/array_task.sh, sweep.sh --resume auto).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
STEPS="sft reward ppo rloo dpo judge figures"
DEFAULT_STEPS="sft reward ppo dpo judge figures"

usage() {
  cat <<'EOF'
usage: scripts/slurm/submit.sh [options]

  --sizes "A B"          model sizes (default: those of scripts/sweep.sh)
  --seeds "A B"          seeds (default: those of scripts/sweep.sh)
  --sweep_args "..."     more scripts/sweep.sh flags for every task, e.g. "--sweep_dir sweeps/pythia --dataset me/tldr"
                         (split at spaces: write lists with commas, e.g. "--embedded --sizes tiny-pythia-s,tiny-pythia-m")
  --stages "A B"         steps to submit (default: sft reward ppo dpo judge figures; add rloo for RLOO / GRPO); a step
                         depends on the nearest submitted steps before it
  --dependency TYPE      afterok (default): a step starts when every task of the previous step succeeded;
                         aftercorr: array task i starts when task i of the previous step succeeded (figures still
                         waits for every judge task)
  --log_dir DIR          slurm output files (default: sweeps/slurm_logs)
  --sbatch_args "..."    more sbatch options for every job (partition, account, qos, time)
  --gpus N               GPUs per training task (default 8, the paper's node; N != 8 also passes --num_processes N
                         to sweep.sh: the global batches stay the paper's)
  --cpus_per_gpu N       CPUs per GPU of a training task (default 10)
  --no_exclusive         do not ask for the whole node (default: --exclusive)
  --cpu_only             no GPUs: training tasks ask for --cpus CPUs (the embedded sweep, e.g. on a CPU partition)
  --cpus N               CPUs per training task with --cpu_only (default 4)
  --dry_run              print the sbatch commands with made-up job ids, submit nothing
  -h, --help             this help
EOF
}

die() {
  echo "submit.sh: $*" >&2
  exit 2
}

sizes="" seeds="" sweep_args="" stages=$DEFAULT_STEPS dependency=afterok log_dir=sweeps/slurm_logs sbatch_args="" dry_run=0
gpus=8 cpus_per_gpu=10 exclusive=1 cpu_only=0 cpus=4  # the paper's node: 8 GPUs, 10 CPUs each, the whole node
while (($#)); do
  case $1 in
    --sizes | --seeds | --sweep_args | --stages | --dependency | --log_dir | --sbatch_args | --gpus | --cpus_per_gpu | --cpus)
      [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
      name=${1#--}
      printf -v "$name" '%s' "$2"
      shift 2
      ;;
    --dry_run) dry_run=1; shift ;;
    --no_exclusive) exclusive=0; shift ;;
    --cpu_only) cpu_only=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
stages=${stages//,/ }
for value in "$gpus" "$cpus_per_gpu" "$cpus"; do
  [[ $value =~ ^[1-9][0-9]*$ ]] || die "--gpus, --cpus_per_gpu and --cpus take a positive integer, not '$value'"
done
[[ $dependency == afterok || $dependency == aftercorr ]] || die "--dependency must be afterok or aftercorr, not '$dependency'"
for step in $stages; do
  [[ " $STEPS " == *" $step "* ]] || die "unknown step '$step'; choose from: $STEPS"
done

# Every task gets the same sweep.sh flags; the cells (and so the array size) come from sweep.sh itself.
# Lists inside SWEEP_ARGS are comma-separated: it is split at spaces.
SWEEP_ARGS=$sweep_args
[[ -z $sizes ]] || SWEEP_ARGS+=" --sizes $(tr -s ' ,' ',' <<<"$sizes" | sed 's/^,//; s/,$//')"
[[ -z $seeds ]] || SWEEP_ARGS+=" --seeds $(tr -s ' ,' ',' <<<"$seeds" | sed 's/^,//; s/,$//')"
((cpu_only || gpus == 8)) || [[ " $SWEEP_ARGS " == *" --num_processes "* ]] || SWEEP_ARGS+=" --num_processes $gpus"
SWEEP_ARGS=$(xargs <<<"$SWEEP_ARGS")  # spaces trimmed
read -r -a args <<<"$SWEEP_ARGS"
cells=$(bash scripts/sweep.sh ${args[@]+"${args[@]}"} --list_cells) || die "scripts/sweep.sh refused the sweep arguments '$SWEEP_ARGS'"
bash scripts/sweep.sh ${args[@]+"${args[@]}"} --stages "sft reward ppo dpo judge figures" --dry_run >/dev/null ||
  die "scripts/sweep.sh refused the sweep arguments '$SWEEP_ARGS'"
num_cells=$(wc -l <<<"$cells")
export SWEEP_ARGS
if ((!dry_run)); then
  command -v sbatch >/dev/null || die "sbatch not found: run this on a slurm login node (or use --dry_run)"
  mkdir -p "$log_dir"
fi
read -r -a extra <<<"$sbatch_args"

parents() { # the steps a step waits for
  case $1 in
    reward) echo sft ;;
    ppo | rloo | dpo) echo reward ;;
    judge) # RLOO only when submitted: its table is optional for the judge step
      echo ppo dpo
      [[ " $stages " != *" rloo "* ]] || echo rloo
      ;;
    figures) echo judge ;;
  esac
}
job_ids() { # step -> job ids of its nearest submitted ancestors
  local parent id
  for parent in $(parents "$1"); do
    id=job_$parent
    if [[ -n ${!id:-} ]]; then echo "${!id}"; else job_ids "$parent"; fi
  done
}

# The training steps' resources: the .sbatch files hold the paper's node; other resources are written into copies
# (sbatch cannot unset a GPU request from its command line: it refuses a GPU count of 0).
sbatch_file() { # step -> the file to submit
  local file="scripts/slurm/$1.sbatch" copy
  if [[ ! " sft reward ppo rloo dpo " == *" $1 "* ]] || ((!cpu_only && gpus == 8 && cpus_per_gpu == 10 && exclusive)); then
    echo "$file"
    return
  fi
  copy="$resources_dir/$1.sbatch"
  mkdir -p "$resources_dir"
  if ((cpu_only)); then
    sed -e '/^#SBATCH --gpus-per-task=/d' -e '/^#SBATCH --cpus-per-gpu=/d' -e '/^#SBATCH --exclusive/d' \
      -e "s/^#SBATCH --ntasks=1\$/#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=$cpus/" "$file" >"$copy"
  else
    sed -e "s/^#SBATCH --gpus-per-task=.*/#SBATCH --gpus-per-task=$gpus/" \
      -e "s/^#SBATCH --cpus-per-gpu=.*/#SBATCH --cpus-per-gpu=$cpus_per_gpu/" "$file" >"$copy"
    ((exclusive)) || sed -i '/^#SBATCH --exclusive/d' "$copy"
  fi
  echo "$copy"
}
resources_dir="$log_dir/sbatch"  # the copies (written by --dry_run too, to be read)

fake_id=1000
echo "# $num_cells cells (size seed): $(tr '\n' ',' <<<"$cells" | sed 's/,$//; s/,/, /g')"
for step in $STEPS; do
  [[ " $stages " == *" $step "* ]] || continue
  command=(sbatch --parsable --export=ALL)
  if [[ $step == figures ]]; then
    command+=(--output "$log_dir/%x_%j.out")
    type=afterok
  else
    command+=(--array "0-$((num_cells - 1))" --output "$log_dir/%x_%A_%a.out")
    type=$dependency
  fi
  ids=$(job_ids "$step" | sort -u | tr '\n' ':' | sed 's/:$//')
  [[ -z $ids ]] || command+=("--dependency=$type:$ids")
  command+=(${extra[@]+"${extra[@]}"} "$(sbatch_file "$step")")
  if ((dry_run)); then
    fake_id=$((fake_id + 1))
    id=$fake_id
    printf -v line '%q ' "${command[@]}"
    echo "SWEEP_ARGS=$(printf '%q' "$SWEEP_ARGS") ${line% }  # -> job $id"
  else
    id=$("${command[@]}")
    id=${id%%;*}  # --parsable prints "id" or "id;cluster"
    echo "$step: job $id"
  fi
  printf -v "job_$step" '%s' "$id"
done
