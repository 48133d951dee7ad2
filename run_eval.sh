#!/usr/bin/env bash
# Benchmark accuracy of a model with lm-eval (eval_benchmarks.py); one process (scoring is not distributed).
#   bash run_eval.sh                                        # default model on data/eval (+ ../shared CMMLU if present)
#   MODEL=outputs-sft-merged OUTPUT_DIR=outputs-eval-sft bash run_eval.sh --limit 20
#   MODEL=outputs-pt-merged LORA=outputs-sft BENCH=my_exam/ bash run_eval.sh --num_fewshot 5 --log_samples
#   TRAIN_DATA=data/pretrain,data/sft bash run_eval.sh      # also report questions that overlap the training data
# Settings: examples/eval.yaml (the one place for this launcher's defaults); env vars and extra arguments are
# passed after it as flags and override it (`python eval_benchmarks.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
# env vars given -> flags after the YAML (unset ones leave the YAML/script default in force)
flags=()
if [ -n "${MODEL:-}" ]; then flags+=(--model_name_or_path "$MODEL"); fi
SHARED_CMMLU=../shared/data/eval/cmmlu_medical
if [ -n "${BENCH:-}" ]; then
  flags+=(--benchmark_dir "$BENCH")
elif [ -d "$SHARED_CMMLU" ]; then  # the shared CMMLU medical subjects join examples/eval.yaml's data/eval
  flags+=(--benchmark_dir "data/eval,$SHARED_CMMLU")
fi
if [ -n "${OUTPUT_DIR:-}" ]; then flags+=(--output_dir "$OUTPUT_DIR"); fi
if [ -n "${LORA:-}" ]; then flags+=(--lora_model "$LORA"); fi
if [ -n "${TRAIN_DATA:-}" ]; then flags+=(--train_file_dir "$TRAIN_DATA"); fi
if [ "${MODEL:-models/SmolLM2-135M-Instruct}" = "models/SmolLM2-135M-Instruct" ] \
   && [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then  # the default model of examples/eval.yaml
  python prepare_model.py --output_dir models/SmolLM2-135M-Instruct
fi
exec python eval_benchmarks.py examples/eval.yaml "${flags[@]}" "$@"
