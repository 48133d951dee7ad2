#!/usr/bin/env bash
# Reference-free preference optimisation (ORPO by default; SimPO/CPO with --loss_type) under torchrun.
#   bash run_orpo.sh                                  # offline default: sample pairs + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_pairs/ OUTPUT_DIR=outputs-orpo bash run_orpo.sh --beta 0.2
#   OUTPUT_DIR=outputs-simpo bash run_orpo.sh --loss_type simpo     # SimPO: beta 2.0, simpo_gamma 1.0, cpo_alpha 0
#   MAX_STEPS=-1 EPOCHS=3 bash run_orpo.sh             # whole epochs instead of the short default (8 steps of 4 pairs)
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_orpo.sh   # on each node, NODE_RANK 0/1
# Extra arguments are passed to orpo_training.py and override the defaults below (`python orpo_training.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-data/reward}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-orpo}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  orpo_training.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA" \
  --validation_split_percentage 10 \
  --output_dir "$OUTPUT_DIR" \
  --model_max_length 512 \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --num_train_epochs "${EPOCHS:-1}" --max_steps "${MAX_STEPS:-8}" \
  --learning_rate 1e-4 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --logging_steps 2 \
  --eval_strategy steps --eval_steps 4 --save_strategy steps --save_steps 4 --save_total_limit 2 \
  --seed 42 \
  "$@"
