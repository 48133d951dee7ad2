"""Reward modelling: a causal LM with a one-output score head, trained on preference pairs (LoRA, QLoRA or full).

    python reward_modeling.py --model_name_or_path models/SmolLM2-135M-Instruct \
        --train_file_dir data/reward --validation_split_percentage 10 --output_dir outputs-rm
    python reward_modeling.py rm_config.yaml --do_predict --predict_file data/reward/medical_pairs_en.jsonl

Pairs are rendered with the chat format exactly as SFT renders the same turn (prompt + chosen / prompt + rejected)
and trained with -log sigmoid(r_chosen - r_rejected - margin). With LoRA the trained score head is saved with the
adapter; `medtrain.reward.load_reward_model(output_dir)` reloads it and `score_rewards.py` scores files with it.
"""

from __future__ import annotations

import logging
import os

import datasets
from transformers import set_seed
from trl import RewardConfig

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.chat_format import resolve_chat_format
from medtrain.data import load_splits
from medtrain.entrypoint import run_main
from medtrain.formats import find_data_files, load_preferences
from medtrain.modeling import apply_lora, load_tokenizer
from medtrain.outputs import evaluate_and_record, evaluate_once, record_metrics, save_curves, train_and_save
from medtrain.preference import encode_pairs
from medtrain.resilience import resilience_callbacks
from medtrain.reward import (
    RewardArguments,
    RewardModelTrainer,
    RewardScorer,
    check_reward_arguments,
    describe_pair,
    load_reward_base,
    load_scoring_records,
    pair_rows,
    score_records,
    write_jsonl,
)
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.rm")


def main(args: list[str] | None = None) -> RewardModelTrainer:
    # Configuration: parse (pure), derive the trainer's fields and check everything once, then set up the process
    model_args, lora_args, data_args, reward_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, RewardArguments, RunArguments, RewardConfig], args,
        stage_defaults={"output_dir": "outputs-rm", "do_train": True, "do_eval": True},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_reward_arguments(model_args, reward_args, training_args),))
    # seeds before the LoRA adapter is built, so a run and its resume start from the same adapter
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())

    # Tokenizer and the chat format (what SFT recorded in the model dir, else --template_name / the tokenizer's)
    tokenizer = load_tokenizer(model_args, padding_side="right")
    chat_format = resolve_chat_format(
        tokenizer, [model_args.model_name_or_path], data_args.template_name, data_args.system_prompt
    )
    logger.info("chat format: %s", chat_format.record())

    # Data: load pairs (format detected per file), render and tokenise them; bad records stop here, before
    # anything is written. The file to predict on is read now too, so a bad one fails before training.
    with training_args.main_process_first(desc="tokenizing"):
        train_records, eval_records = load_splits(
            data_args, load_preferences, seed=training_args.seed, report_dir=training_args.output_dir
        )
        encode = dict(tokenizer=tokenizer, chat_format=chat_format, max_length=data_args.model_max_length,
                      truncation=reward_args.truncation, stage="rm")
        train_pairs = encode_pairs(train_records, name="train", **encode)
        eval_pairs = encode_pairs(eval_records, name="eval", **encode) if eval_records else []
    predict_records = (
        load_scoring_records(find_data_files(reward_args.predict_file)) if training_args.do_predict else []
    )
    logger.info("first train pair\n%s", describe_pair(tokenizer, train_pairs[0]))

    # Model: one-output classifier on the causal LM (+ LoRA; PEFT's SEQ_CLS task saves the score head with it)
    set_seed(training_args.seed)  # the fresh score head is random: seed it
    model = load_reward_base(model_args, tokenizer, max_length=data_args.model_max_length)
    if lora_args.use_peft:
        model = apply_lora(model, lora_args, task_type="SEQ_CLS",
                           gradient_checkpointing=training_args.gradient_checkpointing)

    # Trainer: rows are already tokenised and fit model_max_length, so TRL only pads them
    trainer = RewardModelTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.Dataset.from_list(pair_rows(train_pairs)),
        eval_dataset=datasets.Dataset.from_list(pair_rows(eval_pairs)) if eval_pairs else None,
        processing_class=tokenizer,
        callbacks=resilience_callbacks(run_args),
    )

    # Train, save (model + score head, tokenizer, chat format), evaluate (pairwise accuracy, margin;
    # a last step that --eval_strategy already evaluated is reused, not run again), predict, curves
    out = training_args.output_dir
    if training_args.do_train:
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format,
                       train_samples=len(train_pairs))
    if training_args.do_eval and eval_pairs:
        evaluate_and_record(trainer, out, len(eval_pairs), evaluate=evaluate_once)
    if training_args.do_predict:
        # Every rank runs the same forward passes (ZeRO-3 shards need all ranks); rank 0 writes.
        scorer = RewardScorer(trainer.model, tokenizer, chat_format, max_length=data_args.model_max_length,
                              batch_size=training_args.per_device_eval_batch_size)
        rows, metrics = score_records(scorer, predict_records)
        if trainer.is_world_process_zero():
            path = os.path.join(out, "predictions.jsonl")
            write_jsonl(rows, path)
            logger.info("wrote %d scored records to %s", len(rows), path)
            if metrics:
                metrics = {f"predict_{k}": v for k, v in metrics.items()}
                metrics["predict_samples"] = sum("chosen" in r for r in predict_records)
                trainer.log_metrics("predict", metrics)
                record_metrics(trainer, out, "predict", metrics)
    save_curves(trainer, out, title="RM")
    return trainer


if __name__ == "__main__":
    run_main(main)
