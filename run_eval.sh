#!/usr/bin/env bash
# Benchmark accuracy of a model with lm-eval (eval_benchmarks.py); one process (scoring is not distributed).
#   bash run_eval.sh                                        # default model on data/eval (+ ../shared CMMLU if present)
#   MODEL=outputs-sft-merged OUTPUT_DIR=outputs-eval-sft bash run_eval.sh --limit 20
#   MODEL=outputs-pt-merged LORA=outputs-sft BENCH=my_exam/ bash run_eval.sh --num_fewshot 5 --log_samples
#   TRAIN_DATA=data/pretrain,data/sft bash run_eval.sh      # also report questions that overlap the training data
# Extra arguments are passed to eval_benchmarks.py and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
SHARED_CMMLU=../shared/data/eval/cmmlu_medical
BENCH=${BENCH:-data/eval$([ -d "$SHARED_CMMLU" ] && echo ",$SHARED_CMMLU" || true)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-eval}
if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
args=(--model_name_or_path "$MODEL" --benchmark_dir "$BENCH" --output_dir "$OUTPUT_DIR" --batch_size 8)
if [ -n "${LORA:-}" ]; then args+=(--lora_model "$LORA"); fi
if [ -n "${TRAIN_DATA:-}" ]; then args+=(--train_file_dir "$TRAIN_DATA"); fi
exec python eval_benchmarks.py "${args[@]}" "$@"
