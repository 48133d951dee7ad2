"""Reward models: a causal LM with a one-output ``score`` head, trained on preference pairs, saved, reloaded, scoring.

A reward model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` built from a causal LM checkpoint
(the base or a merged SFT output); its reward for a sequence is the head's output at the last token that is not
the pad token (``config.pad_token_id``). When the tokenizer pads with its end-of-turn token (SmolLM2's
``<|im_end|>``) that is the token just before the trailing end-of-turn; training and scoring read the same place.

Training minimises ``-log sigmoid(r_chosen - r_rejected - margin)``; :class:`RewardModelTrainer` is TRL's
RewardTrainer with per-pair (not per-batch) metrics. :func:`load_reward_model` reloads a LoRA adapter (trained
``score`` head included) or a full/merged model; :class:`RewardScorer` scores token ids or conversations
(the PPO stage and ``score_rewards.py`` use it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from trl import RewardTrainer

from .arguments import ModelArguments
from .chat_format import resolve_chat_format
from .errors import ConfigError, UserError
from .formats import LoadReport, iter_json_records, load_conversations, load_preferences
from .modeling import load_model, load_tokenizer, upcast_trainable
from .preference import TRUNCATION_CHOICES, encode_pair

logger = logging.getLogger(__name__)

SCORE_HEAD = "score"  # the head GenericForSequenceClassification puts on every causal LM
_PREFERENCE_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")


@dataclass
class RewardArguments:
    """Reward-model specific flags."""

    truncation: str = field(
        default="left",
        metadata={
            "help": "Pairs longer than --model_max_length: 'left' cuts the prompt from the left so both replies keep "
            "their ends; 'drop' drops the pair. A reply alone too long always drops its pair. Counts are logged.",
            "choices": TRUNCATION_CHOICES,
        },
    )
    predict_file: str | None = field(
        default=None,
        metadata={
            "help": "With --do_predict: a .json/.jsonl file (or a directory of them) of conversations or preference "
            "pairs to score after training; writes output_dir/predictions.jsonl."
        },
    )


def check_reward_arguments(model_args: ModelArguments, reward_args: RewardArguments, training_args: Any) -> None:
    """Flag problems specific to reward modelling, all at once, before anything is loaded."""
    problems = []
    if training_args.do_predict and not reward_args.predict_file:
        problems.append("--do_predict needs --predict_file FILE (conversations or preference pairs to score).")
    if reward_args.predict_file and not training_args.do_predict:
        problems.append("--predict_file is only read with --do_predict: add --do_predict or drop --predict_file.")
    if reward_args.predict_file and not os.path.exists(reward_args.predict_file):
        problems.append(f"--predict_file {reward_args.predict_file}: no such file or directory.")
    path = model_args.model_name_or_path
    if path and os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    ):
        problems.append(
            f"--model_name_or_path {path} is a LoRA adapter, not a model: merge it into its base model first "
            "and pass the merged directory."
        )
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------------------------------------------
# Loading


class _RewardModelClass:
    """An ``auto_class`` for :func:`modeling.load_model` that builds a one-output sequence classifier.

    ``load_model`` passes the checkpoint's config object, and ``from_pretrained`` ignores config kwargs such as
    ``num_labels`` next to an explicit config, so the label count is set on the config here.
    """

    @staticmethod
    def from_pretrained(path: str, config: Any, **kwargs: Any) -> Any:
        from transformers import AutoModelForSequenceClassification
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        config.num_labels = 1
        # A causal LM checkpoint has no score.weight (fresh head) and an lm_head the classifier does not use;
        # both are expected, so transformers' MISSING/UNEXPECTED report is silenced and logged once below.
        with suppress_seqcls_warning():
            return AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)


def load_reward_base(model_args: ModelArguments, tokenizer: Any, max_length: int | None = None) -> Any:
    """The model to train: ``--model_name_or_path`` as a one-output classifier, its pad id = the tokenizer's.

    ``max_length`` (the training length) lets ``--rope_scaling`` derive its factor, as for the other stages.
    """
    model = load_model(model_args, auto_class=_RewardModelClass, tokenizer=tokenizer, max_length=max_length)
    # The score is read at the last token != config.pad_token_id, so it must be the id batches are padded with.
    model.config.pad_token_id = tokenizer.pad_token_id
    if not _is_reward_checkpoint(model_args.model_name_or_path):
        logger.info("new reward head %s: %s (random init; trained with the adapter)", SCORE_HEAD,
                    tuple(getattr(model, SCORE_HEAD).weight.shape))
    return model


def _is_reward_checkpoint(path: str) -> bool:
    """True when ``path`` holds a saved one-output sequence classifier (not a causal LM)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or []
    labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    return any(a.endswith("ForSequenceClassification") for a in architectures) and labels == 1


