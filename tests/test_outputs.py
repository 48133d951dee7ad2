"""medtrain/outputs.py, the tail every stage shares: what train_and_save / evaluate_and_record leave in output_dir.

The stage tests check their own results; these check what the stages now share by construction: an adapter dir
that holds tokenizer, chat format and rope record even when the trainer itself saves no tokenizer, the final
evaluation reused (not run twice) unless the best checkpoint was loaded, and nothing written off rank 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest


def read_txt(path: Path) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in path.read_text().splitlines())


def test_adapter_dir_holds_everything_merging_and_inference_read(tiny_chat_model_dir, tmp_path):
    import datasets
    import torch
    from matplotlib.image import imread
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from medtrain.chat_format import get_chat_format, resolve_chat_format
    from medtrain.outputs import (evaluate_and_record, evaluate_once, language_model_perplexity, save_curves,
                                  train_and_save)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    chat_format = get_chat_format(tokenizer, None)
    config = AutoConfig.from_pretrained(tiny_chat_model_dir)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}  # a scaled base
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, config=config)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ids = tokenizer("Rest and drink water if you have a fever.")["input_ids"]
    rows = datasets.Dataset.from_dict({"input_ids": [ids] * 4, "labels": [ids] * 4})
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, eval_strategy="steps",
                             eval_steps=2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             learning_rate=1e-3, disable_tqdm=True)
    # no processing_class: Trainer.save_model saves no tokenizer, so what is there came from train_and_save
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)

    train_and_save(trainer, str(out), None, tokenizer=tokenizer, chat_format=chat_format, train_samples=4,
                   extra_metrics=lambda result: {"train_steps_seen": result.global_step})
    assert (out / "adapter_model.safetensors").is_file() and (out / "trainer_state.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == tokenizer.chat_template and len(reloaded) == len(tokenizer)
    # inference and the next stage find the training format in the model dir, not from flags
    assert resolve_chat_format(reloaded, [str(out)], None, None).record() == chat_format.record()
    assert json.loads((out / "rope_scaling.json").read_text())["rope_parameters"]["factor"] == 2.0
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_samples"] == 4 and train["train_steps_seen"] == 2
    assert {k: str(v) for k, v in train.items()} == read_txt(out / "train_results.txt")

    evals_before = [e for e in trainer.state.log_history if "eval_loss" in e]
    metrics = evaluate_and_record(trainer, str(out), 4, evaluate=evaluate_once, derived=language_model_perplexity)
    assert [e for e in trainer.state.log_history if "eval_loss" in e] == evals_before  # step 2's eval, reused
    assert metrics["eval_loss"] == evals_before[-1]["eval_loss"]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 4 and results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert {k: str(v) for k, v in results.items()} == read_txt(out / "eval_results.txt")
    assert json.loads((out / "all_results.json").read_text()) == {**train, **results}
    save_curves(trainer, str(out), "TEST")
    assert imread(out / "training_curves.png").shape[0] > 100


class FakeTrainer:
    """The Trainer surface the tail uses; records calls, writes only what the real one would on this rank."""

    def __init__(self, main: bool, log_history: list[dict] | None = None, load_best: bool = False):
        self.main, self.calls = main, []
        self.state = SimpleNamespace(log_history=log_history or [], global_step=2)
        self.args = SimpleNamespace(load_best_model_at_end=load_best)
        self.model = object()

    def train(self, resume_from_checkpoint=None):
        self.calls.append(("train", resume_from_checkpoint))
        return SimpleNamespace(metrics={"train_loss": 1.0}, global_step=2)

    def save_model(self, output_dir):
        self.calls.append(("save_model", output_dir))

    def save_state(self):
        self.calls.append(("save_state",))

    def is_world_process_zero(self):
        return self.main

    def save_metrics(self, split, metrics):
        self.calls.append(("save_metrics", split, dict(metrics)))

    def log_metrics(self, split, metrics):
        self.calls.append(("log_metrics", split))

    def evaluate(self):
        self.calls.append(("evaluate",))
        return {"eval_loss": 0.5}


class FakeTokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{}")


def test_plain_text_and_unknown_sample_counts_record_nothing_extra(tmp_path):
    from medtrain.outputs import train_and_save

    trainer = FakeTrainer(main=True)
    train_and_save(trainer, str(tmp_path), "ckpt-2", tokenizer=FakeTokenizer(), chat_format=None, train_samples=None)
    assert trainer.calls[:3] == [("train", "ckpt-2"), ("save_model", str(tmp_path)), ("save_state",)]
    assert trainer.calls[3] == ("save_metrics", "train", {"train_loss": 1.0})  # no train_samples key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "train_results.txt"]  # no chat format


def test_only_rank_zero_writes_but_every_rank_trains_saves_and_evaluates(tmp_path):
    from medtrain.outputs import evaluate_and_record, save_curves, train_and_save

    trainer = FakeTrainer(main=False, log_history=[{"loss": 1.0, "step": 1}])
    train_and_save(trainer, str(tmp_path), None, tokenizer=FakeTokenizer(), chat_format=None, train_samples=3)
    evaluate_and_record(trainer, str(tmp_path), 3)
    save_curves(trainer, str(tmp_path), "X")
    assert [c[0] for c in trainer.calls] == ["train", "save_model", "save_state", "evaluate", "log_metrics"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("load_best, evaluations", [(False, 0), (True, 1)])
def test_evaluate_once_reuses_the_last_steps_evaluation_unless_the_best_model_was_loaded(load_best, evaluations):
    from medtrain.outputs import evaluate_once

    logged = {"eval_loss": 0.25, "eval_runtime": 1.0, "epoch": 1.0, "step": 2}
    trainer = FakeTrainer(main=True, log_history=[{"loss": 1.0, "step": 2}, logged], load_best=load_best)
    metrics = evaluate_once(trainer)
    assert trainer.calls.count(("evaluate",)) == evaluations
    assert metrics == ({"eval_loss": 0.5} if load_best else {"eval_loss": 0.25, "eval_runtime": 1.0, "epoch": 1.0})
