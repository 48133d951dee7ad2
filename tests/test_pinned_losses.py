"""Pinned losses: a few training steps of SFT, DPO and RM on the tiny chat model give these exact numbers.

A refactor that changes the math (masking, packing, loss reduction, LoRA init/scaling, the pairwise losses, the
data order) moves them and fails here; a pure refactor does not. Like torchtune's recipe tests: exact values,
rtol 1e-5.

How the numbers were produced: `pytest tests/test_pinned_losses.py` with PINNED_UPDATE=1 prints the measured lists;
they were measured twice in separate processes (identical) on torch 2.13.0 CPU, transformers 5.24, TRL 1.16,
peft 0.21.2, AMD EPYC (x86-64; lscpu: avx2, avx512f), one thread, float32, seed 0, the tiny ChatML Llama of conftest.py
(hidden 64, 2 layers, seed 0). A different CPU kernel (another ISA, another torch) may move the last digits: if
every stage moves by < 1e-4 relative after such an upgrade, re-pin; if one stage moves alone, its math changed.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # one thread: same summation order every run

QA = [("What helps a fever?", "Rest and drink water."), ("What is hypertension?", "High blood pressure."),
      ("How to check diabetes?", "Check blood sugar often."), ("发烧怎么办？", "多喝水，注意休息。")]
REJECTED = ["Ignore it.", "Eat more salt.", "Never check.", "不用管。"]
COMMON = ["--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate",
          "1e-3", "--lr_scheduler_type", "constant", "--lora_dropout", "0", "--seed", "0", "--do_eval", "False",
          "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--torch_dtype", "float32"]

# measured as described in the module docstring
PINNED = {
    "sft": [6.016418933868408, 5.998336315155029, 5.9791035652160645],
    "dpo": [0.6931471824645996, 0.6939588189125061, 0.6720913648605347],  # step 1: ln 2, policy == reference
    "rm": [0.6959035396575928, 0.6861839294433594, 0.6665974855422974],
}


def sft_data(directory):
    return write_jsonl(directory / "sft.jsonl", [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]).parent


def pair_data(directory):
    return write_jsonl(directory / "pairs.jsonl", [
        {"conversations": [{"from": "human", "value": q}], "chosen": a, "rejected": r}
        for (q, a), r in zip(QA, REJECTED)]).parent


def run(stage: str, model_dir, tmp_path) -> list[float]:
    import dpo_training
    import reward_modeling
    import supervised_finetuning

    script, data = {"sft": (supervised_finetuning, sft_data), "dpo": (dpo_training, pair_data),
                    "rm": (reward_modeling, pair_data)}[stage]
    out = tmp_path / stage
    trainer = script.main(["--model_name_or_path", str(model_dir), "--train_file_dir", str(data(tmp_path / "data")),
                           "--output_dir", str(out), *COMMON])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses == [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
                      if "loss" in e]
    return losses


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_losses_of_the_first_steps_are_pinned(stage, tiny_chat_model_dir, tmp_path):
    losses = run(stage, tiny_chat_model_dir, tmp_path)
    if os.environ.get("PINNED_UPDATE"):
        print(f"PINNED {stage}: {losses!r}")
    assert len(losses) == 3
    assert losses == pytest.approx(PINNED[stage], rel=1e-5, abs=0), f"{stage}: measured {losses!r}"
