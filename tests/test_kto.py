"""kto_training.py: unpaired/ShareGPT/paired readers (and their file:line errors), exact encoding, class weights, and
a tiny LoRA run whose reward margin rises, with unbalanced classes re-weighted, and whose adapter merges."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from medtrain.errors import DataError
from medtrain.kto import class_weights, encode_kto_dataset, load_kto_examples


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def test_unpaired_sharegpt_and_paired_layouts(tmp_path):
    unpaired = write(tmp_path / "u.jsonl", [
        {"messages": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Fever?"},
                      {"role": "assistant", "content": "Rest."}], "label": True},
        {"messages": [{"role": "user", "content": "Cough?"}, {"role": "assistant", "content": "Salt."}], "label": False},
    ])
    sharegpt = write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                                                               {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}],
                                             "label": False}])
    pairs = write(tmp_path / "p.jsonl", [{"question": "Fever?", "response_chosen": "Rest.", "response_rejected": "No."}])
    examples = load_kto_examples([unpaired, sharegpt, pairs])
    assert [(e["completion"], e["label"], e["source"].rsplit("/", 1)[1]) for e in examples] == [
        ("Rest.", True, "u.jsonl:1"), ("Salt.", False, "u.jsonl:2"), ("A2", False, "s.jsonl:1"),
        ("Rest.", True, "p.jsonl:1"), ("No.", False, "p.jsonl:1")]
    assert examples[0]["messages"] == [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Fever?"}]
    assert examples[2]["messages"] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                       {"role": "user", "content": "Q2"}]
    assert examples[3]["messages"] == examples[4]["messages"] == [{"role": "user", "content": "Fever?"}]


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}


@pytest.mark.parametrize("bad, expected", [
    ({**GOOD, "label": "true"}, "k.jsonl:2: label: expected true or false, got 'true'"),
    ({**GOOD, "label": 1}, "k.jsonl:2: label: expected true or false, got 1"),
    ({"messages": GOOD["messages"]}, "k.jsonl:2: label: missing"),
    ({"messages": GOOD["messages"][:1], "label": True}, "k.jsonl:2: messages: conversation must end with an assistant turn"),
])
def test_bad_examples_name_file_line_and_field(tmp_path, bad, expected):
    path = write(tmp_path / "k.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as err:
        load_kto_examples([path])
    assert expected in str(err.value)
    from medtrain.formats import LoadReport

    report = LoadReport()
    assert len(load_kto_examples([path], report)) == 1 and expected in str(report.problems[0])


def test_class_weights():
    assert class_weights(10, 10) == (1.0, 1.0)
    assert class_weights(2, 6) == (3.0, 1.0)  # 3 * 2 == 1 * 6
    assert class_weights(6, 4) == (1.0, 1.5)
    assert class_weights(2, 6, desirable_weight=2.0) == (2.0, 1.0)  # given weights are kept
    assert class_weights(2, 6, balance=False) == (1.0, 1.0)
    assert class_weights(0, 6) == (1.0, 1.0)


def test_encoding_is_the_sft_rendering(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    from medtrain.chat_format import get_chat_format

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    chat_format = get_chat_format(tokenizer, None)
    messages = [{"role": "user", "content": "I have a fever."}]
    dataset = encode_kto_dataset([{"messages": messages, "completion": "Rest and drink water.", "label": False}],
                                 tokenizer, chat_format, max_length=512, truncation="reply", name="train")
    row = dataset[0]
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Rest and drink water."}],
                                         tokenize=False)
    assert tokenizer.decode(row["prompt_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                                add_generation_prompt=True)
    # the completion ends with the end-of-turn token; ChatML's newline after it belongs to the next prompt
    assert tokenizer.decode(row["completion_ids"]) == "Rest and drink water.<|im_end|>"
    assert tokenizer.decode(row["prompt_ids"] + row["completion_ids"]) + "\n" == full and row["label"] is False
    cut = encode_kto_dataset([{"messages": messages, "completion": "Rest and drink water. " * 20, "label": True}],
                             tokenizer, chat_format, max_length=24, truncation="reply", name="train")[0]
    assert len(cut["prompt_ids"]) + len(cut["completion_ids"]) == 24


def test_kto_lora_margin_rises_weights_balanced_and_merges(tiny_chat_model_dir, tmp_path):
    import kto_training
    import merge_peft_adapter

    rows = [{"messages": [{"role": "user", "content": f"Question {i}: I have a fever."},
                          {"role": "assistant", "content": "Rest and drink water." if i % 3 else "Take salt."}],
             "label": bool(i % 3)} for i in range(12)]
    data = write(tmp_path / "kto" / "k.jsonl", rows)
    out = tmp_path / "out"
    trainer = kto_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", data,
                                 "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "4",
                                 "--learning_rate", "1e-2", "--logging_steps", "1", "--validation_split_percentage", "0",
                                 "--report_to", "none", "--save_steps", "4", "--disable_tqdm", "True"])
    # 8 desirable, 4 undesirable: the undesirable class is weighted 2.0 so that 8 * 1.0 == 4 * 2.0
    assert (trainer.args.desirable_weight, trainer.args.undesirable_weight) == (1.0, 2.0)
    steps = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    # the per-batch loss mixes the two classes (a batch may hold one only), so the implied rewards are the signal:
    # desirable completions gain log-probability against the reference, undesirable ones lose it (measured: chosen
    # 0 -> 0.59, rejected 0.05 -> -0.25, margin 0.19 -> 0.83)
    assert len(steps) == 6 and steps[0]["rewards/chosen"] == 0.0  # policy == reference before the first update
    chosen = [e["rewards/chosen"] for e in steps if "rewards/chosen" in e]
    margins = [e["rewards/margins"] for e in steps if "rewards/margins" in e]
    assert chosen[-1] > 0.3 and margins[-1] > margins[0] + 0.3
    assert [e["rewards/rejected"] for e in steps if "rewards/rejected" in e][-1] < 0
    assert all("kl" in e for e in steps)
    # resuming from checkpoint-4 reproduces steps 5 and 6 (same batches, same KL completions)
    resumed = tmp_path / "resumed"
    kto_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", data,
                       "--output_dir", str(resumed), "--max_steps", "6", "--per_device_train_batch_size", "4",
                       "--learning_rate", "1e-2", "--logging_steps", "1", "--validation_split_percentage", "0",
                       "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
                       "--resume_from_checkpoint", str(out / "checkpoint-4")])
    again = {e["step"]: e for e in json.loads((resumed / "trainer_state.json").read_text())["log_history"] if "loss" in e}
    for step in (5, 6):
        for key in ("loss", "kl"):
            assert abs(again[step][key] - steps[step - 1][key]) <= 1e-5 * max(1.0, abs(steps[step - 1][key])), key
    assert json.loads((out / "medtrain_chat_format.json").read_text())["kind"] == "tokenizer"
    assert imread(out / "training_curves.png").size > 0  # the loss/reward curves, drawn at the end
    assert not (out / "ref").exists()  # fresh adapter: no reference adapter saved
    merge_peft_adapter.main(["--base_model", str(tiny_chat_model_dir), "--lora_model", str(out),
                             "--output_dir", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_sample_feedback_loads():
    from conftest import ROOT

    examples = load_kto_examples([str(ROOT / "data" / "kto" / "medical_feedback.jsonl")])
    assert len(examples) == 16 and sum(e["label"] for e in examples) == 10


def test_trl_members_the_pretokenized_trainer_overrides_still_exist():
    """PretokenizedKTOTrainer overrides _prepare_dataset (no public switch skips KTO's re-templating) and reads
    calculate_KL, which KTOTrainer sets before preparing the datasets."""
    import inspect

    from trl import KTOTrainer

    assert list(inspect.signature(KTOTrainer._prepare_dataset).parameters)[:5] == [
        "self", "dataset", "processing_class", "args", "dataset_name"]
    source = inspect.getsource(KTOTrainer.__init__)
    assert "self.calculate_KL = " in source and source.index("self.calculate_KL = ") < source.index("self._prepare_dataset(")
