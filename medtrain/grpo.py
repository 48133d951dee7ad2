"""GRPO with combinable rewards: flags, prompt datasets, the reward-function list, and TRL's GRPOTrainer.

``grpo_training.py`` trains on questions with reference answers (:mod:`medtrain.questions`) and rule-based rewards
(:mod:`medtrain.rewards`), optionally plus a trained reward model; ``ppo_training.py --rl_algo grpo`` (reward model
only) builds its trainer through the same :func:`build_grpo_trainer`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, DataError
from .rewards import (
    ANSWER_TYPES,
    REWARD_NAMES,
    RewardFunc,
    accuracy_reward,
    format_reward,
    make_length_reward,
    make_reward_model_reward,
)

logger = logging.getLogger(__name__)


@dataclass
class GRPORewardArguments:
    """Which rewards GRPO sums (weights: TRL's --reward_weights, in the same order) and how they are computed."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={"help": "Rewards to combine, space-separated: accuracy (vs the reference answer), format "
                  "(<think>...</think> then the answer), length (concise completions), reward_model (a model "
                  "trained by reward_modeling.py). Weighted by --reward_weights in this order (default all 1).",
                  "choices": REWARD_NAMES},
    )
    answer_type: str = field(
        default="auto",
        metadata={"help": "How the accuracy reward compares answers when an open question (no options) has no "
                  "answer_type: math (math-verify), text (normalised equality), or auto (math for numeric/formula "
                  "answers, else text); choice makes an open question an error. Questions with options are always scored by "
                  "their option letter (choice).",
                  "choices": ["auto"] + ANSWER_TYPES},
    )
    length_target_tokens: int | None = field(
        default=None,
        metadata={"help": "length reward: completions up to this many tokens score 1, falling linearly to 0 at "
                  "--max_completion_length. Default: half of --max_completion_length."},
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "reward_model reward: the output of reward_modeling.py (adapter or merged)."}
    )
    reward_base_model: str | None = field(
        default=None, metadata={"help": "Base model of a reward adapter when its adapter_config does not point to it."}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts longer than this many tokens are dropped (and counted)."}
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.reward_funcs:
            problems.append("--reward_funcs: give at least one reward.")
        duplicates = sorted({n for n in self.reward_funcs if self.reward_funcs.count(n) > 1})
        if duplicates:
            problems.append(f"--reward_funcs lists {', '.join(duplicates)} twice; weight it with --reward_weights.")
        if "reward_model" in self.reward_funcs and not self.reward_model_name_or_path:
            problems.append("--reward_funcs reward_model needs --reward_model_name_or_path (from reward_modeling.py).")
        if self.reward_model_name_or_path and "reward_model" not in self.reward_funcs:
            problems.append("--reward_model_name_or_path is only used with --reward_funcs ... reward_model.")
        if self.length_target_tokens is not None and "length" not in self.reward_funcs:
            problems.append("--length_target_tokens is only used with --reward_funcs ... length.")
        if problems:
            raise ConfigError(problems)


def check_grpo_arguments(reward_args: GRPORewardArguments, data_args: Any, training_args: Any) -> None:
    """Cross-flag checks GRPOConfig does late or not at all; every problem at once."""
    problems = []
    held_out = data_args.validation_file_dir or data_args.validation_split_percentage
    if held_out and str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no":
        problems.append("--validation_file_dir/--validation_split_percentage without --eval_strategy: the held-out "
                        "questions would be read (or taken from training) and never used. Add --eval_strategy steps "
                        "--eval_steps N (eval rewards are logged as eval_rewards/<name>/mean) or remove them.")
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(reward_args.reward_funcs):
        problems.append(f"--reward_weights has {len(weights)} value(s) for {len(reward_args.reward_funcs)} reward(s) "
                        f"({' '.join(reward_args.reward_funcs)}): give one weight per reward, in the same order.")
    limit = training_args.max_completion_length
    target = reward_args.length_target_tokens
    if target is not None and not 0 < target < limit:
        problems.append(f"--length_target_tokens {target} must be between 1 and --max_completion_length {limit} - 1.")
    if training_args.use_vllm:
        problems.append("--use_vllm needs a vLLM install and a GPU; this stage generates with transformers.")
    if problems:
        raise ConfigError(problems)


def build_reward_funcs(reward_args: GRPORewardArguments, training_args: Any, tokenizer: Any, stop_ids: list[int],
                       scorer: Any = None) -> list[RewardFunc]:
    """The reward functions in ``--reward_funcs`` order (``scorer``: the loaded reward model, for reward_model)."""
    limit = training_args.max_completion_length
    funcs = []
    for name in reward_args.reward_funcs:
        if name == "accuracy":
            funcs.append(accuracy_reward)
        elif name == "format":
            funcs.append(format_reward)
        elif name == "length":
            funcs.append(make_length_reward(reward_args.length_target_tokens or max(1, limit // 2), limit, stop_ids))
        elif name == "reward_model":
            funcs.append(make_reward_model_reward(scorer, tokenizer))
    return funcs


def stop_token_ids(tokenizer: Any, chat_format: Any) -> list[int]:
    """Token ids that end a reply: the chat format's end-of-turn token and the tokenizer's eos."""
    ids = {tokenizer.convert_tokens_to_ids(chat_format.stop_str) if chat_format.stop_str else None,
           tokenizer.eos_token_id}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


def prompt_dataset(records: list[dict], tokenizer: Any, chat_format: Any, max_length: int, name: str,
                   columns: tuple[str, ...] = ("answer", "answer_type", "choices")):
    """A ``datasets.Dataset`` of rendered text prompts (+ the reward columns); over-long prompts dropped, counted.

    The prompt is the chat format's generation prompt (system prompt and assistant header included), so the policy
    sees what inference will show it.
    """
    import datasets

    rows = []
    for record in records:
        text = chat_format.generation_prompt(record["messages"])
        if len(tokenizer(text=text)["input_ids"]) <= max_length:
            rows.append({"prompt": text, **{c: record[c] for c in columns if c in record}})
    if len(rows) < len(records):
        logger.warning("%s: dropped %d of %d prompts longer than --max_prompt_length %d",
                       name, len(records) - len(rows), len(records), max_length)
    if not rows:
        raise DataError(f"{name}: every prompt is longer than --max_prompt_length {max_length}")
    return datasets.Dataset.from_list(rows)


def build_grpo_trainer(policy: Any, tokenizer: Any, reward_funcs: list[RewardFunc], training_args: Any,
                       train_dataset: Any, stop_ids: list[int], eval_dataset: Any = None,
                       callbacks: list | None = None):
    """TRL's GRPOTrainer on text prompts; generation ends at the chat format's stop tokens; a resumed run gets each
    epoch's prompt order (:func:`resumable`)."""
    from trl import GRPOTrainer

    # GRPOTrainer ends completions at the model's generation eos ids (plus the tokenizer's eos)
    policy.generation_config.eos_token_id = stop_ids
    return resumable(GRPOTrainer)(model=policy, reward_funcs=reward_funcs, args=training_args,
                                train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                                callbacks=callbacks)


@functools.cache
def resumable(trainer_class: type) -> type:
    """TRL's GRPOTrainer or RLOOTrainer (``trainer_class``) drawing its prompts through :func:`epoch_seeded_sampler`,
    so that a run resumed at an epoch boundary trains on that epoch's prompts. (Overrides TRL's private
    ``_get_train_sampler``: if it stops being called, the kill -9 resume tests of GRPO and RLOO fail.)"""

    class Resumable(trainer_class):
        def _get_train_sampler(self, dataset: Any = None) -> Any:
            return epoch_seeded_sampler(super()._get_train_sampler(dataset))

    Resumable.__name__ = Resumable.__qualname__ = f"Resumable{trainer_class.__name__}"
    return Resumable


def epoch_seeded_sampler(sampler: Any) -> Any:
    """TRL's shuffling ``RepeatSampler`` made to draw epoch ``e``'s order from ``seed + e`` (its ``set_epoch``, which the
    Trainer calls through accelerate before every epoch), returned as is otherwise.

    TRL's sampler draws every epoch's order from one generator seeded once. transformers 5 no longer iterates the
    dataloader past the epochs a resumed run has already trained, so a run resumed at an epoch boundary started the
    generator afresh and replayed the first epoch's order (found by the kill -9 resume test of grpo_training.py: the
    resumed run's step 5 trained on step 1's prompts; RLOO's sampler is the same). Epoch 0's order is TRL's; later
    epochs' orders differ from TRL's but are the same whether or not the run was resumed.
    """
    from trl.trainer.utils import RepeatSampler

    if type(sampler) is RepeatSampler and sampler.shuffle and sampler.seed is not None:
        sampler.__class__ = _epoch_seeded_class()
    return sampler


@functools.cache
def _epoch_seeded_class() -> type:
    from trl.trainer.utils import RepeatSampler

    class EpochSeededRepeatSampler(RepeatSampler):
        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(self.seed + epoch)

    return EpochSeededRepeatSampler
