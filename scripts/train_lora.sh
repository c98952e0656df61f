#!/usr/bin/env bash
# LoRA training of Q-Scorer on KonIQ with the original's values (its scripts/train_lora.sh), via `qscorer train`.
#
#   BASE_MODEL=/models/mplug-owl2-llama2-7b DATA_ROOT=/data/iqa scripts/train_lora.sh 0,1,2,3 [extra flags]
#
# $1: the GPU ids (as the original: deepspeed --include localhost:$1). Environment:
#   BASE_MODEL   base model folder (MAGAer13/mplug-owl2-llama2-7b)                                     required
#   DATA_ROOT    folder of the datasets; images are under it, the meta is $META                        required
#   META         training meta (default $DATA_ROOT/koniq/metas/train_koniq_7k2.json)
#   OUTPUT_DIR   output folder (default ./checkpoints/Qscorer_lora_t1)
#   LAUNCHER     deepspeed (default, like the original) or torchrun
#   MASTER_PORT  rendezvous port (default 6688)
#   PYTHON       the interpreter that has qscorer installed (default python)
# Extra arguments are appended to the flags, so they override the values below (e.g. --num_train_epochs 1).
set -euo pipefail

usage="usage: BASE_MODEL=/path/to/mplug-owl2-llama2-7b DATA_ROOT=/path/to/iqa-data [META=...] [OUTPUT_DIR=...] \
[LAUNCHER=deepspeed|torchrun] $0 GPU_IDS (e.g. 0,1,2,3) [extra qscorer train flags]"
if [[ $# -lt 1 || -z "${BASE_MODEL:-}" || -z "${DATA_ROOT:-}" ]]; then
    echo "$usage" >&2
    exit 2
fi
GPU_IDS="$1"
shift
META="${META:-$DATA_ROOT/koniq/metas/train_koniq_7k2.json}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/Qscorer_lora_t1}"
LAUNCHER="${LAUNCHER:-deepspeed}"
MASTER_PORT="${MASTER_PORT:-6688}"
PYTHON="${PYTHON:-python}"
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "$LAUNCHER" in
    deepspeed)
        launch=("$PYTHON" -m deepspeed.launcher.runner --include "localhost:$GPU_IDS" --master_port "$MASTER_PORT"
                --no_local_rank --module qscorer)
        ;;
    torchrun)
        IFS=, read -r -a gpus <<< "$GPU_IDS"
        export CUDA_VISIBLE_DEVICES="$GPU_IDS"
        launch=("$PYTHON" -m torch.distributed.run --nproc_per_node "${#gpus[@]}" --master_port "$MASTER_PORT"
                -m qscorer)
        ;;
    *)
        echo "LAUNCHER must be deepspeed or torchrun, got $LAUNCHER" >&2
        exit 2
        ;;
esac

"${launch[@]}" train \
    --deepspeed "$SCRIPTS_DIR/zero2.json" \
    --lora_enable True \
    --model_name_or_path "$BASE_MODEL" \
    --version v1 \
    --dataset_type single \
    --weight_next_token 0.05 \
    --continuous_rating_loss True \
    --closeset_rating_loss True \
    --use_fix_std True \
    --detach_pred_std True \
    --data_paths "$META" \
    --data_weights 1 \
    --image_folder "$DATA_ROOT/" \
    --output_dir "$OUTPUT_DIR" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --num_train_epochs 3 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "no" \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --tune_visual_abstractor True \
    --freeze_vision_model False \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to tensorboard \
    "$@"
