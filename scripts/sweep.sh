#!/usr/bin/env bash
# Sweep over model sizes x seeds: for each (size, seed) cell, SFT -> reward model -> PPO and DPO, the paper's
# scaling experiment (SPEC: Pythia 1b / 2.8b / 6.9b deduped x seeds 44413 55513 66613 77713).
#
#   scripts/sweep.sh                                  # Pythia on one 8-GPU node: accelerate + DeepSpeed ZeRO-2 bf16
#   scripts/sweep.sh --embedded                       # the same sweep on the embedded sizes, offline on CPU
#   scripts/sweep.sh --embedded --sizes tiny-pythia-s --seeds 1 --reduced    # a smoke test, 1-2 minutes
#   scripts/sweep.sh --stages "judge figures"         # then the judge and the figures of the sweep
#   scripts/sweep.sh --dry_run                        # print every command, run nothing
#
# Layout (judge.py and the figures read it; keep it):
#   {sweep_dir}/{size}/seed{seed}/{sft,reward,ppo,rloo,dpo}/   run directories (metrics.json, query_responses_*, model/)
#   {sweep_dir}/{size}/seed{seed}/judge/{sft,ppo,rloo,dpo}/    judge.py outputs per policy (--stages ... judge)
#   {sweep_dir}/figures/                                  paper_figures.py output (--stages ... figures)
#   {sweep_dir}/logs/                                     one log per stage run, timings.tsv
# A finished stage (metrics.json and no FAILED.json, which a run that failed after creating its folder leaves) is
# skipped (a resumed or requeued sweep continues where it stopped); --force reruns it. A stage stopped mid-run
# continues from its newest checkpoint (--resume auto, checkpoint.py). SIGUSR1 / SIGTERM to this script are
# forwarded to the running stage (SIGUSR1), which checkpoints at its next update boundary; the sweep then exits 124
# (core.REQUEUE_EXIT_CODE) for scripts/slurm/array_task.sh to requeue. scripts/slurm/submit.sh runs
# the same cells and commands as slurm array jobs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export HF_DATASETS_DISABLE_PROGRESS_BARS="${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}" TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}
PACKAGE=summarize_from_feedback_details
PYTHIA_SIZES="1b 2.8b 6.9b"
ALL_STAGES="sft reward ppo rloo dpo judge figures"

usage() {
  cat <<'EOF'
usage: scripts/sweep.sh [options]

  --sizes "A B"            model sizes, separated by spaces or commas (default: 1b 2.8b 6.9b, i.e.
                           EleutherAI/pythia-{size}-deduped; --embedded: tiny-pythia-s tiny-pythia-m tiny-pythia-l)
  --seeds "A B"            seeds (default: 44413 55513 66613 77713)
  --stages "A B"           stages to run per cell, always in the order sft reward ppo rloo dpo judge, then figures
                           once for the sweep (default: sft reward ppo dpo; add rloo for RLOO / GRPO, rloo.py)
  --embedded               the embedded offline task on CPU (builds its assets and dataset when missing)
  --sweep_dir DIR          where the cells go (default: sweeps/pythia, or sweeps/embedded with --embedded)
  --dataset PATH|HUB_ID    processed data of tldr_dataset (default: datasets/tldr; embedded: datasets/embedded)
  --embedded_dir DIR       embedded assets (default: assets/embedded)
  --accelerate_config FILE Pythia launcher config (default: configs/accelerate/deepspeed_zero2_bf16.yaml)
  --num_processes N        override the config's 8 processes (the global batches stay those of the paper)
  --jobs N                 run N cells at a time (default 1; the embedded sweep on a CPU with cores to spare;
                           needs bash >= 4.3)
  --reduced                smoke-test lengths: one or two updates per stage and a few evaluation samples
  --track                  log the stages to Weights & Biases
  --force                  rerun stages whose metrics.json exists
  --resume MODE            the training stages' --resume: auto (default: continue a stage stopped mid-run from its
                           newest checkpoint) or none (start it again)
  --save_every N           the training stages write a checkpoint every N updates (default: only when signalled)
  --lora_r R               fewer GPUs: every trained stage (sft reward ppo rloo dpo) trains LoRA adapters of rank R
                           (default: full fine-tuning, the paper's); see README "Fewer GPUs"
  --lora_lr LR             with --lora_r: the learning rate of every trained stage (LoRA wants a larger one than the
                           presets' full fine-tuning rates; default: the presets')
  --gradient_checkpointing every trained model recomputes its activations in the backward (less memory, slower)
  --list_cells             print the cells ("size seed", one per line) and exit (slurm array tasks use it)
  --dry_run                print the commands (one per line, shell-quoted) and run nothing
  -h, --help               this help
EOF
}

