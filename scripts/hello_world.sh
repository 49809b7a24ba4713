#!/usr/bin/env bash
# The whole pipeline on the embedded default: offline, CPU only, the same code path as a Pythia run.
# Stages join this script as they land: data -> SFT -> RM -> PPO -> DPO -> judge -> figures.
# Outputs: assets/embedded/ (task, tokenizer, tiny models), datasets/embedded/ (processed data + figures),
#          runs/sft_embedded/, runs/reward_embedded/ (models, tables, metrics.json, TensorBoard logs).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_DATASETS_DISABLE_PROGRESS_BARS="${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}" TOKENIZERS_PARALLELISM=false
start=$(date +%s)
stage() { echo; echo "=== $1 ($(($(date +%s) - start)) s) ==="; }

stage "embedded assets: synthetic TL;DR-like task, BPE tokenizer, tiny Pythia models (reused when built)"
python -m summarize_from_feedback_details.embedded --out_dir assets/embedded >/dev/null

stage "data: tldr_dataset.py (Details 1-5) -> datasets/embedded"
python -m summarize_from_feedback_details.tldr_dataset embedded --embedded_dir assets/embedded --output_dir datasets/embedded

stage "SFT: sft.py (Details 7, 9) on tiny-pythia-s -> runs/sft_embedded"
python -m summarize_from_feedback_details.sft embedded --run_name sft_embedded --max_eval_samples 200 --logging_steps 50

stage "reward model: reward.py (Details 10-16) -> runs/reward_embedded"
python -m summarize_from_feedback_details.reward embedded --sft_model_path runs/sft_embedded/model --run_name reward_embedded \
    --logging_steps 50

stage "done"
python - <<'PY'
import json
manifest = json.load(open("assets/embedded/manifest.json"))
data = json.load(open("datasets/embedded/summary.json"))
sft = json.load(open("runs/sft_embedded/metrics.json"))
rm = json.load(open("runs/reward_embedded/metrics.json"))
print("models:", {name: f"{m['parameters']:,} params, pre-train loss {m['final_loss']}" for name, m in manifest["models"].items()})
print("data: SFT rows", data["sft_rows"], "preference rows", data["preference_rows"], "length maxima", data["length_maxima"])
print(f"{'':24}{'validation':>12}{'test':>10}")
for label, key in (("ROUGE-L base model", "base/{}/rougeL"), ("ROUGE-L SFT", "eval/{}/rougeL"),
                   ("SFT response tokens", "eval/{}/response_token_len"), ("SFT EOS rate", "eval/{}/eos_rate")):
    print(f"{label:24}{sft[key.format('validation')]:>12.3f}{sft[key.format('test')]:>10.3f}")
print(f"RM accuracy: TL;DR {rm['eval/accuracy/split/validation']:.3f}, CNN/DM {rm['eval/accuracy/split/validation_cnndm']:.3f}; "
      f"normalisation bias {rm['normalization/bias']:.3f}")
print(f"seconds: data {data['seconds']}, SFT train {sft['train/seconds']}, RM train {rm['train/seconds']}")
print("figures: datasets/embedded/figures/*.png; TensorBoard: tensorboard --logdir runs")
PY
echo "total: $(($(date +%s) - start)) s"
