#!/usr/bin/env bash
# Merge a LoRA checkpoint into a self-contained model folder (the original's scripts/merge_lora_save.py).
#
#   BASE_MODEL=/models/mplug-owl2-llama2-7b scripts/merge_lora.sh checkpoints/Qscorer_lora_5_1 checkpoints/Qscorer_merged
#
# $1: LoRA folder or Hub id, $2: output folder. Environment: BASE_MODEL (required; folder or Hub id), DTYPE (default
# float16), DEVICE (default cpu). Each weight is merged in float32 and cast once to DTYPE, one tensor at a time, so
# memory is about the model's size in DTYPE (~16.4 GB for the 7B model in float16). Extra arguments go to
# `qscorer merge`.
set -euo pipefail

if [[ $# -lt 2 || -z "${BASE_MODEL:-}" ]]; then
    echo "usage: BASE_MODEL=/path/to/mplug-owl2-llama2-7b $0 LORA_DIR OUTPUT_DIR [qscorer merge options]" >&2
    exit 2
fi
LORA_DIR="$1"
OUTPUT_DIR="$2"
shift 2
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

python -m qscorer merge \
    --model-path "$LORA_DIR" \
    --model-base "$BASE_MODEL" \
    --preprocessor-path "$HERE/../preprocessor" \
    --output-dir "$OUTPUT_DIR" \
    --torch-dtype "${DTYPE:-float16}" \
    --device "${DEVICE:-cpu}" \
    "$@"
