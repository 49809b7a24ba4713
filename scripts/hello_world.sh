#!/usr/bin/env bash
# The whole pipeline on the embedded default: offline, CPU only, the same code path as a Pythia run.
# Stages join this script as they land: data -> SFT -> RM -> PPO -> DPO -> judge -> figures.
# Outputs: assets/embedded/ (task, tokenizer, tiny models), datasets/embedded/ (processed data + figures),
#          runs/{sft,reward,ppo,dpo}_embedded/ (models, query_responses tables, metrics.json, TensorBoard logs),
#          runs/hello_world/ (the runs as one sweep cell, the gold judge's verdicts, figures/).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_DATASETS_DISABLE_PROGRESS_BARS="${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}" TOKENIZERS_PARALLELISM=false
start=$(date +%s)
mkdir -p runs
timings=runs/hello_world_seconds.txt
: > "$timings"
last=$start
current=""
stage() {  # closes the previous stage's timing line, opens the next
  local now; now=$(date +%s)
  [ -n "$current" ] && printf '%-10s %5d s\n' "$current" $((now - last)) >> "$timings"
  current=${1%%:*}; current=${current%% *}; last=$now
  echo; echo "=== $1 ($((now - start)) s) ==="
}

stage "embedded assets: synthetic TL;DR-like task, BPE tokenizer, tiny Pythia models (reused when built)"
python -m summarize_from_feedback_details.embedded --out_dir assets/embedded --sizes tiny-pythia-s >/dev/null

stage "data: tldr_dataset.py (Details 1-5) -> datasets/embedded"
python -m summarize_from_feedback_details.tldr_dataset embedded --embedded_dir assets/embedded --output_dir datasets/embedded

stage "SFT: sft.py (Details 7, 9) on tiny-pythia-s -> runs/sft_embedded"
python -m summarize_from_feedback_details.sft embedded --run_name sft_embedded --max_eval_samples 200 --logging_steps 50

stage "reward model: reward.py (Details 10-16) -> runs/reward_embedded"
python -m summarize_from_feedback_details.reward embedded --sft_model_path runs/sft_embedded/model --run_name reward_embedded \
    --logging_steps 50

stage "PPO: ppo.py (Details 20-25, P-1..P-6) from SFT + RM -> runs/ppo_embedded"
python -m summarize_from_feedback_details.ppo embedded --sft_model_path runs/sft_embedded/model \
    --reward_model_path runs/reward_embedded/model --run_name ppo_embedded --max_eval_samples 200

stage "DPO: dpo.py (baseline, Detail 19) from SFT -> runs/dpo_embedded"
python -m summarize_from_feedback_details.dpo embedded --sft_model_path runs/sft_embedded/model \
    --reward_model_path runs/reward_embedded/model --run_name dpo_embedded --max_eval_samples 200 --logging_steps 50

stage "judge: gold utility (offline judge.py) -> runs/hello_world/tiny-pythia-s/seed1/judge"
# One cell of the sweep layout that paper_figures reads ({size}/seed{seed}/{stage}), the stage runs linked in.
cell=runs/hello_world/tiny-pythia-s/seed1
mkdir -p "$cell/judge"
for run in sft reward ppo dpo; do ln -sfn "../../../${run}_embedded" "$cell/$run"; done
gold_judge() { python -m summarize_from_feedback_details.judge --judge gold --output_dir "$cell/judge" "$@"; }
gold_judge --table "$cell/ppo/query_responses_validation.parquet" --output_name ppo_vs_reference_judged_gold
gold_judge --table "$cell/ppo/query_responses_validation.parquet" \
    --baseline_table "$cell/ppo/sft_query_responses_validation.parquet" --output_name ppo_vs_sft_judged_gold
gold_judge --table "$cell/dpo/query_responses_validation.parquet" --output_name dpo_vs_reference_judged_gold

stage "figures: paper_figures.py (win rates, ROUGE, RM accuracy and calibration, PPO curves, data) -> runs/hello_world/figures"
python -m summarize_from_feedback_details.paper_figures --sweep_dir runs/hello_world --out_dir runs/hello_world/figures

stage "done"
HELLO_WORLD_CELL="$cell" python - <<'PY'
import json
import os
manifest = json.load(open("assets/embedded/manifest.json"))
data = json.load(open("datasets/embedded/summary.json"))
sft = json.load(open("runs/sft_embedded/metrics.json"))
rm = json.load(open("runs/reward_embedded/metrics.json"))
ppo = json.load(open("runs/ppo_embedded/metrics.json"))
dpo = json.load(open("runs/dpo_embedded/metrics.json"))
print("models:", {name: f"{m['parameters']:,} params, pre-train loss {m['final_loss']}" for name, m in manifest["models"].items()})
print("data: SFT rows", data["sft_rows"], "preference rows", data["preference_rows"], "length maxima", data["length_maxima"])
print(f"{'':24}{'validation':>12}{'test':>10}")
for label, key in (("ROUGE-L base model", "base/{}/rougeL"), ("ROUGE-L SFT", "eval/{}/rougeL"),
                   ("SFT response tokens", "eval/{}/response_token_len"), ("SFT EOS rate", "eval/{}/eos_rate")):
    print(f"{label:24}{sft[key.format('validation')]:>12.3f}{sft[key.format('test')]:>10.3f}")
print(f"RM accuracy: TL;DR {rm['eval/accuracy/split/validation']:.3f}, CNN/DM {rm['eval/accuracy/split/validation_cnndm']:.3f}; "
      f"DPO implicit reward accuracy: TL;DR {dpo['eval/accuracy/split/validation']:.3f}")
print(f"{'validation (T 0.01)':24}{'RM score':>10}{'gold win':>10}{'gold util':>10}{'tokens':>8}{'EOS':>6}")
for label, m, prefix in (("SFT", ppo, "sft"), ("PPO", ppo, "eval"), ("DPO (up to 128 tokens)", dpo, "eval")):
    v = lambda k: m[f"{prefix}/validation/{k}"]
    print(f"{label:24}{v('score'):>10.3f}{v('gold_win_rate'):>10.3f}{v('gold_utility'):>10.2f}{v('response_token_len'):>8.1f}{v('eos_rate'):>6.2f}")
print(f"PPO: {ppo['num_updates']} updates, {ppo['train/seconds_per_update']} s/update, final KL {ppo['last/objective/kl']:.2f} nats")
for name, stem in (("PPO vs references", "ppo_vs_reference"), ("PPO vs SFT", "ppo_vs_sft"), ("DPO vs references", "dpo_vs_reference")):
    j = json.load(open(f"{os.environ['HELLO_WORLD_CELL']}/judge/{stem}_judged_gold.summary.json"))
    print(f"gold judge, {name:18} win rate {j['win_rate']:.3f} [{j['ci_low']:.3f}, {j['ci_high']:.3f}] (95% Wilson), "
          f"{j['wins']} wins / {j['ties']} ties / {j['losses']} losses")
print(f"seconds: data {data['seconds']}, SFT train {sft['train/seconds']}, RM train {rm['train/seconds']}, "
      f"PPO train {ppo['train/seconds']}, DPO train {dpo['train/seconds']}")
print("figures: runs/hello_world/figures/*.png (paper figures), datasets/embedded/figures/*.png (data); "
      "TensorBoard: tensorboard --logdir runs")
PY
echo "seconds per stage:"
cat "$timings"
echo "total: $(($(date +%s) - start)) s"
