"""The end of every training stage: train, save, evaluate, and what that leaves in ``output_dir``.

After :func:`train_and_save` and :func:`evaluate_and_record` a stage's ``output_dir`` holds

- the model (full weights or the adapter, safetensors) and ``trainer_state.json`` (``log_history``);
- the tokenizer and, for chat stages, ``medtrain_chat_format.json``: merge_peft_adapter.py, inference and the next
  stage read them from the model directory; with a LoRA adapter on rotary scaling, ``rope_scaling.json``;
- ``train_results.json`` / ``eval_results.json`` / ``all_results.json`` (Trainer's, keys sorted) and the same
  metrics as ``key = value`` lines in ``train_results.txt`` / ``eval_results.txt``;
- ``training_curves.png`` (:func:`save_curves`, medtrain/plotting.py).

What differs between stages is a parameter, visible at the call: the number of samples (None where it is unknown,
e.g. a streamed corpus), the chat format (None for plain-text pretraining), metrics a stage adds (SFT's token
throughput, a causal LM's perplexity) and how the final evaluation runs (preference trainers reuse the evaluation
``--eval_strategy`` already ran at the last step: :func:`evaluate_once`).

Files are written on the main process only; training, saving the model and evaluating run on every rank (ZeRO-3
gathers shards from all of them).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Iterable

from .chat_format import ChatFormat, save_chat_format
from .plotting import save_training_curves
from .rope import save_rope_record

logger = logging.getLogger(__name__)


def write_results(output_dir: str, split: str, metrics: dict) -> str:
    """Write ``{split}_results.txt`` (``key = value`` lines, as the seed documents) next to Trainer's JSON."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{split}_results.txt")
    with open(path, "w", encoding="utf-8") as fh:
        for key in sorted(metrics):
            fh.write(f"{key} = {metrics[key]}\n")
    return path


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy; ``inf`` where it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def language_model_perplexity(metrics: dict, log_history: Iterable[dict]) -> dict:
    """Eval metrics a causal LM adds: ``perplexity`` of ``eval_loss`` and, where ``--eval_on_start`` logged the
    untrained model's loss at step 0, ``perplexity_at_start``, so both ends are reported side by side."""
    derived = {"perplexity": perplexity(metrics["eval_loss"])}
    start = [e["eval_loss"] for e in log_history if "eval_loss" in e and e.get("step") == 0]
    if start:
        derived["perplexity_at_start"] = perplexity(start[0])
    return derived


def save_model_companions(output_dir: str, model: Any, tokenizer: Any, chat_format: ChatFormat | None) -> None:
    """What must sit next to saved weights for them to be usable alone: the tokenizer, the chat format it was
    trained in (None: plain text, nothing recorded) and, for a LoRA adapter on a rotary-scaled base, the scaling
    (an adapter directory has no config.json to carry it; nothing is written when the base is unscaled)."""
    tokenizer.save_pretrained(output_dir)
    if chat_format is not None:
        save_chat_format(chat_format, output_dir)
    if hasattr(model, "peft_config"):
        save_rope_record(model, output_dir)


def record_metrics(trainer: Any, output_dir: str, split: str, metrics: dict) -> None:
    """``{split}_results.json`` (+ ``all_results.json``) by Trainer and ``{split}_results.txt``; main process."""
    if trainer.is_world_process_zero():
        trainer.save_metrics(split, metrics)
        write_results(output_dir, split, metrics)


def train_and_save(
    trainer: Any,
    output_dir: str,
    resume: str | None,
    *,
    tokenizer: Any,
    chat_format: ChatFormat | None,
    train_samples: int | None,
    extra_metrics: Callable[[Any], dict] | None = None,
) -> Any:
    """Train (from ``resume`` if given), save the model and trainer state, then, on the main process, the
    tokenizer, chat format and rope record (:func:`save_model_companions`) and the train metrics.

    ``train_samples`` is recorded as ``train_samples`` (left out when None). ``extra_metrics(result)`` returns
    metrics the stage adds to Trainer's (e.g. SFT's tokens per second). Returns Trainer's ``TrainOutput``.
    """
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        save_model_companions(output_dir, trainer.model, tokenizer, chat_format)
        metrics = dict(result.metrics)
        if train_samples is not None:
            metrics["train_samples"] = train_samples
        if extra_metrics is not None:
            metrics.update(extra_metrics(result))
        record_metrics(trainer, output_dir, "train", metrics)
    return result


def evaluate_once(trainer: Any) -> dict:
    """Eval metrics of the model as trained; reuses the evaluation ``--eval_strategy`` just ran at the last step
    (a preference trainer's evaluation scores every pair with the policy and the reference: not run twice).

    With ``--load_best_model_at_end`` the model is the best checkpoint's, which that last evaluation may not
    describe, so it is evaluated again.
    """
    state = trainer.state
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    if (last is not None and state.global_step > 0 and last["step"] == state.global_step
            and not trainer.args.load_best_model_at_end):
        return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def evaluate_and_record(
    trainer: Any,
    output_dir: str,
    eval_samples: int | None,
    *,
    evaluate: Callable[[Any], dict] | None = None,
    derived: Callable[[dict, list[dict]], dict] | None = None,
) -> dict:
    """Evaluate once on every rank, log the metrics and record them (main process); returns them.

    ``evaluate(trainer)`` runs the evaluation (default ``trainer.evaluate()``); ``derived(metrics, log_history)``
    returns metrics computed from them (e.g. :func:`language_model_perplexity`); ``eval_samples`` is recorded as
    ``eval_samples`` (left out when None).
    """
    metrics = evaluate(trainer) if evaluate is not None else trainer.evaluate()
    if derived is not None:
        metrics.update(derived(metrics, trainer.state.log_history))
    if eval_samples is not None:
        metrics["eval_samples"] = eval_samples
    trainer.log_metrics("eval", metrics)
    record_metrics(trainer, output_dir, "eval", metrics)
    return metrics


def save_curves(trainer: Any, output_dir: str, title: str) -> None:
    """``output_dir/training_curves.png`` from the trainer's log history (train and eval series); main process."""
    if trainer.is_world_process_zero():
        save_training_curves(output_dir, trainer.state.log_history, title=title)
