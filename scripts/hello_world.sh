#!/usr/bin/env bash
# The whole pipeline on the embedded default: offline, CPU only, the same code path as a Pythia run.
# Stages join this script as they land: data -> SFT -> RM -> PPO -> DPO -> judge -> figures.
# Outputs: assets/embedded/ (task, tokenizer, tiny models), datasets/embedded/ (processed data + figures).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_DATASETS_DISABLE_PROGRESS_BARS="${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}" TOKENIZERS_PARALLELISM=false
start=$(date +%s)
stage() { echo; echo "=== $1 ($(($(date +%s) - start)) s) ==="; }

stage "embedded assets: synthetic TL;DR-like task, BPE tokenizer, tiny Pythia models (reused when built)"
python -m summarize_from_feedback_details.embedded --out_dir assets/embedded >/dev/null

stage "data: tldr_dataset.py (Details 1-5) -> datasets/embedded"
python -m summarize_from_feedback_details.tldr_dataset embedded --embedded_dir assets/embedded --output_dir datasets/embedded

stage "done"
python - <<'PY'
import json
manifest = json.load(open("assets/embedded/manifest.json"))
summary = json.load(open("datasets/embedded/summary.json"))
print("models:", {name: f"{m['parameters']:,} params, pre-train loss {m['final_loss']}" for name, m in manifest["models"].items()})
print("SFT rows:", summary["sft_rows"], " preference rows:", summary["preference_rows"])
print("length maxima:", summary["length_maxima"])
print("queries truncated at a paragraph:", summary["truncated_queries"])
print("figures: datasets/embedded/figures/*.png")
PY
echo "total: $(($(date +%s) - start)) s"