die() {
  echo "sweep.sh: $*" >&2
  exit 2
}

sizes="" seeds="44413 55513 66613 77713" stages="sft reward ppo dpo" embedded=0 sweep_dir="" dataset=""
embedded_dir="assets/embedded" accelerate_config="configs/accelerate/deepspeed_zero2_bf16.yaml" num_processes=""
jobs=1 reduced=0 track=0 force=0 list_cells=0 dry_run=0 resume=auto save_every="" lora_r="" lora_lr=""
gradient_checkpointing=0
while (($#)); do
  case $1 in
    --sizes | --seeds | --stages | --sweep_dir | --dataset | --embedded_dir | --accelerate_config | --num_processes | --jobs | \
      --resume | --save_every | --lora_r | --lora_lr)
      [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
      name=${1#--}
      printf -v "$name" '%s' "$2"
      shift 2
      ;;
    --embedded) embedded=1; shift ;;
    --reduced) reduced=1; shift ;;
    --gradient_checkpointing) gradient_checkpointing=1; shift ;;
    --track) track=1; shift ;;
    --force) force=1; shift ;;
    --list_cells) list_cells=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# ---- defaults of the mode, then every input checked before any work starts (lists: spaces or commas)
sizes=${sizes//,/ } seeds=${seeds//,/ } stages=${stages//,/ }
if ((embedded)); then
  known_sizes=$("$PYTHON" -c "from $PACKAGE.embedded import MODEL_SIZES; print(*(s.name for s in MODEL_SIZES))")
  preset=embedded
  : "${sweep_dir:=sweeps/embedded}" "${dataset:=datasets/embedded}"
else
  known_sizes=$PYTHIA_SIZES
  preset=pythia
  : "${sweep_dir:=sweeps/pythia}" "${dataset:=datasets/tldr}"
fi
: "${sizes:=$known_sizes}"
for size in $sizes; do
  [[ " $known_sizes " == *" $size "* ]] || die "unknown size '$size' for the $preset sweep; choose from: $known_sizes"
done
for seed in $seeds; do
  [[ $seed =~ ^[0-9]+$ ]] || die "seed '$seed' is not a non-negative integer"
done
[[ $resume == auto || $resume == none ]] || die "--resume must be auto or none, not '$resume'"
[[ -z $save_every || $save_every =~ ^[0-9]+$ ]] || die "--save_every '$save_every' is not a non-negative integer"
[[ -z $lora_r || $lora_r =~ ^[1-9][0-9]*$ ]] || die "--lora_r '$lora_r' is not a positive integer"
[[ -z $lora_lr || $lora_lr =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "--lora_lr '$lora_lr' is not a positive number"
[[ -z $lora_lr || -n $lora_r ]] || die "--lora_lr needs --lora_r (it is the learning rate of the LoRA runs)"
for stage in $stages; do
  [[ " $ALL_STAGES " == *" $stage "* ]] || die "unknown stage '$stage'; choose from: $ALL_STAGES"
done
[[ -n ${sizes// /} && -n ${seeds// /} && -n ${stages// /} ]] || die "--sizes, --seeds and --stages must not be empty"
[[ -z $num_processes || $num_processes =~ ^[1-9][0-9]*$ ]] || die "--num_processes '$num_processes' is not a positive integer"
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "--jobs '$jobs' is not a positive integer"
((jobs == 1 || embedded)) || die "--jobs $jobs needs --embedded: a Pythia stage takes the whole node"

if ((list_cells)); then
  for size in $sizes; do
    for seed in $seeds; do echo "$size $seed"; done
  done
  exit 0
fi
if ((!embedded && !dry_run)); then
  [[ -f $accelerate_config ]] || die "--accelerate_config $accelerate_config does not exist"
  # A hub id is owner/name; anything else must be a directory written by `tldr_dataset pythia`.
  if [[ ! -d $dataset && ! $dataset =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$ ]]; then
    die "--dataset $dataset does not exist: build it with 'python -m $PACKAGE.tldr_dataset pythia --output_dir $dataset' or pass a hub id"
  fi
fi

# ---- per-size settings for one 8-GPU node (80 GB), bf16, ZeRO-2
# The authors' slurm settings: SFT, RM and DPO train with 1 example per GPU (gradient accumulation fills the
# global batch: 16 steps for SFT's 128, 8 for the 64 of RM and DPO); evaluation batches per GPU 4 (SFT) and
# 8 / 1 / 1 for 1B / 2.8B / 6.9B (RM, DPO; PPO takes the same, our choice). PPO rollout forward batch /
# gradient accumulation / micro-batch: 1B 64/4/16, 2.8B 32/16/4, 6.9B 4/64/1 (the stage derives the
# accumulation from batch 512 = micro x accumulation x 8 processes). At 6.9B the frozen reference policy and
# reward model run as ZeRO-3 engines with their parameters offloaded to CPU (SPEC Detail 8).
pythia_args() { # stage size -> the per-size arguments, printed one per line
  local stage=$1 size=$2 eval_batch rollout micro
  case $size in
    1b) eval_batch=8 rollout=64 micro=16 ;;
    2.8b) eval_batch=1 rollout=32 micro=4 ;;
    6.9b) eval_batch=1 rollout=4 micro=1 ;;
  esac
  printf '%s\n' --deepspeed
  case $stage in
    sft) printf '%s\n' --base_model "EleutherAI/pythia-$size-deduped" --local_micro_batch_size 1 --local_eval_batch_size 4 ;;
    reward | dpo) printf '%s\n' --local_micro_batch_size 1 --local_eval_batch_size "$eval_batch" ;;
    ppo | rloo)
      printf '%s\n' --local_rollout_forward_batch_size "$rollout" --local_micro_batch_size "$micro" \
        --local_eval_batch_size "$eval_batch"
      if [[ $size == 6.9b ]]; then
        printf '%s\n' --frozen_models_config configs/accelerate/deepspeed_zero3_offload.yaml
      fi
      ;;
  esac
}

