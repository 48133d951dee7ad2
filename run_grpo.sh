#!/usr/bin/env bash
# GRPO with verifiable rewards under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_grpo.sh                                  # offline default: sample questions + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_questions/ OUTPUT_DIR=outputs-grpo bash run_grpo.sh --reward_weights 1.0 0.2
#   DATA=cmmlu/test bash run_grpo.sh --reward_funcs accuracy length   # multiple choice (CSV ,Question,A,B,C,D,Answer)
#   MAX_STEPS=-1 EPOCHS=1 bash run_grpo.sh             # a whole epoch instead of the short default (8 steps)
# Extra arguments are passed to grpo_training.py and override the defaults below (`python grpo_training.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-data/grpo}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-grpo}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  grpo_training.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA" \
  --output_dir "$OUTPUT_DIR" \
  --system_prompt "Think step by step inside <think> </think>, then give the final answer after </think>." \
  --reward_funcs accuracy format --reward_weights 1.0 0.5 \
  --num_generations 4 --max_completion_length 256 --temperature 1.0 \
  --max_prompt_length 512 \
  --per_device_train_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --num_train_epochs "${EPOCHS:-1}" --max_steps "${MAX_STEPS:-8}" \
  --learning_rate 5e-6 --beta 0.0 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --logging_steps 1 \
  --save_strategy steps --save_steps 4 --save_total_limit 2 \
  --seed 42 \
  "$@"