def load_reward_tokenizer(path: str, base: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with the reward model (training saves it), else the base model's."""
    source = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    if source is None:
        source = _adapter_config(path)["base_model_name_or_path"] if _is_adapter(path) else path
    return load_tokenizer(ModelArguments(model_name_or_path=source, trust_remote_code=trust_remote_code))


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _adapter_config(path: str) -> dict:
    """A reward-model adapter's config; an adapter trained for another task is refused."""
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    if config.get("task_type") != "SEQ_CLS":
        raise UserError(
            f"{path}: this adapter was trained for {config.get('task_type')}, not as a reward model (SEQ_CLS)."
        )
    return config


def load_reward_model(
    path_or_adapter: str,
    base: str | None = None,
    tokenizer: Any = None,
    model_args: ModelArguments | None = None,
    merge: bool = False,
) -> Any:
    """Load a trained reward model in eval mode: a LoRA adapter dir (with its ``score`` head) or a full model dir.

    For an adapter, the base is ``base`` or the adapter's ``base_model_name_or_path``; it is loaded as a
    one-output classifier, resized to the tokenizer as training did, and the adapter (LoRA weights + trained head)
    applied on top (``merge=True`` folds it in). ``model_args`` carries dtype/quantization/trust_remote_code.
    """
    if not os.path.isdir(path_or_adapter):
        raise ConfigError(f"reward model {path_or_adapter}: no such directory.")
    model_args = model_args or ModelArguments()
    if _is_adapter(path_or_adapter):
        from peft import PeftModel

        config = _adapter_config(path_or_adapter)  # refuses a non-reward adapter even when base is given
        base_path = base or config.get("base_model_name_or_path")
        if tokenizer is None:
            tokenizer = load_reward_tokenizer(path_or_adapter, base_path, model_args.trust_remote_code)
        try:
            model = load_model(_with_path(model_args, base_path), auto_class=_RewardModelClass, tokenizer=tokenizer)
        except UserError as err:
            raise ConfigError(
                f"{path_or_adapter}: cannot load its base model {base_path!r} (adapter_config.json "
                f"base_model_name_or_path): {err}. Pass the base model directory (--base)."
            ) from None
        model.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(model, path_or_adapter, is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    else:
        if not _is_reward_checkpoint(path_or_adapter):
            raise UserError(
                f"{path_or_adapter} is not a reward model (no one-output *ForSequenceClassification config and no "
                "adapter_config.json): pass the output_dir of reward_modeling.py or its merged model."
            )
        if tokenizer is None:
            tokenizer = load_reward_tokenizer(path_or_adapter, None, model_args.trust_remote_code)
        model = load_model(_with_path(model_args, path_or_adapter), auto_class=_RewardModelClass, tokenizer=tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def _with_path(model_args: ModelArguments, path: str) -> ModelArguments:
    from dataclasses import replace

    return replace(model_args, model_name_or_path=path, tokenizer_name_or_path=None)


def load_reward_scorer(
    path_or_adapter: str,
    base: str | None = None,
    model_args: ModelArguments | None = None,
    template_name: str | None = None,
    system_prompt: str | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
) -> "RewardScorer":
    """Model, tokenizer and the chat format recorded at training time, ready to score."""
    model_args = model_args or ModelArguments()
    tokenizer = load_reward_tokenizer(path_or_adapter, base, model_args.trust_remote_code)
    model = load_reward_model(path_or_adapter, base, tokenizer=tokenizer, model_args=model_args)
    chat_format = resolve_chat_format(tokenizer, [path_or_adapter, base or ""], template_name, system_prompt)
    return RewardScorer(model, tokenizer, chat_format, max_length=max_length, batch_size=batch_size)


def check_reward_model_matches(policy_tokenizer, policy_format, scorer) -> None:
    """The reward model scores the policy's token ids directly: vocabularies and chat formats must agree."""
    if policy_tokenizer.get_vocab() != scorer.tokenizer.get_vocab():
        raise ConfigError(
            f"the reward model's tokenizer ({len(scorer.tokenizer)} tokens) differs from the policy's "
            f"({len(policy_tokenizer)} tokens): train the reward model from the same base/tokenizer as the policy."
        )
    probe = [{"role": "user", "content": "Is this format the same?"}]
    if policy_format.generation_prompt(probe) != scorer.chat_format.generation_prompt(probe):
        raise ConfigError(
            f"the reward model was trained with chat format {scorer.chat_format.record()} but the policy uses "
            f"{policy_format.record()}: pass the same --template_name/--system_prompt both were trained with."
        )


# --------------------------------------------------------------------------------------------------------------
# Data


def pair_rows(pairs: list[dict]) -> list[dict]:
    """Encoded pairs (``preference.encode_pairs``) as RewardTrainer rows: full sequences plus the margin."""
    return [
        {"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"],
         "margin": float(p["margin"])}
        for p in pairs
    ]


def score_position(ids: list[int], pad_token_id: int | None) -> int:
    """Index of the token whose output is the reward: the last one that is not the pad id."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_token_id:
            return i
    return len(ids) - 1


def describe_pair(tokenizer: Any, pair: dict) -> str:
    """Decoded layout of one encoded pair: prompt, both replies, and the token each reward is read at."""
    pad = tokenizer.pad_token_id
    lines = [f"pair layout: prompt {len(pair['prompt_ids'])} tok, chosen {len(pair['chosen_ids'])} tok, "
             f"rejected {len(pair['rejected_ids'])} tok, margin {pair.get('margin', 0.0)}"]
    lines.append(f"  [prompt  ] {tokenizer.decode(pair['prompt_ids'], skip_special_tokens=False)!r}")
    for name in ("chosen", "rejected"):
        full = pair["prompt_ids"] + pair[f"{name}_ids"]
        at = score_position(full, pad)
        token = tokenizer.decode(full[at : at + 1], skip_special_tokens=False)
        lines.append(f"  [{name:<8}] {tokenizer.decode(pair[f'{name}_ids'], skip_special_tokens=False)!r}  "
                     f"(reward read at token {at}: {token!r})")
    return "\n".join(lines)


def load_scoring_records(files: list[str], report: LoadReport | None = None) -> list[dict]:
    """Records to score, format detected per file: preference pairs (``chosen``/``rejected``) or conversations.

    A pair gives ``{"messages" (prompt), "chosen", "rejected", ...}``; a conversation (ending with an assistant
    turn) gives ``{"messages"}``. Every record keeps its ``source`` (file:line).
    """
    records: list[dict] = []
    for path in files:
        first = next(iter(iter_json_records(path)), None)
        is_pairs = first is not None and isinstance(first.data, dict) and any(k in first.data for k in _PREFERENCE_KEYS)
        records.extend((load_preferences if is_pairs else load_conversations)([path], report))
    return records


# --------------------------------------------------------------------------------------------------------------
# Loss and metrics


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(-log sigmoid(r_chosen - r_rejected - margin))`` (Bradley-Terry; InstructGPT / Llama 2 margin)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (a tie counts as wrong), mean chosen/rejected reward and mean reward margin."""
    chosen, rejected = chosen.double(), rejected.double()
    return {
        "accuracy": (chosen > rejected).double().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
    }


class RewardModelTrainer(RewardTrainer):
    """TRL's RewardTrainer (pre-tokenised ``chosen_ids``/``rejected_ids``/``margin`` rows) with exact metrics.

    RewardTrainer logs the mean of per-batch means (a short last batch weighs as much as a full one) and no
    chosen/rejected rewards; here every pair counts once: accuracy, chosen_reward, rejected_reward, reward_margin.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # RewardTrainer casts the trainable parameters of a quantized model to bf16 (QLoRA paper), the fresh score
        # head included. They go back to fp32: without autocast (the fp32 run) fp32 activations would meet a bf16 head
        # and the forward fails; under bf16 autocast (the CPU default where bf16 is fast) the head, trained from
        # random, would take AdamW updates below bf16's resolution. Under autocast the matmuls still run in bf16.
        quantized = getattr(self.model, "is_loaded_in_4bit", False) or getattr(self.model, "is_loaded_in_8bit", False)
        if quantized:
            upcast_trainable(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # The collator stacks the chosen sequences, then the rejected ones: [2B, T] -> rewards [2B]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
        loss = pairwise_loss(chosen, rejected, inputs.get("margin"))
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)

        # TRL's private metric store (_metrics, _total_train_tokens, _tp_size) is what RewardTrainer.log() averages;
        # there is no public way to add to it. Pinned by tests/test_configuration.py.
        if mode == "train":  # (TRL also copies this training count into the eval logs; here it stays in train)
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            # gathered per pair (duplicates from uneven last batches removed), so log() averages over pairs
            chosen_all = self.accelerator.gather_for_metrics(chosen.detach())
            rejected_all = self.accelerator.gather_for_metrics(rejected.detach())
            metrics = self._metrics[mode]
            metrics["accuracy"].extend((chosen_all > rejected_all).float().tolist())
            metrics["chosen_reward"].extend(chosen_all.tolist())
            metrics["rejected_reward"].extend(rejected_all.tolist())
            metrics["reward_margin"].extend((chosen_all - rejected_all).tolist())
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------------------------------------------
# Scoring


class RewardScorer:
    """Score token ids or conversations with a reward model (batched, no grad, eval mode).

    Conversations are rendered with ``chat_format`` exactly as training rendered pairs (``preference.encode_pair``),
    so a conversation scores the same as the chosen side of a pair with the same prompt and reply. Sequences longer
    than ``max_length`` keep their last ``max_length`` tokens (the reply's end, where the reward is read).
    """

    def __init__(self, model: Any, tokenizer: Any, chat_format: Any, max_length: int = 1024, batch_size: int = 8,
                 padding_side: str | None = None):
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format
        self.max_length, self.batch_size = max_length, batch_size
        self.padding_side = padding_side or getattr(tokenizer, "padding_side", "right")
        config = model.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        # Pad with the id the model skips when it looks for the last token, whatever the tokenizer says.
        self.pad_token_id = config.pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with an assistant reply, as training encodes ``prompt + chosen``."""
        if not messages or messages[-1]["role"] != "assistant":
            raise UserError("a conversation to score must end with an assistant reply")
        reply = messages[-1]["content"]
        record = {"messages": messages[:-1], "chosen": reply, "rejected": reply}
        # No length limit here: truncation (keep the end) happens in score_ids, for every caller alike.
        pair = encode_pair(self.tokenizer, self.chat_format, record, max_length=1 << 30)
        return pair.prompt_ids + pair.chosen_ids

    def pair_ids(self, record: dict) -> tuple[list[int], list[int]]:
        """``(prompt + chosen, prompt + rejected)`` ids of a preference record, truncated exactly as in training."""
        pair = encode_pair(self.tokenizer, self.chat_format, record, self.max_length, "left")
        if pair is not None:
            return pair.prompt_ids + pair.chosen_ids, pair.prompt_ids + pair.rejected_ids
        messages = record["messages"]
        return (self.conversation_ids(messages + [{"role": "assistant", "content": record["chosen"]}]),
                self.conversation_ids(messages + [{"role": "assistant", "content": record["rejected"]}]))

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards ``[N]`` (float32, CPU) of token-id sequences; batches padded on ``padding_side``."""
        sequences = [list(s)[-self.max_length :] for s in sequences]
        if any(not s for s in sequences):
            raise UserError("cannot score an empty token sequence")
        # Similar lengths in a batch waste less compute on padding; results go back to the input order.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        rewards = torch.empty(len(sequences), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                rewards[index] = self._score_batch([sequences[i] for i in index])
        finally:
            self.model.train(was_training)
        return rewards

    def _score_batch(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            cols = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, cols] = torch.tensor(ids)
            attention_mask[row, cols] = 1
        # Positions count real tokens only, so a left-padded sequence sees the positions it has unpadded (RoPE
        # models are indifferent to the shift; models with absolute position embeddings are not).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        device = self.device
        out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         position_ids=position_ids.to(device), use_cache=False)
        return out.logits.squeeze(-1).float().cpu()

    def score_conversations(self, conversations: list[list[dict]]) -> torch.Tensor:
        """Rewards ``[N]`` of conversations (message lists ending with the assistant reply to judge)."""
        return self.score_ids([self.conversation_ids(m) for m in conversations])

    def score_pairs(self, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen_rewards, rejected_rewards)`` of preference records (``formats.load_preferences``)."""
        ids = [self.pair_ids(r) for r in records]
        scores = self.score_ids([c for c, _ in ids] + [r for _, r in ids])
        return scores[: len(ids)], scores[len(ids) :]


def score_records(scorer: RewardScorer, records: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """Score ``records`` (:func:`load_scoring_records`): one output row per record, in order.

    A pair row has ``chosen_reward``/``rejected_reward``, a conversation row ``reward``; both keep ``source`` and
    ``messages``. Also returns :func:`pair_metrics` over the pairs among them (empty when there are none).
    """
    pairs = [r for r in records if "chosen" in r]
    conversations = [r for r in records if "chosen" not in r]
    chosen, rejected = scorer.score_pairs(pairs) if pairs else (torch.empty(0), torch.empty(0))
    single = scorer.score_conversations([r["messages"] for r in conversations]) if conversations else torch.empty(0)
    pair_scores = iter(zip(chosen.tolist(), rejected.tolist()))
    conversation_scores = iter(single.tolist())
    rows = []
    for record in records:
        row: dict[str, Any] = {"source": record["source"], "messages": record["messages"]}
        if "chosen" in record:
            c, r = next(pair_scores)
            row.update(chosen=record["chosen"], rejected=record["rejected"], chosen_reward=c, rejected_reward=r)
        else:
            row["reward"] = next(conversation_scores)
        rows.append(row)
    return rows, (pair_metrics(chosen, rejected) if pairs else {})


def write_jsonl(rows: list[dict], path: str) -> None:
    """Write rows as JSON Lines through a temporary file, so a failed run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
