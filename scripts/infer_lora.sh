#!/usr/bin/env bash
# Batch inference of a LoRA checkpoint on the six published test sets (the original's scripts/infer_lora.sh).
#
#   DATA_ROOT=/data scripts/infer_lora.sh 0
#
# $1: GPU ids for CUDA_VISIBLE_DEVICES (default 0). Environment: DATA_ROOT (required: holds koniq/, spaq/, kadid10k/,
# LIVE-WILD/, AGIQA3K/, csiq/), MODEL_PATH and BASE_MODEL (folders or Hub ids; default the published
# 2kxx/Qscorer_lora_5_1 on MAGAer13/mplug-owl2-llama2-7b), SAVE_DIR (default results/res_Qscorer_lora_5_1), DTYPE
# (default float16: the published table was computed in fp16, like the original's iqa_eval.py). Extra arguments go to
# `qscorer infer`.
set -euo pipefail

if [[ -z "${DATA_ROOT:-}" ]]; then
    echo "usage: DATA_ROOT=/path/to/datasets $0 [gpu_ids] [qscorer infer options]" >&2
    exit 2
fi
GPUS="${1:-0}"
shift || true
MODEL_PATH="${MODEL_PATH:-2kxx/Qscorer_lora_5_1}"
BASE_MODEL="${BASE_MODEL:-MAGAer13/mplug-owl2-llama2-7b}"
SAVE_DIR="${SAVE_DIR:-results/res_Qscorer_lora_5_1}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CUDA_VISIBLE_DEVICES="$GPUS" python -m qscorer infer \
    --model-path "$MODEL_PATH" \
    --model-base "$BASE_MODEL" \
    --preprocessor-path "$HERE/../preprocessor" \
    --dtype "${DTYPE:-float16}" \
    --root-dir "$DATA_ROOT" \
    --save-dir "$SAVE_DIR" \
    --meta-paths \
        "$DATA_ROOT/koniq/metas/test_koniq_2k.json" \
        "$DATA_ROOT/spaq/metas/test_spaq_2k.json" \
        "$DATA_ROOT/kadid10k/metas/test_kadid_2k.json" \
        "$DATA_ROOT/LIVE-WILD/metas/test_livew_1k.json" \
        "$DATA_ROOT/AGIQA3K/metas/test_agiqa_3k.json" \
        "$DATA_ROOT/csiq/metas/test_csiq_866.json" \
    "$@"
