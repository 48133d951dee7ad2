#!/usr/bin/env bash
# Continued pretraining under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_pt.sh                                    # offline default: sample text + models/SmolLM2-135M-Instruct
#   MODEL=models/my-base DATA=corpus/ OUTPUT_DIR=outputs-pt bash run_pt.sh --block_size 1024 --num_train_epochs 1
#   DATA=huge_corpus/ bash run_pt.sh --streaming --max_steps 20000 --validation_file_dir heldout/
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_pt.sh   # on each node, NODE_RANK 0/1
# Extra arguments are passed to pretraining.py and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-data/pretrain}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-pt}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  pretraining.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA" \
  --validation_split_percentage 10 \
  --output_dir "$OUTPUT_DIR" \
  --block_size 512 \
  --per_device_train_batch_size 2 \
  --per_device_eval_batch_size 2 \
  --gradient_accumulation_steps 1 \
  --num_train_epochs "${EPOCHS:-1}" \
  --learning_rate 2e-4 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --logging_steps 2 \
  --eval_on_start \
  --eval_strategy epoch --save_strategy epoch --save_total_limit 2 \
  --seed 42 \
  "$@"