# --reduced: one or two updates per stage and a few evaluation samples. Pythia: the global batch of each preset;
# embedded: batches of 16 (a quarter of the seconds of the presets' 32, PPO's 64): 2 updates, PPO 1.
reduced_args() { # stage -> arguments, one per line
  local stage=$1 episodes samples
  if ((embedded)); then
    case $stage in ppo | rloo) episodes=16 ;; *) episodes=32 ;; esac
    samples=8
    printf '%s\n' --batch_size 16 --local_micro_batch_size 16
  else
    case $stage in sft) episodes=128 ;; ppo | rloo) episodes=512 ;; *) episodes=64 ;; esac
    samples=64
  fi
  printf '%s\n' --total_episodes "$episodes" --max_eval_samples "$samples"
  case $stage in
    reward) printf '%s\n' --normalization_samples "$episodes" --padding_check_samples "$samples" ;;
    ppo | rloo) if ((embedded)); then printf '%s\n' --local_rollout_forward_batch_size 16 --local_eval_batch_size "$samples"; fi ;;
  esac
}

# ---- the command of one stage of one cell, in the array CMD
# The judge compares one policy's validation table with the references: judge_command POLICY SIZE SEED.
# Pythia: the paper's LLM judge (judge.py's defaults: gpt-3.5-turbo-0125, both orders; OPENAI_API_KEY from the
# environment); embedded: the task's gold utility, offline. Each policy gets its own folder under {cell}/judge.
judge_command() {
  local policy=$1 cell="$sweep_dir/$2/seed$3" table
  table="$cell/$policy/query_responses_validation.csv"
  [[ $policy != sft ]] || table="$cell/sft/eval_query_responses_validation.csv"
  CMD=("$PYTHON" -m "$PACKAGE.judge" --table "$table" --output_dir "$cell/judge/$policy")
  ((!embedded)) || CMD+=(--judge gold)
}

