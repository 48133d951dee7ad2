#!/usr/bin/env bash
# KTO on thumbs-up/down feedback under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_kto.sh                                   # offline default: sample feedback + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_feedback/ OUTPUT_DIR=outputs-kto bash run_kto.sh --beta 0.2
#   DATA=data/reward bash run_kto.sh                   # preference pairs, each split into a desirable + undesirable
#   MAX_STEPS=-1 EPOCHS=3 bash run_kto.sh              # whole epochs instead of the short default (8 steps of 4)
# Extra arguments are passed to kto_training.py and override the defaults below (`python kto_training.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-data/kto}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-kto}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  kto_training.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA" \
  --validation_split_percentage 10 \
  --output_dir "$OUTPUT_DIR" \
  --model_max_length 512 \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --num_train_epochs "${EPOCHS:-1}" --max_steps "${MAX_STEPS:-8}" \
  --learning_rate 5e-5 \
  --beta 0.1 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --logging_steps 2 \
  --eval_strategy steps --eval_steps 4 --save_strategy steps --save_steps 4 --save_total_limit 2 \
  --seed 42 \
  "$@"
