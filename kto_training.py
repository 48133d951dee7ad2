"""KTO (TRL's KTOTrainer) on unpaired thumbs-up/down feedback or split preference pairs; LoRA, QLoRA or full.

    python kto_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/kto \
        --validation_split_percentage 10 --output_dir outputs-kto --learning_rate 5e-5
    python kto_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/reward ...  # pairs, split

Data: ``{"messages": [...], "label": true|false}`` or ShareGPT ``{"conversations": [...], "label": ...}`` (the last
assistant turn is judged), or any preference-pair layout DPO reads (one desirable + one undesirable example per
pair); see medtrain/kto.py. Examples are rendered with the same chat format as SFT. When desirable and undesirable
examples are unbalanced, the minority class is up-weighted unless weights are given (``--balance_weights``). The
reference is the base with the LoRA adapter disabled (LoRA) or a frozen copy (full training).
"""

from __future__ import annotations

import logging
import random

from trl import KTOConfig

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.chat_format import resolve_chat_format
from medtrain.data import load_splits
from medtrain.dpo import DPOArguments, load_reference_model
from medtrain.entrypoint import run_main
from medtrain.kto import (
    KTOArguments,
    build_kto_trainer,
    check_kto_arguments,
    class_weights,
    encode_kto_dataset,
    load_kto_examples,
)
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.outputs import evaluate_and_record, evaluate_once, save_curves, train_and_save
from medtrain.resilience import resilience_callbacks
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.kto")


def main(args: list[str] | None = None):
    """Run KTO from command-line ``args`` (default: sys.argv); returns the trainer."""
    # Configuration: parse (pure), derive (max_length = --model_max_length) and check once, set up the process
    model_args, lora_args, data_args, kto_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, KTOArguments, RunArguments, KTOConfig],
        args=args, stage_defaults={"output_dir": "outputs-kto", "do_train": True, "do_eval": True},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_kto_arguments(training_args),),
                        reference_ratio=True)
    # seeds before the LoRA adapter is built, so a run and its resume start from the same adapter
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())

    # Tokenizer and chat format (the one SFT recorded next to the model, unless --template_name says otherwise)
    tokenizer = load_tokenizer(model_args)
    chat_format = resolve_chat_format(tokenizer, [model_args.model_name_or_path], data_args.template_name,
                                      data_args.system_prompt)
    logger.info("chat format: %s", chat_format.record())

    # Data: labelled examples -> prompt_ids / completion_ids / label. KTO reads them in a fixed order (its KL term
    # pairs each prompt with its neighbour's completion), so they are shuffled once here: a split pair's two halves
    # would otherwise sit side by side.
    with training_args.main_process_first(desc="tokenizing"):
        train_examples, eval_examples = load_splits(data_args, load_kto_examples, seed=training_args.seed,
                                                    report_dir=training_args.output_dir)
        random.Random(training_args.seed).shuffle(train_examples)
        encode = dict(tokenizer=tokenizer, chat_format=chat_format, max_length=data_args.model_max_length,
                      truncation=kto_args.truncation)
        train_dataset = encode_kto_dataset(train_examples, name="train", **encode)
        eval_dataset = encode_kto_dataset(eval_examples, name="eval", **encode) if eval_examples else None
    n_desirable = sum(train_dataset["label"])
    n_undesirable = len(train_dataset) - n_desirable
    training_args.desirable_weight, training_args.undesirable_weight = class_weights(
        n_desirable, n_undesirable, training_args.desirable_weight, training_args.undesirable_weight,
        kto_args.balance_weights)
    logger.info("train: %d desirable, %d undesirable examples; desirable_weight %s, undesirable_weight %s",
                n_desirable, n_undesirable, training_args.desirable_weight, training_args.undesirable_weight)
    first = train_dataset[0]
    logger.info("first example (label %s)\n  [prompt    ] %r\n  [completion] %r", first["label"],
                tokenizer.decode(first["prompt_ids"]), tokenizer.decode(first["completion_ids"]))

    # Policy (+ LoRA adapter) and reference (the base with the adapter disabled, or a frozen copy)
    model = load_model(model_args, tokenizer=tokenizer)
    # DPO's policy (DPOArguments(): no --ref_model_name_or_path for KTO): None with LoRA, else a frozen copy
    ref_model = load_reference_model(model, model_args, lora_args, DPOArguments(), training_args, tokenizer)
    if lora_args.use_peft:
        model = apply_lora(model, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)

    trainer = build_kto_trainer(model, ref_model, training_args, train_dataset, eval_dataset, tokenizer, lora_args,
                                callbacks=[*resilience_callbacks(run_args)])

    # Train, save (model, tokenizer, chat format), evaluate (rewards/chosen, rewards/rejected, kl, logps/* are in the
    # logs and tensorboard), curves
    out = training_args.output_dir
    if training_args.do_train:
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format,
                       train_samples=len(train_dataset))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_record(trainer, out, len(eval_dataset), evaluate=evaluate_once)
    save_curves(trainer, out, title="KTO")
    return trainer


if __name__ == "__main__":
    run_main(main)