stage_command() { # stage size seed
  local stage=$1 size=$2 seed=$3 cell="$sweep_dir/$2/seed$3" line
  if ((embedded)); then
    CMD=("$PYTHON" -m "$PACKAGE.$stage" embedded)
  else
    CMD=(accelerate launch --config_file "$accelerate_config")
    [[ -z $num_processes ]] || CMD+=(--num_processes "$num_processes")
    CMD+=(-m "$PACKAGE.$stage" pythia)
  fi
  CMD+=(--dataset "$dataset" --output_dir "$cell" --run_name "$stage" --exp_name "${stage}_$size" --seed "$seed")
  case $stage in
    sft) ((!embedded)) || CMD+=(--base_model "$embedded_dir/models/$size") ;;
    reward) CMD+=(--sft_model_path "$cell/sft/model") ;;
    ppo | rloo | dpo) CMD+=(--sft_model_path "$cell/sft/model" --reward_model_path "$cell/reward/model") ;;
  esac
  if ((!embedded)); then
    while IFS= read -r line; do CMD+=("$line"); done < <(pythia_args "$stage" "$size")
  fi
  if ((reduced)); then
    while IFS= read -r line; do CMD+=("$line"); done < <(reduced_args "$stage")
  fi
  ((!track)) || CMD+=(--track)
  if [[ -n $lora_r ]]; then  # fewer GPUs (README "Fewer GPUs"): adapters instead of every weight
    CMD+=(--lora_r "$lora_r")
    [[ -z $lora_lr ]] || CMD+=(--lr "$lora_lr")
  fi
  ((!gradient_checkpointing)) || CMD+=(--gradient_checkpointing)
  CMD+=(--resume "$resume")  # a stage stopped mid-run continues from its newest checkpoint
  [[ -z $save_every ]] || CMD+=(--save_every "$save_every")
}

run() { # log_name command... : print it; unless --dry_run, run it with its output also in {sweep_dir}/logs
  local name=$1 start status line
  shift
  if ((dry_run)); then
    printf -v line '%q ' "$@"
    echo "${line% }"
    return
  fi
  ((!preempted)) || exit "$REQUEUE_EXIT_CODE"  # signalled between two stages: start no new one
  echo "+ $*"
  mkdir -p "$sweep_dir/logs"
  start=$(date +%s)
  # In the background, so that a signal reaches the trap below while the stage runs (bash runs traps between commands)
  "$@" > >(tee "$sweep_dir/logs/$name.log") 2>&1 &
  stage_pid=$!
  status=0
  wait "$stage_pid" || status=$?
  while ((status > 128)) && kill -0 "$stage_pid" 2>/dev/null; do  # a trapped signal interrupted the wait
    status=0
    wait "$stage_pid" || status=$?
  done
  stage_pid=""
  printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - start))" "$status" >>"$sweep_dir/logs/timings.tsv"
  if ((status == REQUEUE_EXIT_CODE || preempted)); then
    echo "sweep.sh: $name stopped after a checkpoint (status $status); rerun or requeue to continue it (--resume auto)" >&2
    exit "$REQUEUE_EXIT_CODE"
  fi
  ((status == 0)) || die "$name failed with status $status; its log: $sweep_dir/logs/$name.log"
}

# Preemption (slurm's --signal=B:USR1, or SIGTERM): SIGUSR1 to the running stage, which checkpoints at its next update
# boundary and exits REQUEUE_EXIT_CODE. A stage under a launcher (accelerate launch) gets it in every worker process.
REQUEUE_EXIT_CODE=124
stage_pid="" preempted=0
forward_preemption() {
  preempted=1
  [[ -n $stage_pid ]] || return 0
  local workers
  workers=$(pgrep -P "$stage_pid" -f "$PACKAGE" || true)
  echo "sweep.sh: preemption signal: SIGUSR1 to ${workers:-$stage_pid}" >&2
  # shellcheck disable=SC2086 # one argument per process id
  kill -USR1 ${workers:-$stage_pid} 2>/dev/null || true
}
trap forward_preemption USR1 TERM

