#!/usr/bin/env bash
# The whole pipeline in one command, offline, on the project's sample data:
#   PT -> merge -> SFT -> merge -> RM ;  PPO (SFT policy + RM) -> merge ;  DPO (from SFT) -> merge ;
#   benchmark eval of base, SFT, DPO, PPO on the same questions ;  summary
#   bash run_pipeline.sh                                  # default model models/SmolLM2-135M-Instruct, small step counts
#   PT_STEPS=200 SFT_STEPS=300 RM_STEPS=100 PPO_STEPS=50 DPO_STEPS=100 bash run_pipeline.sh   # longer
#   MODEL=path/to/causal-lm PIPELINE_DIR=outputs-mine bash run_pipeline.sh
#   EVAL_LIMIT=0 bash run_pipeline.sh                    # every benchmark question (default: first 10 per subject)
#   bash run_pipeline.sh --from rm                        # continue a failed/stopped run at a stage (pt sft rm ppo dpo summary)
# Each stage writes to $PIPELINE_DIR/<stage>; merged models to $PIPELINE_DIR/<stage>-merged. An existing
# $PIPELINE_DIR is moved aside to $PIPELINE_DIR.prev-<time>, never overwritten. With --from STAGE it is kept: earlier
# stages' outputs are reused, STAGE and later stages rerun (a stage dir holding a complete checkpoint resumes from it
# with --resume_from_checkpoint auto; other leftovers of those stages are moved aside to <dir>.failed-<time>).
set -euo pipefail
cd "$(dirname "$0")"
STAGES=(pt sft rm ppo dpo eval summary)
FROM=""
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=${2:-}; shift 2 || { echo "error: --from needs a stage: ${STAGES[*]}" >&2; exit 2; } ;;
    --from=*) FROM=${1#--from=}; shift ;;
    *) echo "error: unknown argument $1 (run_pipeline.sh [--from STAGE]; stages: ${STAGES[*]})" >&2; exit 2 ;;
  esac
done
if [ -n "$FROM" ] && [[ ! " ${STAGES[*]} " =~ " $FROM " ]]; then
  echo "error: --from $FROM: unknown stage; choose one of: ${STAGES[*]}" >&2; exit 2
fi
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
OUT=${PIPELINE_DIR:-outputs-pipeline}
MAX_LEN=${MAX_LEN:-256}
export MASTER_PORT=${MASTER_PORT:-29517}

if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
if [ -n "$FROM" ]; then
  # what the stages from $FROM on read from earlier ones
  declare -A NEEDS=([pt]="" [sft]="pt-merged" [rm]="sft-merged" [ppo]="sft-merged rm" [dpo]="sft-merged"
                    [eval]="sft-merged ppo-merged dpo-merged"
                    [summary]="pt sft-merged rm ppo-merged dpo-merged")
  for need in ${NEEDS[$FROM]}; do
    if [ ! -d "$OUT/$need" ] || [ -z "$(ls -A "$OUT/$need")" ]; then
      echo "error: --from $FROM needs $OUT/$need from an earlier run, which is missing: start from an earlier stage" >&2
      exit 2
    fi
  done
elif [ -e "$OUT" ]; then
  mv "$OUT" "$OUT.prev-$(date +%Y%m%d-%H%M%S)"
fi
mkdir -p "$OUT"
CURRENT=""
# from STAGE: whether STAGE runs (it is $FROM or later); prepares its directories for the rerun.
from() {
  local i want=-1 at=-1
  for i in "${!STAGES[@]}"; do
    [ "${STAGES[$i]}" = "${FROM:-pt}" ] && want=$i
    [ "${STAGES[$i]}" = "$1" ] && at=$i
  done
  [ "$at" -ge "$want" ] || return 1
  CURRENT=$1
  RESUME=()
  local dir
  for dir in "$OUT/$1" "$OUT/$1-merged"; do
    [ -e "$dir" ] || continue
    if [ "$dir" = "$OUT/$1" ] && compgen -G "$dir/checkpoint-*/COMPLETE" > /dev/null; then
      RESUME=(--resume_from_checkpoint auto)   # e.g. preempted: continue from its newest intact checkpoint
    else
      mv "$dir" "$dir.failed-$(date +%Y%m%d-%H%M%S)"
    fi
  done
}
trap 'status=$?; if [ $status -ne 0 ] && [ -n "$CURRENT" ]; then
  echo "pipeline stopped in stage $CURRENT (status $status); earlier outputs in $OUT are kept. Continue with: bash run_pipeline.sh --from $CURRENT" >&2
