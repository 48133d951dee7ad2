#!/usr/bin/env bash
# GRPO with verifiable rewards under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_grpo.sh                                  # offline default: sample questions + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_questions/ OUTPUT_DIR=outputs-grpo bash run_grpo.sh --reward_weights 1.0 0.2
#   DATA=cmmlu/test bash run_grpo.sh --reward_funcs accuracy length   # multiple choice (CSV ,Question,A,B,C,D,Answer)
#   MAX_STEPS=-1 EPOCHS=1 bash run_grpo.sh             # a whole epoch instead of the short default (8 steps)
# Settings: examples/grpo.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it (`python grpo_training.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
# env vars given -> flags after the YAML (unset ones leave the YAML/script default in force)
flags=()
if [ -n "${MODEL:-}" ]; then flags+=(--model_name_or_path "$MODEL"); fi
if [ -n "${DATA:-}" ]; then flags+=(--train_file_dir "$DATA"); fi
if [ -n "${OUTPUT_DIR:-}" ]; then flags+=(--output_dir "$OUTPUT_DIR"); fi
if [ -n "${EPOCHS:-}" ]; then flags+=(--num_train_epochs "$EPOCHS"); fi
if [ -n "${MAX_STEPS:-}" ]; then flags+=(--max_steps "$MAX_STEPS"); fi
if [ "${MODEL:-models/SmolLM2-135M-Instruct}" = "models/SmolLM2-135M-Instruct" ] \
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/grpo.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  grpo_training.py examples/grpo.yaml "${flags[@]}" "$@"
