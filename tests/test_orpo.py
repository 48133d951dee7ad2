"""orpo_training.py: ORPO (LoRA) and SimPO (full training) on our encoded pairs: exact row layout, method selection,
losses that fall, metrics logged, outputs that merge/reload."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from medtrain.errors import ConfigError
from medtrain.orpo import PretokenizedPairsMixin, method_for


def test_pretokenized_rows_become_the_collator_layout():
    row = PretokenizedPairsMixin().tokenize_row({"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]})
    assert row == {
        "prompt_input_ids": [5, 6, 7], "prompt_attention_mask": [1, 1, 1],
        "chosen_input_ids": [5, 6, 7, 8, 9], "chosen_attention_mask": [1, 1, 1, 1, 1],
        "chosen_labels": [-100, -100, -100, 8, 9],
        "rejected_input_ids": [5, 6, 7, 10], "rejected_attention_mask": [1, 1, 1, 1],
        "rejected_labels": [-100, -100, -100, 10],
    }


def test_loss_type_selects_the_trl_config(tmp_path):
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    assert method_for([]) == ("orpo", ORPOConfig, {})
    assert method_for(["--loss_type", "simpo"]) == ("simpo", CPOConfig, {"beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0})
    assert method_for(["--loss_type=hinge"])[:2] == ("hinge", CPOConfig)
    config = tmp_path / "a.yaml"
    config.write_text("loss_type: simpo\n")
    assert method_for([str(config)])[0] == "simpo"
    assert method_for([str(config), "--loss_type", "orpo"])[0] == "orpo"  # flags override the file
    with pytest.raises(ConfigError, match="--loss_type kto: unknown; choose from orpo, simpo"):
        method_for(["--loss_type", "kto"])


def write_pairs(directory, n=12):
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"conversations": [{"from": "human", "value": f"Question {i}: I have a fever."}],
             "chosen": "Rest and drink water.", "rejected": "Take salt." if i % 2 else "No."} for i in range(n)]
    (directory / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def logged(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_orpo_lora_loss_falls_and_the_adapter_merges(tiny_chat_model_dir, tmp_path):
    import merge_peft_adapter
    import orpo_training

    data = write_pairs(tmp_path / "pairs")
    out = tmp_path / "orpo"
    orpo_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data),
                        "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "4",
                        "--learning_rate", "1e-2", "--logging_steps", "1", "--validation_split_percentage", "20",
                        "--report_to", "none", "--save_steps", "4", "--disable_tqdm", "True"])
    steps = [e for e in logged(out) if "loss" in e]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"] - 0.2  # measured 6.09 -> 5.59
    # resuming from checkpoint-4 (complete: marked) reproduces steps 5 and 6
    assert (out / "checkpoint-4" / "COMPLETE").is_file()
    resumed = tmp_path / "resumed"
    orpo_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data),
                        "--output_dir", str(resumed), "--max_steps", "6", "--per_device_train_batch_size", "4",
                        "--learning_rate", "1e-2", "--logging_steps", "1", "--validation_split_percentage", "20",
                        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
                        "--resume_from_checkpoint", str(out / "checkpoint-4")])
    again = {e["step"]: e["loss"] for e in logged(resumed) if "loss" in e}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from the checkpoint's state
    assert all(abs(again[s] - steps[s - 1]["loss"]) < 1e-5 for s in (5, 6)), (again, steps)
    assert all("log_odds_ratio" in e and "nll_loss" in e and e["nll_loss"] > 0 for e in steps)
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert "eval_log_odds_ratio" in (out / "eval_results.json").read_text()
    assert json.loads((out / "medtrain_chat_format.json").read_text())["kind"] == "tokenizer"
    assert (out / "adapter_model.safetensors").is_file()
    assert imread(out / "training_curves.png").size > 0  # the loss curve, drawn at the end
    merge_peft_adapter.main(["--base_model", str(tiny_chat_model_dir), "--lora_model", str(out),
                             "--output_dir", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_simpo_full_training_loss_falls_without_sft_term(tiny_chat_model_dir, tmp_path):
    import orpo_training
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs")
    out = tmp_path / "simpo"
    trainer = orpo_training.main(["--loss_type", "simpo", "--use_peft", "False", "--model_name_or_path",
                                  str(tiny_chat_model_dir), "--train_file_dir", str(data), "--output_dir", str(out),
                                  "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                                  "--logging_steps", "1", "--validation_split_percentage", "0", "--report_to", "none",
                                  "--save_strategy", "no", "--disable_tqdm", "True"])
    assert type(trainer).__name__ == "PretokenizedCPOTrainer" and trainer.args.loss_type == "simpo"
    assert (trainer.args.beta, trainer.args.simpo_gamma, trainer.args.cpo_alpha) == (2.0, 1.0, 0.0)
    steps = [e for e in logged(out) if "loss" in e]
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]
    assert all(e["nll_loss"] == 0 for e in steps)  # pure SimPO: no SFT term
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    AutoModelForCausalLM.from_pretrained(out)  # a full model that reloads


def test_orpo_flags_that_would_be_ignored_are_refused(tiny_chat_model_dir, tmp_path):
    import orpo_training

    data = write_pairs(tmp_path / "pairs")
    with pytest.raises(ConfigError) as err:
        orpo_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data),
                            "--output_dir", str(tmp_path / "o"), "--max_length", "64", "--max_completion_length", "8"])
    assert "--max_length 64 differs from --model_max_length" in str(err.value)
    assert "--max_completion_length has no effect" in str(err.value)


def test_trl_members_the_pretokenized_trainers_override_still_exist():
    """PretokenizedPairsMixin overrides tokenize_row: ORPO/CPO have no public switch to skip their re-tokenisation."""
    import inspect

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    for trainer in (ORPOTrainer, CPOTrainer):
        assert list(inspect.signature(trainer.tokenize_row).parameters) == ["self", "feature", "model"], trainer
        assert "train_dataset.map(self.tokenize_row" in inspect.getsource(trainer.__init__), trainer