fi' EXIT
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $* ==="; }
merge() {  # merge <base> <adapter dir> <output dir>
  python merge_peft_adapter.py --base_model "$1" --lora_model "$2" --output_dir "$3"
}
common=(--report_to tensorboard --save_strategy no --eval_strategy no --logging_steps 5)

if from pt; then
stage "1/9 continued pretraining (PT) on data/pretrain"
MODEL=$MODEL DATA=data/pretrain OUTPUT_DIR=$OUT/pt bash run_pt.sh "${common[@]}" \
  --max_steps "${PT_STEPS:-12}" --block_size "$MAX_LEN" --eval_on_start True --learning_rate 2e-4 "${RESUME[@]}"
stage "2/9 merge PT adapter"
merge "$MODEL" "$OUT/pt" "$OUT/pt-merged"
fi

if from sft; then
stage "3/9 supervised fine-tuning (SFT) on data/sft"
MODEL=$OUT/pt-merged DATA=data/sft OUTPUT_DIR=$OUT/sft bash run_sft.sh "${common[@]}" \
  --max_steps "${SFT_STEPS:-16}" --model_max_length "$MAX_LEN" "${RESUME[@]}"
stage "4/9 merge SFT adapter"
merge "$OUT/pt-merged" "$OUT/sft" "$OUT/sft-merged"
fi

if from rm; then
stage "5/9 reward model (RM) on data/reward"
MODEL=$OUT/sft-merged DATA=data/reward OUTPUT_DIR=$OUT/rm bash run_rm.sh "${common[@]}" \
  --max_steps "${RM_STEPS:-12}" --model_max_length "$MAX_LEN" "${RESUME[@]}"
fi

if from ppo; then
stage "6/9 PPO: SFT policy against the reward model, then merge"
MODEL=$OUT/sft-merged REWARD_MODEL=$OUT/rm DATA=data/sft OUTPUT_DIR=$OUT/ppo bash run_ppo.sh \
  --report_to tensorboard --save_strategy no --max_steps "${PPO_STEPS:-4}" --max_new_tokens 24 \
  --rollout_batch_size 4 --num_mini_batches 2 "${RESUME[@]}"
merge "$OUT/sft-merged" "$OUT/ppo" "$OUT/ppo-merged"
fi

if from dpo; then
stage "7/9 DPO from the SFT model on data/reward, then merge"
MODEL=$OUT/sft-merged DATA=data/reward OUTPUT_DIR=$OUT/dpo bash run_dpo.sh "${common[@]}" \
  --max_steps "${DPO_STEPS:-8}" --model_max_length "$MAX_LEN" "${RESUME[@]}"
merge "$OUT/sft-merged" "$OUT/dpo" "$OUT/dpo-merged"
fi

if from eval; then
stage "8/9 benchmark eval of base, SFT, DPO, PPO (first ${EVAL_LIMIT:-10} questions per subject)"
# data/eval (the project's own questions) + ../shared's CMMLU medical subjects when present; 0-shot, plain prompt
EVAL_BENCH=${EVAL_BENCH:-data/eval$([ -d ../shared/data/eval/cmmlu_medical ] && echo ",../shared/data/eval/cmmlu_medical" || true)}
limit=(); if [ "${EVAL_LIMIT:-10}" != "0" ]; then limit=(--limit "${EVAL_LIMIT:-10}"); fi
evaluate() {  # evaluate <name> <model dir> <training data the model saw, for the contamination check>
  python eval_benchmarks.py --model_name_or_path "$2" --benchmark_dir "$EVAL_BENCH" --output_dir "$OUT/eval/$1" \
    --batch_size 8 "${limit[@]}" ${3:+--train_file_dir "$3"}
}
evaluate base "$MODEL" ""
evaluate sft "$OUT/sft-merged" data/pretrain,data/sft
evaluate dpo "$OUT/dpo-merged" data/pretrain,data/sft,data/reward
evaluate ppo "$OUT/ppo-merged" data/pretrain,data/sft
fi

from summary
stage "9/9 summary"
python pipeline_summary.py --pipeline_dir "$OUT" --base_model "$MODEL" \
  --questions data/prompts/heldout_questions.jsonl --num_questions "${NUM_QUESTIONS:-4}" \
  --max_new_tokens "${ANSWER_TOKENS:-64}"
echo "pipeline finished in $(( $(date +%s) - START ))s; outputs in $OUT"
