"""Reference-free preference optimisation: ORPO (TRL's ORPOTrainer) and SimPO/CPO (TRL's CPOTrainer) on our pairs.

Neither keeps a reference model (about half of DPO's model memory with full training). ``--loss_type`` picks the
method and with it the TRL config whose flags the script accepts:

- ``orpo`` (default): odds-ratio preference loss plus the SFT loss on the chosen reply (Hong et al. 2024),
  ``trl.experimental.orpo``; ``--beta`` is the paper's lambda.
- ``simpo``: SimPO (Meng et al. 2024), CPOTrainer with the length-normalised reward and target margin; defaults to
  the paper's recipe for instruct models, ``--beta 2.0 --simpo_gamma 1.0`` (gamma/beta 0.5) and no SFT term
  (``--cpo_alpha 0``); ``--cpo_alpha 1`` gives CPO-SimPO.
- ``sigmoid`` / ``hinge`` / ``ipo``: CPO (Xu et al. 2024) with that loss; ``alphapo``: AlphaPO (with ``--alpha``).

Pairs are encoded as for DPO (:func:`medtrain.dpo.encode_preference_dataset`: the turn exactly as SFT renders it);
TRL's own prompt extraction, chat templating and re-tokenisation are skipped (:class:`PretokenizedPairsMixin`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .arguments import peek_arg
from .errors import ConfigError
from .preference import DPO_TRUNCATION_CHOICES

CPO_LOSS_TYPES = ["simpo", "sigmoid", "hinge", "ipo", "alphapo"]
LOSS_TYPES = ["orpo"] + CPO_LOSS_TYPES
# SimPO paper (Meng et al. 2024, Table 7): beta 2.0-2.5 and gamma/beta about 0.5 for instruct models; no SFT term.
SIMPO_DEFAULTS = {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}
ID_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
OUTPUT_DIRS = {"orpo": "outputs-orpo", "simpo": "outputs-simpo"}  # the CPO losses: outputs-cpo


@dataclass
class ORPOArguments:
    """Which reference-free method, and how over-long pairs are fitted."""

    loss_type: str = field(
        default="orpo",
        metadata={"help": "orpo (ORPOTrainer), simpo (CPOTrainer, SimPO loss), or CPO with sigmoid/hinge/ipo, or "
                  "alphapo. Selects the TRL config whose flags apply (see the script's --help with the flag given).",
                  "choices": LOSS_TYPES},
    )
    truncation: str = field(
        default="reply",
        metadata={"help": "Pairs longer than --model_max_length tokens: 'reply' keeps at least half the length for "
                  "the end of the prompt and cuts both replies at the end (no pair dropped), 'left' cuts the prompt "
                  "from the left (a pair whose reply alone is too long is dropped), 'drop' skips the pair. Counts are "
                  "logged.", "choices": DPO_TRUNCATION_CHOICES},
    )


def method_for(argv: list[str]) -> tuple[str, type, dict]:
    """``(loss_type, TRL config class, stage defaults for it)`` for the command line ``argv``."""
    loss_type = peek_arg("loss_type", "orpo", argv)
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"--loss_type {loss_type}: unknown; choose from {', '.join(LOSS_TYPES)}.")
    if loss_type == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return loss_type, ORPOConfig, {}
    from trl.experimental.cpo import CPOConfig

    return loss_type, CPOConfig, dict(SIMPO_DEFAULTS) if loss_type == "simpo" else {}


def check_orpo_arguments(training_args: Any) -> None:
    """Flags TRL would ignore here (our encoding does the lengths and tokenisation); all at once.

    (A --max_length other than --model_max_length is refused by medtrain.arguments.finalize, for every stage.)
    """
    problems = []
    if training_args.max_completion_length is not None:
        problems.append("--max_completion_length has no effect: pairs are fitted to --model_max_length by --truncation.")
    if training_args.dataset_num_proc is not None:
        problems.append("--dataset_num_proc is not used: pairs are encoded in-process (tokenisation only, fast).")
    if training_args.model_init_kwargs:
        problems.append("--model_init_kwargs is not used: the model is loaded from --model_name_or_path with "
                        "--torch_dtype/--load_in_4bit/--attn_implementation.")
    if training_args.generate_during_eval:
        problems.append("--generate_during_eval logs samples to wandb/comet only; remove it.")
    if getattr(training_args, "loss_type", "simpo") in ("hinge", "ipo") and training_args.label_smoothing > 0:
        problems.append(f"--label_smoothing is not used by --loss_type {training_args.loss_type}.")
    if problems:
        raise ConfigError(problems)


class PretokenizedPairsMixin:
    """ORPO/CPO trainers on rows holding ``prompt_ids``/``chosen_ids``/``rejected_ids`` (no text).

    TRL's ``tokenize_row`` re-tokenises text and appends the tokenizer's eos; here each row becomes the layout its
    collator expects from our ids: ``prompt_input_ids``, and ``{chosen,rejected}_{input_ids,attention_mask,labels}``
    with the prompt labelled -100. The id columns are dropped once converted.
    """

    def tokenize_row(self, feature: dict, model: Any = None) -> dict:
        prompt = list(feature["prompt_ids"])
        batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = list(feature[f"{side}_ids"])
            batch[f"{side}_input_ids"] = prompt + reply
            batch[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            batch[f"{side}_labels"] = [-100] * len(prompt) + reply
        return batch

    def _drop_id_columns(self) -> None:
        self.train_dataset = self.train_dataset.remove_columns(ID_COLUMNS)
        if self.eval_dataset is not None:
            self.eval_dataset = self.eval_dataset.remove_columns(ID_COLUMNS)


def build_orpo_trainer(loss_type: str, model: Any, training_args: Any, train_dataset: Any, eval_dataset: Any,
                       tokenizer: Any, callbacks: list | None = None) -> Any:
    """ORPOTrainer (``orpo``) or CPOTrainer (every other loss type) on pre-encoded pairs; no reference model."""
    if loss_type == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    else:
        from trl.experimental.cpo import CPOTrainer as base

    trainer_class = type(f"Pretokenized{base.__name__}", (PretokenizedPairsMixin, base), {})
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=tokenizer, callbacks=callbacks)
    trainer._drop_id_columns()
    return trainer
