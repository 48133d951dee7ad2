#!/usr/bin/env bash
# Direct preference optimization under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_dpo.sh                                   # offline default: sample pairs + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_pairs/ OUTPUT_DIR=outputs-dpo bash run_dpo.sh --beta 0.2 --loss_type ipo
#   MAX_STEPS=-1 EPOCHS=3 bash run_dpo.sh              # whole epochs instead of the short default (8 steps of 4 pairs)
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_dpo.sh   # on each node, NODE_RANK 0/1
# Settings: examples/dpo.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it (`python dpo_training.py --help`).
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
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/dpo.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  dpo_training.py examples/dpo.yaml "${flags[@]}" "$@"
