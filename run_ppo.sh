#!/usr/bin/env bash
# RLHF under torchrun: our PPO (default) or TRL RLOO/GRPO (--rl_algo rloo|grpo) against a reward model.
#   bash run_ppo.sh                                   # offline default: needs outputs-rm from `bash run_rm.sh`
#   MODEL=outputs-sft-merged REWARD_MODEL=outputs-rm OUTPUT_DIR=outputs-ppo bash run_ppo.sh --max_steps 100
#   bash run_ppo.sh --deepspeed deepspeed_zero_stage2_config.json      # PPO supports ZeRO-2 (not ZeRO-3)
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_ppo.sh   # on each node, NODE_RANK 0/1
# Settings: examples/ppo.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it.
set -euo pipefail
cd "$(dirname "$0")"
# env vars given -> flags after the YAML (unset ones leave the YAML/script default in force)
flags=()
if [ -n "${MODEL:-}" ]; then flags+=(--model_name_or_path "$MODEL"); fi
if [ -n "${DATA:-}" ]; then flags+=(--train_file_dir "$DATA"); fi
if [ -n "${OUTPUT_DIR:-}" ]; then flags+=(--output_dir "$OUTPUT_DIR"); fi
if [ -n "${REWARD_MODEL:-}" ]; then flags+=(--reward_model_name_or_path "$REWARD_MODEL"); fi
if [ -n "${MAX_STEPS:-}" ]; then flags+=(--max_steps "$MAX_STEPS"); fi
if [ "${MODEL:-models/SmolLM2-135M-Instruct}" = "models/SmolLM2-135M-Instruct" ] \
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/ppo.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
if [ ! -d "${REWARD_MODEL:-outputs-rm}" ]; then  # outputs-rm: examples/ppo.yaml's reward model
  echo "error: reward model ${REWARD_MODEL:-outputs-rm} not found: train one first with 'bash run_rm.sh' (or set REWARD_MODEL)" >&2
  exit 2
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  ppo_training.py examples/ppo.yaml "${flags[@]}" "$@"
