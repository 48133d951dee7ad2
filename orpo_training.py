"""Reference-free preference optimisation: ORPO (default) or SimPO/CPO (``--loss_type``), LoRA, QLoRA or full.

    python orpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/reward \
        --validation_split_percentage 10 --output_dir outputs-orpo --learning_rate 5e-5
    python orpo_training.py --loss_type simpo --model_name_or_path outputs-sft-merged --train_file_dir data/reward \
        --output_dir outputs-simpo    # SimPO: --beta 2.0 --simpo_gamma 1.0 --cpo_alpha 0 unless given

No reference model is kept (DPO keeps one: a frozen copy with full training). ORPO adds the SFT loss on the chosen
reply, so it can start from a base model; SimPO rewards the length-normalised log-probability of each reply. Pairs
use the preference formats DPO reads, rendered with the same chat format as SFT; pairs longer than
``--model_max_length`` are cut in prompt and replies by default (``--truncation reply|left|drop``). The flags of
ORPOConfig (``orpo``) or CPOConfig (other loss types) are accepted: ``--loss_type simpo --help`` lists CPO's.
"""

from __future__ import annotations

import logging
import sys

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.chat_format import resolve_chat_format
from medtrain.data import load_splits
from medtrain.dpo import describe_pair, encode_preference_dataset
from medtrain.entrypoint import run_main
from medtrain.formats import load_preferences
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.orpo import OUTPUT_DIRS, ORPOArguments, build_orpo_trainer, check_orpo_arguments, method_for
from medtrain.outputs import evaluate_and_record, evaluate_once, save_curves, train_and_save
from medtrain.resilience import resilience_callbacks
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.orpo")


def main(args: list[str] | None = None):
    """Run ORPO/SimPO/CPO from command-line ``args`` (default: sys.argv); returns the trainer."""
    # Configuration: --loss_type picks the TRL config (two-pass parse); parse (pure), derive (max_length =
    # --model_max_length) and check once, then set up the process
    argv = list(sys.argv[1:] if args is None else args)
    loss_type, config_class, method_defaults = method_for(argv)
    model_args, lora_args, data_args, orpo_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, ORPOArguments, RunArguments, config_class], args=argv,
        stage_defaults={"output_dir": OUTPUT_DIRS.get(loss_type, "outputs-cpo"), "do_train": True, "do_eval": True,
                        **method_defaults},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_orpo_arguments(training_args),))
    # seeds before the LoRA adapter is built, so a run and its resume start from the same adapter
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())
    logger.info("method: %s (%s), beta %s", loss_type, type(training_args).__name__, training_args.beta)

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
                      truncation=orpo_args.truncation)
        train_dataset = encode_preference_dataset(train_records, name="train", **encode)
        eval_dataset = encode_preference_dataset(eval_records, name="eval", **encode) if eval_records else None
    logger.info("first train pair\n%s", describe_pair(tokenizer, train_dataset[0]))

    # Policy (+ LoRA adapter); no reference model
    model = load_model(model_args, tokenizer=tokenizer)
    if lora_args.use_peft:
        model = apply_lora(model, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)

    trainer = build_orpo_trainer(loss_type, model, training_args, train_dataset, eval_dataset, tokenizer,
                                 callbacks=[*resilience_callbacks(run_args)])

    # Train, save (model, tokenizer, chat format), evaluate (rewards/*, logps/*, log_odds_ratio or nll_loss are in
    # the logs and tensorboard), curves
    out = training_args.output_dir
    if training_args.do_train:
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format,
                       train_samples=len(train_dataset))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_record(trainer, out, len(eval_dataset), evaluate=evaluate_once)
    save_curves(trainer, out, title=loss_type.upper())
    return trainer


if __name__ == "__main__":
    run_main(main)
