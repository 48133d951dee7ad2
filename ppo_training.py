"""RLHF against a trained reward model: our own PPO (default), or TRL's RLOO / GRPO.

    python ppo_training.py --model_name_or_path outputs-sft-merged --reward_model_name_or_path outputs-rm \
        --train_file_dir data/sft --output_dir outputs-ppo --max_steps 20
    python ppo_training.py --rl_algo rloo ...   # TRL RLOOTrainer with the same reward model and prompts

``--rl_algo grpo`` is kept for existing command lines; it builds its trainer with medtrain.grpo.build_grpo_trainer,
the one grpo_training.py uses, which also combines the reward model with rule-based rewards
(``grpo_training.py --reward_funcs reward_model accuracy ...``, see docs/alignment.md).

Prompts are the user turns (with history and system prompt) of SFT/preference/prompt files, rendered with the
chat format the policy was trained with. The reward model must share the policy's vocabulary and chat format
(checked). With LoRA the reference policy is the same base with the adapter disabled (no second copy).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
import datasets
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers import TrainingArguments
from trl import GRPOConfig, RLOOConfig, RLOOTrainer

from medtrain.arguments import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    RunArguments,
    finalize,
    parse_args,
    peek_arg,
)
from medtrain.chat_format import resolve_chat_format
from medtrain.data import load_splits
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError, DataError
from medtrain.formats import load_prompts
from medtrain.grpo import build_grpo_trainer, resumable
from medtrain.modeling import apply_lora, load_model, load_tokenizer
from medtrain.outputs import save_curves, save_model_companions, train_and_save, write_results
from medtrain.ppo import PPOArguments, PPOTrainer
from medtrain.resilience import resilience_callbacks
from medtrain.reward import check_reward_model_matches, load_reward_model, load_reward_scorer
from medtrain.rewards import make_reward_model_reward
from medtrain.runtime import start_run

logger = logging.getLogger("medtrain.ppo")

RL_ALGOS = ["ppo", "rloo", "grpo"]


@dataclass
class RLArguments:
    """Which RL algorithm, and the reward/value models it uses."""

    rl_algo: str = field(default="ppo", metadata={"help": "ppo (ours), rloo or grpo (TRL).", "choices": RL_ALGOS})
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model from reward_modeling.py: its output dir (adapter) or a merged model."}
    )
    reward_base_model: str | None = field(
        default=None, metadata={"help": "Base model of a reward adapter when its adapter_config does not point to it."}
    )
    value_model_name_or_path: str | None = field(
        default=None, metadata={"help": "PPO value model initialisation (default: the reward model)."}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts longer than this many tokens are dropped (and counted)."}
    )

    def __post_init__(self) -> None:
        if not self.reward_model_name_or_path:
            raise ConfigError("--reward_model_name_or_path is required (the output of reward_modeling.py).")


def config_class(rl_algo: str) -> type:
    """The trainer's config for ``--rl_algo``: TRL's RLOOConfig/GRPOConfig, or plain TrainingArguments for our PPO."""
    return {"rloo": RLOOConfig, "grpo": GRPOConfig}.get(rl_algo, TrainingArguments)


def parse_config(args: list[str] | None = None) -> tuple:
    """Two-pass parse: ``--rl_algo`` first (flag or arguments file), since it picks the trainer's config class, then
    every dataclass. Returns ``(model, lora, data, run, rl, ppo (None for rloo/grpo), training)`` arguments."""
    argv = list(sys.argv[1:] if args is None else args)
    trainer_config = config_class(peek_arg("rl_algo", "ppo", argv))
    if trainer_config is TrainingArguments:
        return tuple(parse_args(
            [ModelArguments, LoraArguments, DataArguments, RunArguments, RLArguments, PPOArguments, trainer_config],
            argv, stage_defaults={"output_dir": "outputs-ppo", "learning_rate": 1e-5, "logging_steps": 1}))
    model_args, lora_args, data_args, run_args, rl_args, training_args = parse_args(
        [ModelArguments, LoraArguments, DataArguments, RunArguments, RLArguments, trainer_config],
        argv, stage_defaults={"output_dir": "outputs-rl"})
    return model_args, lora_args, data_args, run_args, rl_args, None, training_args


def check_no_validation_data(data_args: DataArguments) -> None:
    """No stage here evaluates on held-out prompts, so validation data would be read and silently unused."""
    if data_args.validation_file_dir or data_args.validation_split_percentage:
        raise ConfigError(
            "RL training does not evaluate on held-out prompts: --validation_file_dir/--validation_split_percentage "
            "would be silently unused (and a split would take prompts away from training). Remove them; evaluate "
            "the saved policy with inference.py or lm-eval instead."
        )


def encode_prompts(records: list[dict], tokenizer, chat_format, max_length: int, name: str) -> list[list[int]]:
    """Rendered, tokenised prompts; over-long ones are dropped with a logged count."""
    prompts = [tokenizer.encode(chat_format.generation_prompt(r["messages"], r.get("tools")), add_special_tokens=False)
               for r in records]
    kept = [p for p in prompts if len(p) <= max_length]
    if len(kept) < len(prompts):
        logger.warning("%s: dropped %d of %d prompts longer than --max_prompt_length %d",
                       name, len(prompts) - len(kept), len(prompts), max_length)
    if not kept:
        raise DataError(f"{name}: every prompt is longer than --max_prompt_length {max_length}")
    return kept


def main(args: list[str] | None = None):
    # Configuration: parse (pure; --rl_algo picks the trainer's config), derive and check once, set up the process
    model_args, lora_args, data_args, run_args, rl_args, ppo_args, training_args = parse_config(args)
    hardware = finalize(model_args, lora_args, data_args, training_args,
                        checks=(lambda: check_no_validation_data(data_args),), reference_ratio=True)
    resume = start_run(training_args, run_args.overwrite_output_dir)
    logging.getLogger("medtrain").info("hardware: %s", hardware.describe())

    # Policy tokenizer and chat format (recorded by the SFT stage in the policy's dir)
    tokenizer = load_tokenizer(model_args, padding_side="left")
    chat_format = resolve_chat_format(tokenizer, [model_args.model_name_or_path], data_args.template_name,
                                      data_args.system_prompt)
    logger.info("chat format: %s", chat_format.record())

    # Reward model (in the chat format it recorded at training time): same vocabulary and format as the policy
    scorer = load_reward_scorer(rl_args.reward_model_name_or_path, rl_args.reward_base_model,
                                model_args=ModelArguments(torch_dtype=model_args.torch_dtype,
                                                          trust_remote_code=model_args.trust_remote_code),
                                template_name=None, system_prompt=None)
    check_reward_model_matches(tokenizer, chat_format, scorer)

    # Prompts
    # (no validation split: check_no_validation_data refuses one rather than drop its prompts silently)
    train_records, _ = load_splits(data_args, load_prompts, seed=training_args.seed, report_dir=training_args.output_dir)
    train_prompts = encode_prompts(train_records, tokenizer, chat_format, rl_args.max_prompt_length, "train")

    # Policy (+ LoRA adapter)
    policy = load_model(model_args, tokenizer=tokenizer)
    if lora_args.use_peft:
        policy = apply_lora(policy, lora_args)
    stop_ids = sorted({i for i in (tokenizer.convert_tokens_to_ids(chat_format.stop_str), tokenizer.eos_token_id)
                       if isinstance(i, int) and i != tokenizer.unk_token_id})

    # Train and save (policy, tokenizer, chat format), curves
    out = training_args.output_dir
    if rl_args.rl_algo == "ppo":
        trainer = build_ppo(policy, tokenizer, scorer, train_prompts, stop_ids, model_args, lora_args, rl_args,
                            ppo_args, training_args, run_args)
        history = trainer.train(resume_from_checkpoint=resume)  # writes trainer_state.json as it logs
        trainer.save_model(out)
        if trainer.is_world_process_zero():
            save_model_companions(out, policy, tokenizer, chat_format)
            final = history[-1] if history else {}  # the last logged update's score, KL and losses
            write_results(out, "train", {k: v for k, v in final.items() if isinstance(v, (int, float))})
    else:  # TRL's RLOO/GRPO are transformers Trainers: saved like every other stage
        trainer = build_trl(policy, tokenizer, scorer, train_prompts, rl_args, training_args, run_args, stop_ids)
        train_and_save(trainer, out, resume, tokenizer=tokenizer, chat_format=chat_format,
                       train_samples=len(train_prompts))
    # output_dir/training_curves.png: our PPO's score, KL and losses; RLOO/GRPO's reward and KL
    save_curves(trainer, out, title=rl_args.rl_algo.upper())
    return trainer


def build_ppo(policy, tokenizer, scorer, train_prompts, stop_ids, model_args, lora_args, rl_args, ppo_args,
              training_args, run_args) -> PPOTrainer:
    """Our PPO: value model initialised from the reward model (or --value_model_name_or_path)."""
    value_path = rl_args.value_model_name_or_path or rl_args.reward_model_name_or_path
    # a reward adapter is merged: its weights (head included) start the value model, which trains its own adapter
    value_model = load_reward_model(value_path, rl_args.reward_base_model, tokenizer=tokenizer, merge=True,
                                    model_args=ModelArguments(torch_dtype=model_args.torch_dtype,
                                                              trust_remote_code=model_args.trust_remote_code))
    value_model.requires_grad_(not lora_args.use_peft)
    if lora_args.use_peft:
        value_model = apply_lora(value_model, lora_args, task_type="SEQ_CLS", extra_modules_to_save=["score"])

    def reward_fn(queries: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return scorer.score_ids([q + r for q, r in zip(queries, responses)])

    plugin = DeepSpeedPlugin(hf_ds_config=training_args.deepspeed) if training_args.deepspeed else None
    # cpu=True makes accelerate drop a DeepSpeed plugin silently, so it is only set without one.
    accelerator = Accelerator(cpu=training_args.use_cpu and plugin is None,
                              gradient_accumulation_steps=ppo_args.micro_batches_per_mini_batch,
                              deepspeed_plugin=plugin, mixed_precision="bf16" if training_args.bf16 else "no")
    return PPOTrainer(
        policy, value_model, reward_fn, tokenizer, train_prompts, ppo_args,
        stop_token_ids=stop_ids, output_dir=training_args.output_dir, seed=training_args.seed,
        learning_rate=training_args.learning_rate, max_steps=training_args.max_steps if training_args.max_steps > 0 else None,
        logging_steps=max(1, int(training_args.logging_steps)),
        save_steps=int(training_args.save_steps) if training_args.save_strategy == "steps" else 0,
        weight_decay=training_args.weight_decay, warmup_steps=int(training_args.warmup_steps),
        lr_scheduler_type=str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        max_grad_norm=training_args.max_grad_norm, accelerator=accelerator, on_nonfinite=run_args.on_nonfinite,
    )


def build_trl(policy, tokenizer, scorer, train_prompts, rl_args, training_args, run_args, stop_ids):
    """TRL's RLOO/GRPO with the same prompts and reward model (scores prompt ids + completion ids).

    GRPO is built by medtrain.grpo.build_grpo_trainer, the builder grpo_training.py uses (which can also combine
    the reward model with accuracy/format/length rewards: ``grpo_training.py --reward_funcs reward_model ...``).
    """
    dataset = datasets.Dataset.from_dict({"prompt": [tokenizer.decode(p) for p in train_prompts]})
    reward_funcs = [make_reward_model_reward(scorer, tokenizer)]
    if rl_args.rl_algo == "grpo":
        return build_grpo_trainer(policy, tokenizer, reward_funcs, training_args, dataset, stop_ids,
                                  callbacks=resilience_callbacks(run_args))
    return resumable(RLOOTrainer)(model=policy, reward_funcs=reward_funcs, args=training_args, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=resilience_callbacks(run_args))


if __name__ == "__main__":
    run_main(main)
