"""Direct preference optimization (DPO and every loss variant TRL offers) with LoRA, QLoRA or full training.

    python dpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/reward \
        --validation_split_percentage 10 --output_dir outputs-dpo --learning_rate 5e-5
    python dpo_training.py dpo_config.yaml --beta 0.2 --loss_type ipo   # a file of arguments, flags override

Every DPOConfig option is a flag (``--help`` lists them). Pairs use the reward-model stage's formats and are rendered
with the same chat format as SFT: the prompt (system prompt and history included) up to the assistant header, and
each reply with its end-of-turn token. Pairs longer than ``--model_max_length`` tokens are cut in prompt (from the left)
and replies (at the end) so every pair is kept (``--truncation reply``, the default), lose only prompt tokens
(``left``), or are dropped (``drop``); the counts are logged. With LoRA the reference is the base model
with the adapter disabled; with full training, a frozen copy (or ``--ref_model_name_or_path``).
"""

from __future__ import annotations

import logging

from trl import DPOConfig

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.chat_format import resolve_chat_format
from medtrain.data import load_splits
from medtrain.dpo import (
    DPOArguments,
    build_trainer,
    check_dpo_arguments,
    check_router_aux_loss,
    describe_pair,
    encode_preference_dataset,
    load_reference_model,
)
from medtrain.entrypoint import run_main
from medtrain.formats import load_preferences
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.outputs import evaluate_and_record, evaluate_once, save_curves, train_and_save
from medtrain.resilience import resilience_callbacks
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.dpo")


def main(args: list[str] | None = None):
    """Run DPO from command-line ``args`` (default: sys.argv); returns the trainer."""
    # Configuration: parse (pure), derive the trainer's fields and check everything once, then set up the process
    model_args, lora_args, data_args, dpo_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, DPOArguments, RunArguments, DPOConfig],
        args=args, stage_defaults={"output_dir": "outputs-dpo", "do_train": True, "do_eval": True},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_dpo_arguments(model_args, lora_args, data_args, dpo_args, training_args),),
                        reference_ratio=True)
    # seeds before the LoRA adapter is built, so a run and its resume start from the same adapter
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())

    # Tokenizer and chat format (the one SFT recorded next to the model, unless --template_name says otherwise)
    tokenizer = load_tokenizer(model_args)
    chat_format = resolve_chat_format(tokenizer, [model_args.model_name_or_path], data_args.template_name,
                                      data_args.system_prompt)
    logger.info("chat format: %s", chat_format.record())

    # Data: preference pairs -> prompt_ids / chosen_ids / rejected_ids fitted to --model_max_length
    with training_args.main_process_first(desc="tokenizing"):
        train_records, eval_records = load_splits(
            data_args, load_preferences, seed=training_args.seed, report_dir=training_args.output_dir
        )
        encode = dict(tokenizer=tokenizer, chat_format=chat_format, max_length=data_args.model_max_length,
                      truncation=dpo_args.truncation)
        train_dataset = encode_preference_dataset(train_records, name="train", **encode)
        eval_dataset = encode_preference_dataset(eval_records, name="eval", **encode) if eval_records else None
    logger.info("first train pair\n%s", describe_pair(tokenizer, train_dataset[0]))

    # Policy (+ LoRA adapter) and reference
    model = load_model(model_args, tokenizer=tokenizer)
    check_router_aux_loss(model, training_args)
    ref_model = load_reference_model(model, model_args, lora_args, dpo_args, training_args, tokenizer)
    if lora_args.use_peft:
        model = apply_lora(model, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)

    # Our CPU paths (--cpu_paths): each batch as one padding-free row with every prompt computed once
    shared_prompt = dpo_args.shared_prompt and model_args.cpu_paths == "on"
    trainer = build_trainer(model, ref_model, training_args, train_dataset, eval_dataset, tokenizer, lora_args,
                            callbacks=resilience_callbacks(run_args), shared_prompt=shared_prompt)

    # Train, save (model, tokenizer, chat format), evaluate (rewards/*, logps/* are in the logs, tensorboard and the
    # eval results), curves
    out = training_args.output_dir
    if training_args.do_train:
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format,
                       train_samples=len(train_dataset))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_record(trainer, out, len(eval_dataset), evaluate=evaluate_once)
    save_curves(trainer, out, title="DPO")
    return trainer


if __name__ == "__main__":
    run_main(main)
