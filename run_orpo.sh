#!/usr/bin/env bash
# Reference-free preference optimisation (ORPO by default; SimPO/CPO with --loss_type) under torchrun.
#   bash run_orpo.sh                                  # offline default: sample pairs + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_pairs/ OUTPUT_DIR=outputs-orpo bash run_orpo.sh --beta 0.2
#   bash run_orpo.sh --loss_type simpo                # SimPO into outputs-simpo: beta 2.0, simpo_gamma 1.0, cpo_alpha 0
#   MAX_STEPS=-1 EPOCHS=3 bash run_orpo.sh             # whole epochs instead of the short default (8 steps of 4 pairs)
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_orpo.sh   # on each node, NODE_RANK 0/1
# Settings: examples/orpo.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it (`python orpo_training.py --help`).
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
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/orpo.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  orpo_training.py examples/orpo.yaml "${flags[@]}" "$@"
