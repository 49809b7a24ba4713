#!/usr/bin/env bash
# Regenerate every figure of SPEC "Figures to reproduce" (PNG + PDF) from a sweep directory written by
# scripts/sweep.sh ({sweep}/{size}/seed{seed}/{sft,reward,ppo,dpo,judge}/).
#
#   scripts/reproduce_figures.sh SWEEP_DIR [OUT_DIR] [paper_figures options]
#   scripts/reproduce_figures.sh sweeps/embedded                            # -> sweeps/embedded/figures/
#   scripts/reproduce_figures.sh sweeps/pythia images --judge llm --judge_model gpt-3.5-turbo-0125
#   scripts/reproduce_figures.sh sweeps/pythia images --dataset_dir datasets/tldr
#
# Figures whose inputs the sweep lacks (no judge outputs yet, no DPO runs, ...) are skipped with the reason;
# the options are those of `python -m summarize_from_feedback_details.paper_figures --help`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
  usage
  exit 0
fi
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
sweep_dir=$1
shift
out_dir="$sweep_dir/figures"
if [[ $# -ge 1 && $1 != --* ]]; then
  out_dir=$1
  shift
fi
if [[ ! -d $sweep_dir ]]; then
  echo "reproduce_figures.sh: SWEEP_DIR '$sweep_dir' does not exist; run scripts/sweep.sh first (or pass its --sweep_dir)" >&2
  exit 2
fi

# The package from this checkout even when it is not pip-installed; paths stay relative to the caller's directory.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_DISABLE_PROGRESS_BARS="${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}"
exec "$PYTHON" -m summarize_from_feedback_details.paper_figures --sweep_dir "$sweep_dir" --out_dir "$out_dir" --figure all "$@"
