"""Continued pretraining (causal LM on plain domain text) with LoRA, QLoRA or full training.

    python pretraining.py --model_name_or_path models/SmolLM2-135M-Instruct --train_file_dir data/pretrain \
        --validation_split_percentage 10 --block_size 512 --output_dir outputs-pt
    python pretraining.py --model_name_or_path models/SmolLM2-135M-Instruct --train_file_dir /big/corpus \
        --streaming --max_steps 10000 --validation_file_dir /big/heldout --output_dir outputs-pt-big

Documents (lines of .txt, or "text" of .json/.jsonl records) end with EOS and are packed into block_size blocks.
Tokenised blocks are cached under --cache_dir_data and reused by later runs on the same files and tokenizer.
A tokenizer larger than the model (see extend_tokenizer.py) grows the embeddings; with LoRA the embedding and
output layers are then trained in full and saved in the adapter. Evaluation reports loss, perplexity and
next-token accuracy (eval_results.txt / eval_results.json).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from transformers import AutoConfig, Trainer, TrainingArguments

from medtrain.arguments import LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.attention import register_varlen_attention
from medtrain.entrypoint import run_main
from medtrain.errors import UserError
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.outputs import evaluate_and_record, evaluate_once, language_model_perplexity, save_curves, train_and_save
from medtrain.pretrain_data import (
    PretrainCollator,
    PretrainDataArguments,
    check_pretrain_arguments,
    load_pretrain_datasets,
    resolve_block_size,
)
from medtrain.resilience import resilience_callbacks
from medtrain.runtime import start_run
from medtrain.tokenization import IGNORE_INDEX

logger = logging.getLogger("medtrain.pt")


def argmax_logits(logits: Any, labels: Any) -> Any:
    """Keep only the predicted token ids: (batch, seq) ints instead of (batch, seq, vocab) floats."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def next_token_accuracy(eval_pred: Any) -> dict:
    """Share of trained positions whose next token is predicted exactly (logits at t predict the token at t+1)."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions, labels = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    return {"accuracy": float((predictions[mask] == labels[mask]).mean()) if mask.any() else 0.0}


def model_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def trainable_length(config: Any, model_args: ModelArguments) -> int | None:
    """The longest block the model can train on: its positions, times an explicit --rope_scaling_factor.
    --rope_scaling without a factor derives the factor from the block size, so nothing caps it (None)."""
    positions = model_positions(config)
    if positions is None or not model_args.rope_scaling:
        return positions
    return int(positions * model_args.rope_scaling_factor) if model_args.rope_scaling_factor else None


def load_config(model_args: ModelArguments) -> Any:
    try:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code,
                                          cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from {model_args.model_name_or_path}: {str(err).splitlines()[0]}") from None


def embedding_module_names(model: Any) -> list[str]:
    """Names (last path component) of the input and output embedding modules, e.g. embed_tokens, lm_head."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if any(module is w for w in wanted)]


def main(args: list[str] | None = None) -> Trainer:
    # Configuration: parse (pure), derive the trainer's fields and check everything once, then set up the process
    model_args, lora_args, data_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, PretrainDataArguments, RunArguments, TrainingArguments], args,
        stage_defaults={"output_dir": "outputs-pt", "do_train": True, "do_eval": True, "label_names": ["labels"]},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_pretrain_arguments(data_args, training_args),))
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())

    # Tokenizer, and the block size the model can take
    tokenizer = load_tokenizer(model_args)
    config = load_config(model_args)
    block_size = resolve_block_size(data_args.block_size, trainable_length(config, model_args))

    # Data: documents -> EOS-terminated token blocks, tokenised once and cached
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset, eval_dataset = load_pretrain_datasets(data_args, tokenizer, block_size, seed=training_args.seed)
    first = next(iter(train_dataset))["input_ids"]
    logger.info("first train block (%d tokens): %r", len(first), tokenizer.decode(first[:64]))
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * training_args.world_size * block_size)
    logger.info("tokens per optimizer step (at most): %d", tokens_per_step)

    # Model (+ LoRA). New vocabulary rows are useless unless trained: with LoRA, train the embeddings in full.
    resized = len(tokenizer) > getattr(config, "vocab_size", len(tokenizer))
    model = load_model(model_args, tokenizer=tokenizer, max_length=block_size)  # max_length: --rope_scaling factor
    if model_args.cpu_paths == "on" and model.config._attn_implementation == "sdpa":
        # our attention function: blocks of <= 512 tokens without padding run as bf16 matmuls when the step is bf16
        # (torch's CPU flash kernel is slow in bf16); everything else still goes to sdpa
        model.set_attn_implementation(register_varlen_attention())
    if lora_args.use_peft:
        extra = []
        if resized:
            extra = [n for n in embedding_module_names(model) if n not in (lora_args.modules_to_save_list or [])]
            if extra:
                logger.warning("the tokenizer added tokens: training %s in full (added to --modules_to_save)", extra)
        model = apply_lora(model, lora_args, gradient_checkpointing=training_args.gradient_checkpointing,
                           extra_modules_to_save=extra)

    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=PretrainCollator(tokenizer.pad_token_id),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=next_token_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
        callbacks=resilience_callbacks(run_args),
    )

    # Train, save (model, tokenizer, rope record), evaluate (loss, perplexity, next-token accuracy;
    # a last step that --eval_strategy already evaluated is reused, not run again), curves
    out, streamed = training_args.output_dir, data_args.streaming  # a streamed corpus has no length: no *_samples
    if training_args.do_train:
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=None,  # plain text: no chat format
                       train_samples=None if streamed else len(train_dataset))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_record(trainer, out, None if streamed else len(eval_dataset), evaluate=evaluate_once,
                            derived=language_model_perplexity)
    save_curves(trainer, out, title="PT")
    return trainer


if __name__ == "__main__":
    run_main(main)
