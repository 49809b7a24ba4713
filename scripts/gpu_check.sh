#!/usr/bin/env bash
# The GPU check: the one command to run when a GPU machine (one H100 80GB or H200, no internet) is lent. In under
# 8 minutes, at the pythia-1b shape with random weights (no hub, no data): one PPO update of ours vs TRL 1.12's in
# bf16, the first minibatch's ratio and approx-KL in fp32 and bf16, SFT and RM steps in tokens/s, peak GPU memory of
# each (benchmark/gpu_check.py says what each step runs; benchmark/README.md, "GPU check").
#
#   bash scripts/gpu_check.sh --out "$OUT"     # on the GPU machine; default folder: $OUT, else benchmark/results/gpu_check/<date>
#   bash scripts/gpu_check.sh --tiny --out DIR # the same steps at the tiny shape on the CPU, about a minute (or SFFD_GPU_CHECK_TINY=1)
#   bash scripts/gpu_check.sh --prepare_wheels # here, where pip reaches an index: .whl/ with what the GPU machine lacks
#
# Writes gpu_check.json (every field, null where not measured), gpu_check.md and gpu_check.log (every step's output).
# Python: $PYTHON, else python3. On the GPU machine that is the machine's own python3, which has a CUDA torch; the
# project's .venv cannot serve there (Python 3.11 and the CPU torch wheel, and too large to carry). What that python
# lacks (tyro, datasets, trl; the pinned transformers) travels as wheels: `--prepare_wheels` here, then carry .whl;
# they are installed into a temporary folder put first on PYTHONPATH, never into the machine's python. Without trl the
# check still runs and records "trl: not available". Exit status 2, with one line on stderr, when it cannot run (the
# line names what did not import; SFFD_EXTRA_WHEELS="name==version ..." adds wheels to --prepare_wheels, e.g. pyarrow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${SFFD_WHEELS:-.whl}
tiny=${SFFD_GPU_CHECK_TINY:-0}
out=""
prepare=0
passed=()
command_line="bash scripts/gpu_check.sh $*"
while (($#)); do
    case "$1" in
        --tiny) tiny=1 ;;
        --out) out=${2:?--out needs a folder}; shift ;;
        --out=*) out=${1#--out=} ;;
        --prepare_wheels) prepare=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) passed+=("$1") ;;
    esac
    shift
done

fail() {
    echo "gpu_check: $*" >&2
    [[ -n ${log:-} ]] && echo "gpu_check: $*" >>"$log"
    exit 2
}

if ((prepare)); then  # here, not on the GPU machine: the wheels of the pinned versions for its Python 3.12
    command -v "$PYTHON" >/dev/null || fail "no $PYTHON here: set PYTHON to the project's venv python"
    pins=$("$PYTHON" -c 'import sys; sys.path.insert(0, "benchmark"); import gpu_check; print(" ".join(gpu_check.wheel_pins()))')
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${SFFD_WHEELS_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" $pins ${SFFD_EXTRA_WHEELS:-}
    echo "gpu_check: $(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS/ ($pins): carry $WHEELS to the GPU machine"
    exit 0
fi

out=${out:-${OUT:-benchmark/results/gpu_check/$(date +%Y-%m-%d)}}
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
command -v "$PYTHON" >/dev/null || fail "no $PYTHON here: set PYTHON to a Python with torch and transformers"
echo "gpu_check: $command_line; python $(command -v "$PYTHON")" | tee -a "$log"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d)/site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl >>"$log" 2>&1 ||
        fail "installing the carried wheels ($WHEELS/*.whl) with $PYTHON -m pip failed (see $log)"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" SFFD_GPU_CHECK_WHEEL_SITE="$site"
    echo "gpu_check: the carried wheels ($(ls "$WHEELS"/*.whl | wc -l)) installed into $site, first on PYTHONPATH" | tee -a "$log"
fi
"$PYTHON" -c 'import torch, transformers' >>"$log" 2>&1 ||
    fail "$(command -v "$PYTHON") cannot import torch and transformers (see $log): set PYTHON to a Python that has them (on the GPU machine its own python3; the project's .venv is not usable there: Python 3.11 and the CPU torch wheel)"

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
tiny_flag=()
[[ $tiny == 1 ]] && tiny_flag=(--tiny)
"$PYTHON" benchmark/gpu_check.py --out "$out" --command "$command_line" ${tiny_flag[@]+"${tiny_flag[@]}"} ${passed[@]+"${passed[@]}"}
