#!/usr/bin/env bash
# Issue 17's one-GPU check: SFT, reward and PPO for a few steps on a random-init ~0.5B Llama in bf16 (HF generate),
# figures in one JSON file (tokens/s, peak GPU memory, the share of a PPO iteration spent generating, the update's MFU).
#
#   scripts/gpu_check.sh [--out gpu_check.json] [--wheels DIR] [--peak-tflops N]     # one GPU, under 8 minutes
#   scripts/gpu_check.sh --tiny --out /tmp/gpu_check.json                             # a CPU: checks the script
#
# --wheels DIR installs the wheels in DIR first (a machine without trl, datasets or deepspeed: carry them as wheels)
# into a folder of their own that goes on PYTHONPATH. The logic is in scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) site="${TMPDIR:-/tmp}/gpu_check_site"
              "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                  --target "$site" "$2"/*.whl
              export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "${PYTHON:-python3}" scripts/gpu_check.py "${args[@]}"
