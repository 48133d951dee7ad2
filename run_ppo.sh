#!/usr/bin/env bash
# RLHF under torchrun: our PPO (default) or TRL RLOO/GRPO (--rl_algo rloo|grpo) against a reward model.
#   bash run_ppo.sh                                   # offline default: needs outputs-rm from `bash run_rm.sh`
#   MODEL=outputs-sft-merged REWARD_MODEL=outputs-rm OUTPUT_DIR=outputs-ppo bash run_ppo.sh --max_steps 100
#   bash run_ppo.sh --deepspeed deepspeed_zero_stage2_config.json      # PPO supports ZeRO-2 (not ZeRO-3)
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_ppo.sh   # on each node, NODE_RANK 0/1
# Extra arguments are passed to ppo_training.py and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
REWARD_MODEL=${REWARD_MODEL:-outputs-rm}
DATA=${DATA:-data/sft}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-ppo}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
if [ ! -d "$REWARD_MODEL" ]; then
  echo "error: reward model $REWARD_MODEL not found: train one first with 'bash run_rm.sh' (or set REWARD_MODEL)" >&2
  exit 2
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  ppo_training.py \
  --model_name_or_path "$MODEL" \
  --reward_model_name_or_path "$REWARD_MODEL" \
  --train_file_dir "$DATA" \
  --output_dir "$OUTPUT_DIR" \
  --max_prompt_length 256 \
  --rollout_batch_size 8 --num_mini_batches 2 --num_ppo_epochs 2 \
  --max_new_tokens 48 --temperature 0.7 \
  --kl_coef 0.05 \
  --max_steps ${MAX_STEPS:-10} \
  --learning_rate 1e-5 \
  --lora_rank 8 --lora_alpha 16 --lora_dropout 0.0 \
  --logging_steps 1 \
  --save_strategy steps --save_steps 5 \
  --seed 42 \
  "$@"
