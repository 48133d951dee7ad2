"""GRPO (TRL's GRPOTrainer) on questions with reference answers, with combinable, weighted rewards.

    python grpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/grpo \
        --output_dir outputs-grpo --reward_funcs accuracy format --reward_weights 1.0 0.5
    python grpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir cmmlu/test \
        --reward_funcs accuracy length reward_model --reward_model_name_or_path outputs-rm --num_generations 4

Data: ``{"question", "answer"}`` JSON/JSON Lines (free text or math), multiple choice as JSON Lines
``{"question", "options", "answer": "B"}`` or CMMLU CSV ``,Question,A,B,C,D,Answer`` (see medtrain/questions.py).
Each question is rendered with the chat format the policy was trained with (``--system_prompt`` adds an
instruction such as "think inside <think></think>, then answer"); rewards are in medtrain/rewards.py, logged as
``rewards/<name>/mean`` next to the weighted ``reward``. Every GRPOConfig option is a flag (``--help``).
"""

from __future__ import annotations

import functools
import logging

from trl import GRPOConfig

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.chat_format import resolve_chat_format
from medtrain.data import load_splits
from medtrain.entrypoint import run_main
from medtrain.grpo import (
    GRPORewardArguments,
    build_grpo_trainer,
    build_reward_funcs,
    check_grpo_arguments,
    prompt_dataset,
    stop_token_ids,
)
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.outputs import evaluate_and_record, evaluate_once, save_curves, train_and_save
from medtrain.questions import QUESTION_EXTENSIONS, load_questions
from medtrain.resilience import resilience_callbacks
from medtrain.reward import check_reward_model_matches, load_reward_scorer
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.grpo")


def main(args: list[str] | None = None):
    """Run GRPO from command-line ``args`` (default: sys.argv); returns the trainer."""
    # Configuration: parse (pure), derive and check everything once, then set up the process
    model_args, lora_args, data_args, reward_args, run_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, GRPORewardArguments, RunArguments, GRPOConfig],
        args=args, stage_defaults={"output_dir": "outputs-grpo", "logging_steps": 1},
    )
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_grpo_arguments(reward_args, data_args, training_args),),
                        reference_ratio=True)
    # seeds before the LoRA adapter is built, so a run and its resume start from the same adapter
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())

    # Tokenizer (left padding for generation) and the chat format the policy was trained with
    tokenizer = load_tokenizer(model_args, padding_side="left")
    chat_format = resolve_chat_format(tokenizer, [model_args.model_name_or_path], data_args.template_name,
                                      data_args.system_prompt)
    logger.info("chat format: %s", chat_format.record())
    stop_ids = stop_token_ids(tokenizer, chat_format)

    # Questions -> text prompts with answer / answer_type / choices columns for the rewards
    loader = functools.partial(load_questions, default_answer_type=reward_args.answer_type)
    train_records, eval_records = load_splits(data_args, loader, seed=training_args.seed,
                                              report_dir=training_args.output_dir, extensions=QUESTION_EXTENSIONS)
    train_dataset = prompt_dataset(train_records, tokenizer, chat_format, reward_args.max_prompt_length, "train")
    eval_dataset = (prompt_dataset(eval_records, tokenizer, chat_format, reward_args.max_prompt_length, "eval")
                    if eval_records else None)
    kinds = {k: train_dataset["answer_type"].count(k) for k in sorted(set(train_dataset["answer_type"]))}
    logger.info("%d train prompts (answer types %s); first:\n%r -> %r", len(train_dataset), kinds,
                train_dataset[0]["prompt"], train_dataset[0]["answer"])

    # Rewards (the reward model, if used, must share the policy's vocabulary and chat format)
    scorer = None
    if "reward_model" in reward_args.reward_funcs:
        scorer = load_reward_scorer(reward_args.reward_model_name_or_path, reward_args.reward_base_model,
                                    model_args=ModelArguments(torch_dtype=model_args.torch_dtype,
                                                              trust_remote_code=model_args.trust_remote_code))
        check_reward_model_matches(tokenizer, chat_format, scorer)
    reward_funcs = build_reward_funcs(reward_args, training_args, tokenizer, stop_ids, scorer)
    logger.info("rewards: %s, weights %s", reward_args.reward_funcs, training_args.reward_weights or "all 1.0")

    # Policy (+ LoRA adapter)
    policy = load_model(model_args, tokenizer=tokenizer)
    if lora_args.use_peft:
        policy = apply_lora(policy, lora_args, gradient_checkpointing=training_args.gradient_checkpointing)

    trainer = build_grpo_trainer(policy, tokenizer, reward_funcs, training_args, train_dataset, stop_ids,
                                 eval_dataset=eval_dataset, callbacks=[*resilience_callbacks(run_args)])

    # Train, save (model, tokenizer, chat format), evaluate (rewards on the held-out prompts, with --do_eval),
    # curves (rewards/<name>/mean, reward, kl, completions/* are in the logs and tensorboard)
    out = training_args.output_dir
    train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format, train_samples=len(train_dataset))
    if training_args.do_eval and eval_dataset is not None:
        evaluate_and_record(trainer, out, len(eval_dataset), evaluate=evaluate_once)
    save_curves(trainer, out, title="GRPO")
    return trainer


if __name__ == "__main__":
    run_main(main)
