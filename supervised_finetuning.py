"""Supervised fine-tuning (multi-turn) with LoRA, QLoRA or full training.

    python supervised_finetuning.py --model_name_or_path models/SmolLM2-135M-Instruct \
        --train_file_dir data/sft --validation_split_percentage 10 --output_dir outputs-sft
    python supervised_finetuning.py sft_config.yaml --num_train_epochs 2   # a file of arguments, flags override

Only assistant turns (and their end-of-turn token) are trained on; the layout of the first sample is printed at
start-up. The chat format used is recorded in the output dir so inference renders prompts the same way.
"""

from __future__ import annotations

import logging

from trl import SFTConfig, SFTTrainer

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.chat_format import get_chat_format
from medtrain.data import load_splits, log_first_sample, tokenize_conversations
from medtrain.efficiency import count_tokens, plan_batches, token_throughput
from medtrain.entrypoint import run_main
from medtrain.formats import load_conversations
from medtrain.fused_loss import EfficientSFTTrainer
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.outputs import evaluate_and_record, evaluate_once, language_model_perplexity, save_curves, train_and_save
from medtrain.resilience import resilience_callbacks
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.sft")


def main(args: list[str] | None = None) -> SFTTrainer:
    # Configuration: parse (pure), derive the trainer's fields and check everything once, then set up the process
    model_args, lora_args, data_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, RunArguments, SFTConfig], args,
        stage_defaults={"output_dir": "outputs-sft", "do_train": True, "do_eval": True, "packing": True,
                        "train_sampling_strategy": "group_by_length"},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args)
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logger.info("hardware: %s", hardware.describe())

    # Tokenizer and the chat format (template or the tokenizer's own chat template)
    tokenizer = load_tokenizer(model_args)
    chat_format = get_chat_format(tokenizer, data_args.template_name, data_args.system_prompt)
    logger.info("chat format: %s", chat_format.record())

    # Data: load, validate, tokenise with assistant-only labels
    with training_args.main_process_first(desc="tokenizing"):
        train_records, eval_records = load_splits(
            data_args, load_conversations, seed=training_args.seed, report_dir=training_args.output_dir
        )
        encode = dict(tokenizer=tokenizer, chat_format=chat_format, max_length=data_args.model_max_length,
                      train_on_inputs=data_args.train_on_inputs, num_proc=data_args.preprocessing_num_workers)
        train_dataset = tokenize_conversations(train_records, name="train", **encode)
        eval_dataset = tokenize_conversations(eval_records, name="eval", **encode) if eval_records else None
    log_first_sample(train_dataset, tokenizer)
    tokens = count_tokens(train_dataset)  # per epoch, before packing: samples, tokens, supervised tokens
    eval_samples = len(eval_dataset) if eval_dataset is not None else 0

    # Model (+ LoRA adapter); rope scaling / S2-Attn from the flags
    model = load_model(model_args, tokenizer=tokenizer, max_length=data_args.model_max_length)
    # Batches: packed rows with attention per sequence where exact (see medtrain.efficiency), else padded
    cpu_paths = model_args.cpu_paths == "on"  # our CPU paths, as finalize decided for this device
    plan = plan_batches(model, training_args, tokenizer.pad_token_id, per_sequence_attention=cpu_paths)
    logger.info("batches: %s", plan.describe())
    train_dataset = plan.prepare(train_dataset, data_args.model_max_length)
    eval_dataset = plan.prepare(eval_dataset, data_args.model_max_length)
    if lora_args.use_peft:
        model = apply_lora(model, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)

    # Trainer: the data is already tokenised and truncated, so TRL only pads it
    trainer = EfficientSFTTrainer(
        model=model,
        args=plan.trainer_args(training_args),  # TRL's batch flags as the plan says; training_args stays as parsed
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=plan.collator,
        callbacks=[*resilience_callbacks(run_args), *plan.callbacks],
        fused_loss=cpu_paths,
    )

    # Train, save (model, tokenizer, chat format, rope record), evaluate (loss, perplexity; a last
    # step that --eval_strategy already evaluated is reused, not run again), curves
    out = training_args.output_dir
    if training_args.do_train:
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format,
                       train_samples=tokens["samples"],  # conversations, before packing
                       extra_metrics=lambda result: token_throughput(tokens, trainer.state.epoch,
                                                                     result.metrics["train_runtime"]))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_record(trainer, out, eval_samples, evaluate=evaluate_once, derived=language_model_perplexity)
    save_curves(trainer, out, title="SFT")
    return trainer


if __name__ == "__main__":
    run_main(main)
