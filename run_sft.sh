#!/usr/bin/env bash
# Supervised fine-tuning under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_sft.sh                                   # offline default: sample data + models/SmolLM2-135M-Instruct
#   MODEL=outputs-pt-merged DATA=my_data/ OUTPUT_DIR=outputs-sft bash run_sft.sh --num_train_epochs 3
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_sft.sh   # on each node, NODE_RANK 0/1
# Extra arguments are passed to supervised_finetuning.py and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-data/sft}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-sft}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  supervised_finetuning.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA" \
  --validation_split_percentage 10 \
  --output_dir "$OUTPUT_DIR" \
  --model_max_length 512 \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --num_train_epochs "${EPOCHS:-2}" \
  --learning_rate 2e-4 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --logging_steps 5 \
  --eval_strategy epoch --save_strategy epoch --save_total_limit 2 \
  --seed 42 \
  "$@"
