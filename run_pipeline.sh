#!/usr/bin/env bash
# The whole pipeline in one command, offline, on the project's sample data:
#   PT -> merge -> SFT -> merge -> RM ;  PPO (SFT policy + RM) -> merge ;  DPO (from SFT) -> merge ;  summary
#   bash run_pipeline.sh                                  # default model models/SmolLM2-135M-Instruct, small step counts
#   PT_STEPS=200 SFT_STEPS=300 RM_STEPS=100 PPO_STEPS=50 DPO_STEPS=100 bash run_pipeline.sh   # longer
#   MODEL=path/to/causal-lm PIPELINE_DIR=outputs-mine bash run_pipeline.sh
# Each stage writes to $PIPELINE_DIR/<stage>; merged models to $PIPELINE_DIR/<stage>-merged. An existing
# $PIPELINE_DIR is moved aside to $PIPELINE_DIR.prev-<time>, never overwritten.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
OUT=${PIPELINE_DIR:-outputs-pipeline}
MAX_LEN=${MAX_LEN:-256}
export MASTER_PORT=${MASTER_PORT:-29517}

if [ "$MODEL" = "models/SmolLM2-135M-Instruct" ] && [ ! -f "$MODEL/config.json" ]; then
  python prepare_model.py --output_dir "$MODEL"
fi
if [ -e "$OUT" ]; then
  mv "$OUT" "$OUT.prev-$(date +%Y%m%d-%H%M%S)"
fi
mkdir -p "$OUT"
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $* ==="; }
merge() {  # merge <base> <adapter dir> <output dir>
  python merge_peft_adapter.py --base_model "$1" --lora_model "$2" --output_dir "$3"
}
common=(--report_to tensorboard --save_strategy no --eval_strategy no --logging_steps 5)

stage "1/8 continued pretraining (PT) on data/pretrain"
MODEL=$MODEL DATA=data/pretrain OUTPUT_DIR=$OUT/pt bash run_pt.sh "${common[@]}" \
  --max_steps "${PT_STEPS:-12}" --block_size "$MAX_LEN" --eval_on_start True --learning_rate 2e-4
stage "2/8 merge PT adapter"
merge "$MODEL" "$OUT/pt" "$OUT/pt-merged"

stage "3/8 supervised fine-tuning (SFT) on data/sft"
MODEL=$OUT/pt-merged DATA=data/sft OUTPUT_DIR=$OUT/sft bash run_sft.sh "${common[@]}" \
  --max_steps "${SFT_STEPS:-16}" --model_max_length "$MAX_LEN"
stage "4/8 merge SFT adapter"
merge "$OUT/pt-merged" "$OUT/sft" "$OUT/sft-merged"

stage "5/8 reward model (RM) on data/reward"
MODEL=$OUT/sft-merged DATA=data/reward OUTPUT_DIR=$OUT/rm bash run_rm.sh "${common[@]}" \
  --max_steps "${RM_STEPS:-12}" --model_max_length "$MAX_LEN"

stage "6/8 PPO: SFT policy against the reward model, then merge"
MODEL=$OUT/sft-merged REWARD_MODEL=$OUT/rm DATA=data/sft OUTPUT_DIR=$OUT/ppo bash run_ppo.sh \
  --report_to tensorboard --save_strategy no --max_steps "${PPO_STEPS:-4}" --max_new_tokens 24 \
  --rollout_batch_size 4 --num_mini_batches 2
merge "$OUT/sft-merged" "$OUT/ppo" "$OUT/ppo-merged"

stage "7/8 DPO from the SFT model on data/reward, then merge"
MODEL=$OUT/sft-merged DATA=data/reward OUTPUT_DIR=$OUT/dpo bash run_dpo.sh "${common[@]}" \
  --max_steps "${DPO_STEPS:-8}" --model_max_length "$MAX_LEN"
merge "$OUT/sft-merged" "$OUT/dpo" "$OUT/dpo-merged"

stage "8/8 summary"
python pipeline_summary.py --pipeline_dir "$OUT" --base_model "$MODEL" \
  --questions data/prompts/heldout_questions.jsonl --num_questions "${NUM_QUESTIONS:-4}" \
  --max_new_tokens "${ANSWER_TOKENS:-64}"
echo "pipeline finished in $(( $(date +%s) - START ))s; outputs in $OUT"
