#!/usr/bin/env bash
# Supervised fine-tuning under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_sft.sh                                   # offline default: sample data + models/SmolLM2-135M-Instruct
#   MODEL=outputs-pt-merged DATA=my_data/ OUTPUT_DIR=outputs-sft bash run_sft.sh --num_train_epochs 3
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_sft.sh   # on each node, NODE_RANK 0/1
# Settings: examples/sft.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it.
set -euo pipefail
cd "$(dirname "$0")"
# env vars given -> flags after the YAML (unset ones leave the YAML/script default in force)
flags=()
if [ -n "${MODEL:-}" ]; then flags+=(--model_name_or_path "$MODEL"); fi
if [ -n "${DATA:-}" ]; then flags+=(--train_file_dir "$DATA"); fi
if [ -n "${OUTPUT_DIR:-}" ]; then flags+=(--output_dir "$OUTPUT_DIR"); fi
if [ -n "${EPOCHS:-}" ]; then flags+=(--num_train_epochs "$EPOCHS"); fi
if [ "${MODEL:-models/SmolLM2-135M-Instruct}" = "models/SmolLM2-135M-Instruct" ] \
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/sft.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  supervised_finetuning.py examples/sft.yaml "${flags[@]}" "$@"
