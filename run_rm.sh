#!/usr/bin/env bash
# Reward-model training under torchrun (one process per device; multi-node with NNODES/NODE_RANK/MASTER_ADDR).
#   bash run_rm.sh                                    # offline default: sample pairs + models/SmolLM2-135M-Instruct
#   MODEL=outputs-sft-merged DATA=my_pairs/ OUTPUT_DIR=outputs-rm bash run_rm.sh --num_train_epochs 1 --max_steps -1
#   bash run_rm.sh --do_predict --predict_file data/reward/medical_pairs_en.jsonl   # + output_dir/predictions.jsonl
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_rm.sh   # on each node, NODE_RANK 0/1
# MODEL is a full causal LM (a LoRA SFT output must be merged first). The output is a LoRA adapter with the trained
# score head (--use_peft False: a full reward model); score files with it: python score_rewards.py --model OUTPUT_DIR
# Settings: examples/rm.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it.
set -euo pipefail
cd "$(dirname "$0")"
# env vars given -> flags after the YAML (unset ones leave the YAML/script default in force)
flags=()
if [ -n "${MODEL:-}" ]; then flags+=(--model_name_or_path "$MODEL"); fi
if [ -n "${DATA:-}" ]; then flags+=(--train_file_dir "$DATA"); fi
if [ -n "${OUTPUT_DIR:-}" ]; then flags+=(--output_dir "$OUTPUT_DIR"); fi
if [ -n "${MAX_STEPS:-}" ]; then flags+=(--max_steps "$MAX_STEPS"); fi
if [ "${MODEL:-models/SmolLM2-135M-Instruct}" = "models/SmolLM2-135M-Instruct" ] \
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/rm.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
exec torchrun --nproc_per_node "${NPROC_PER_NODE:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  reward_modeling.py examples/rm.yaml "${flags[@]}" "$@"
