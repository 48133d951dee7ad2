"""KTO (Ethayarajh et al. 2024) on unpaired thumbs-up/down data: readers, encoding, class weights, the trainer.

Data (one layout per file; every error names ``file:line: field``):

- ``{"messages": [...], "label": true|false}`` (LLaMA-Factory's kto layout; OpenAI roles) or ShareGPT
  ``{"conversations": [...], "label": true|false}``: the last assistant turn is the judged completion, everything
  before it the prompt. ``label`` must be a JSON boolean (``"true"``, ``1`` or ``"yes"`` are refused).
- Any preference-pair layout DPO reads: each pair becomes one desirable (chosen) and one undesirable (rejected)
  example with the same prompt.

An example is encoded exactly as a DPO pair whose two replies are the same completion
(:func:`medtrain.preference.encode_pair`), so prompt and completion ids are the turn as SFT renders it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trl import KTOTrainer

from .errors import ConfigError, DataError
from .formats import LoadReport, iter_json_records, load_conversations, load_preferences
from .preference import DPO_TRUNCATION_CHOICES, encode_pair

logger = logging.getLogger(__name__)

_PAIR_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")


@dataclass
class KTOArguments:
    """How over-long examples are fitted, and whether unbalanced classes are re-weighted."""

    truncation: str = field(
        default="reply",
        metadata={"help": "Examples longer than --model_max_length tokens: 'reply' keeps at least half the length for "
                  "the end of the prompt and cuts the completion at the end, 'left' cuts the prompt from the left "
                  "(dropped if the completion alone is too long), 'drop' skips them. Counts are logged.",
                  "choices": DPO_TRUNCATION_CHOICES},
    )
    balance_weights: bool = field(
        default=True,
        metadata={"help": "When desirable and undesirable examples are unbalanced and --desirable_weight/"
                  "--undesirable_weight are both left at 1.0, weight the minority class so that "
                  "desirable_weight * n_desirable = undesirable_weight * n_undesirable (the lower end of the KTO "
                  "paper's recommended ratio [1, 4/3]). The weights used are logged."},
    )


def check_kto_arguments(training_args: Any) -> None:
    """Flags KTOTrainer would refuse late (with a traceback); all at once."""
    problems = []
    if training_args.loss_type == "kto" and training_args.per_device_train_batch_size < 2:
        problems.append(f"--per_device_train_batch_size {training_args.per_device_train_batch_size}: KTO estimates "
                        "its KL term from the other completions of the same batch, so it needs at least 2 per device "
                        "(or --loss_type apo_zero_unpaired, which has no KL term).")
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------------------------------
# Reading


def _is_pair_file(path: str) -> bool:
    first = next(iter(iter_json_records(path)), None)
    return first is not None and isinstance(first.data, dict) and any(k in first.data for k in _PAIR_KEYS)


def _labels(path: str, report: LoadReport) -> dict[str, bool]:
    """``file:line -> label`` for every record of an unpaired file whose ``label`` is a boolean; bad ones reported."""
    labels = {}
    for record in iter_json_records(path):
        data = record.data
        if not isinstance(data, dict):
            continue  # load_conversations reports it
        if "label" not in data:
            report.problems.append(record.error("missing: an unpaired KTO example needs \"label\": true "
                                                "(desirable) or false (undesirable)", "label"))
        elif not isinstance(data["label"], bool):
            report.problems.append(record.error(f"expected true or false, got {data['label']!r}", "label"))
        else:
            labels[record.where] = data["label"]
    return labels


def load_kto_examples(files: list[str], report: LoadReport | None = None) -> list[dict]:
    """Examples ``{"messages" (prompt), "completion", "label", "source"}`` from unpaired or paired files. Bad records
    are collected in ``report`` (the stage's bad-record policy decides); without one any problem raises."""
    collect = report if report is not None else LoadReport()
    out = []
    for path in files:
        try:
            paired = _is_pair_file(path)
        except DataError as err:
            collect.file_errors.append(err)
            continue
        if paired:
            for pair in load_preferences([path], collect):
                for reply, label in ((pair["chosen"], True), (pair["rejected"], False)):
                    out.append({"messages": pair["messages"], "completion": reply, "label": label,
                                "source": pair["source"]})
            continue
        labels = _labels(path, collect)
        for conversation in load_conversations([path], collect):
            if conversation["source"] not in labels:
                continue  # its label was bad: reported above
            messages = conversation["messages"]
            out.append({"messages": messages[:-1], "completion": messages[-1]["content"],
                        "label": labels[conversation["source"]], "source": conversation["source"]})
    if report is None:
        collect.raise_if_any()
    return out


# ------------------------------------------------------------------------------------------------------------------
# Encoding and weights


def encode_kto_dataset(examples: list[dict], tokenizer: Any, chat_format: Any, max_length: int, truncation: str,
                       name: str):
    """A ``datasets.Dataset`` of ``prompt_ids``/``completion_ids``/``label`` (over-long examples fitted, counted)."""
    import datasets

    rows, truncated = [], 0
    for example in examples:
        record = {"messages": example["messages"], "chosen": example["completion"], "rejected": example["completion"]}
        pair = encode_pair(tokenizer, chat_format, record, max_length, truncation)
        if pair is None:
            continue
        truncated += pair.truncated
        rows.append({"prompt_ids": pair.prompt_ids, "completion_ids": pair.chosen_ids, "label": example["label"]})
    dropped = len(examples) - len(rows)
    if truncated or dropped:
        logger.warning("%s: %d of %d examples longer than %d tokens: %d cut (--truncation %s), %d dropped",
                       name, truncated + dropped, len(examples), max_length, truncated, truncation, dropped)
    if not rows:
        raise DataError(f"{name}: every example is longer than {max_length} tokens; raise --model_max_length")
    return datasets.Dataset.from_list(rows)


def class_weights(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, balance: bool = True) -> tuple[float, float]:
    """``(desirable_weight, undesirable_weight)`` to train with.

    Given weights (either not 1.0) or ``balance=False`` are kept. Otherwise the minority class is weighted by the
    class ratio so that ``desirable_weight * n_desirable == undesirable_weight * n_undesirable``, rounded to 2
    decimals (KTO paper, Eq. 8: that product ratio should lie in [1, 4/3]).
    """
    if not balance or (desirable_weight, undesirable_weight) != (1.0, 1.0) or not n_desirable or not n_undesirable:
        return desirable_weight, undesirable_weight
    if n_desirable < n_undesirable:
        return round(n_undesirable / n_desirable, 2), 1.0
    return 1.0, round(n_desirable / n_undesirable, 2)


# ------------------------------------------------------------------------------------------------------------------
# Trainer


class PretokenizedKTOTrainer(KTOTrainer):
    """KTOTrainer on rows that already hold ``prompt_ids``/``completion_ids``/``label``.

    TRL 1.16 would extract prompts and apply the tokenizer's chat template again; here only its KL step remains:
    the KL completions are the batch's completions rotated by one (TRL's own construction, which is why KTO reads
    the data in a fixed order).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [c for c in ("prompt_ids", "completion_ids", "label") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks {missing}: encode it with encode_kto_dataset")
        if self.calculate_KL:
            def add_kl_completion_ids(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            dataset = dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size,
                                  desc=f"KL completions for {dataset_name}")
        return dataset


def build_kto_trainer(model: Any, ref_model: Any, training_args: Any, train_dataset: Any, eval_dataset: Any,
                      tokenizer: Any, lora_args: Any, callbacks: list | None = None) -> PretokenizedKTOTrainer:
    """KTOTrainer with DPO's reference policy: a fresh LoRA adapter's reference is the base with it disabled."""
    trainer = PretokenizedKTOTrainer(model=model, ref_model=ref_model, args=training_args, train_dataset=train_dataset,
                                     eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks)
    if "ref" in getattr(trainer.model, "peft_config", {}) and not lora_args.peft_path:
        trainer.model.delete_adapter("ref")
        logger.info("fresh LoRA adapter: reference = base model with the adapter disabled")
    return trainer