note() { # a message; a comment line in --dry_run output
  if ((dry_run)); then echo "# $*"; else echo; echo "=== $* ($(($(date +%s) - sweep_start)) s) ==="; fi
}

sweep_start=$(date +%s)
wants() { [[ " $stages " == *" $1 "* ]]; }
cell_stages=""
for stage in sft reward ppo rloo dpo judge; do
  if wants "$stage"; then cell_stages+=" $stage"; fi
done

# ---- the embedded task's training stages need its assets (reused when built) and its processed dataset
if ((embedded)) && [[ -n ${cell_stages/ judge/} ]]; then
  note "embedded assets in $embedded_dir: task, tokenizer, models $sizes (reused when built)"
  # shellcheck disable=SC2086 # one argument per size
  run embedded_assets "$PYTHON" -m "$PACKAGE.embedded" --out_dir "$embedded_dir" --sizes $sizes
  if [[ -f $dataset/summary.json ]]; then
    note "dataset $dataset exists (reused)"
  else
    note "data stage -> $dataset"
    run data "$PYTHON" -m "$PACKAGE.tldr_dataset" embedded --embedded_dir "$embedded_dir" \
      --base_model "$embedded_dir/models/tiny-pythia-s" --sft_dataset "$embedded_dir/data/sft" \
      --preference_dataset "$embedded_dir/data/preference" --output_dir "$dataset"
  fi
fi

run_cell() { # size seed: the cell's stages in order
  local size=$1 seed=$2 stage run_dir policy
  for stage in $cell_stages; do
    run_dir="$sweep_dir/$size/seed$seed/$stage"
    if [[ $stage != judge && -f $run_dir/metrics.json && ! -f $run_dir/FAILED.json ]] && ((!force)); then
      note "skip $run_dir (finished: metrics.json and no FAILED.json; --force reruns it)"
      continue
    fi
    note "$size seed $seed: $stage -> $run_dir"
    if [[ $stage == judge ]]; then
      for policy in sft ppo rloo dpo; do
        # RLOO is judged when this sweep runs it or an earlier one did
        [[ $policy != rloo ]] || wants rloo || [[ -f $sweep_dir/$size/seed$seed/rloo/query_responses_validation.csv ]] || continue
        judge_command "$policy" "$size" "$seed"
        run "${size}_seed${seed}_judge_$policy" "${CMD[@]}"
      done
    else
      stage_command "$stage" "$size" "$seed"
      run "${size}_seed${seed}_$stage" "${CMD[@]}"
    fi
  done
}

if ((jobs == 1 || dry_run)); then
  for size in $sizes; do
    for seed in $seeds; do run_cell "$size" "$seed"; done
  done
else
  # Cells in parallel (the stages of a cell stay in order); each cell's output goes to logs/{size}_seed{seed}.out.
  # Each cell gets its share of the cores (torch would start a thread per core in every process and oversubscribe
  # the machine); a user's own OMP_NUM_THREADS wins.
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / jobs > 0 ? cores / jobs : 1))}
  mkdir -p "$sweep_dir/logs"
  failed=0 running=0
  for size in $sizes; do
    for seed in $seeds; do
      if ((running == jobs)); then
        wait -n || failed=1
        running=$((running - 1))
      fi
      ((failed)) && break 2  # start no new cell after a failure
      echo "cell $size seed $seed: started (output: $sweep_dir/logs/${size}_seed$seed.out)"
      run_cell "$size" "$seed" >"$sweep_dir/logs/${size}_seed$seed.out" 2>&1 &
      running=$((running + 1))
    done
  done
  while ((running > 0)); do
    wait -n || failed=1
    running=$((running - 1))
  done
  ((!failed)) || die "a cell failed; see the status column of $sweep_dir/logs/timings.tsv and its log"
fi

if wants figures; then
  note "figures of the sweep -> $sweep_dir/figures"
  run figures "$PYTHON" -m "$PACKAGE.paper_figures" --sweep_dir "$sweep_dir" --out_dir "$sweep_dir/figures"
fi
note "done"
