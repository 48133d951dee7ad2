#!/usr/bin/env bash
# Reward-model training under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_rm.sh                                    # offline default: sample pairs + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_pairs/ OUTPUT_DIR=outputs-rm bash run_rm.sh --num_train_epochs 1 --max_steps -1
#   bash run_rm.sh --do_predict --predict_file data/reward/medical_pairs_en.jsonl   # + output_dir/predictions.jsonl
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_rm.sh   # on each node, NODE_RANK 0/1
# MODEL is a full causal LM (a LoRA SFT output must be merged first). The output is a LoRA adapter with the trained
# score head (--use_peft False: a full reward model); score files with it: python score_rewards.py --model OUTPUT_DIR
# Extra arguments are passed to reward_modeling.py and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
DATA=${DATA:-data/reward}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-rm}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  reward_modeling.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA" \
  --validation_split_percentage 10 \
  --output_dir "$OUTPUT_DIR" \
  --model_max_length 512 \
  --truncation left \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --num_train_epochs 1 \
  --max_steps ${MAX_STEPS:-20} \
  --learning_rate 1e-4 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \
  --logging_steps 2 \
  --eval_strategy steps --eval_steps 10 \
  --save_steps 10 --save_total_limit 2 \
  --seed 42 \
  "$@"
