"""The bad-input catalogue: every malformed input or conflicting flag is one clear error, nothing is written.

Each case runs a stage's ``main`` in-process through ``run_main`` (exit status 2, one ``error:`` line naming
file:line:field or the flag) with an existing output_dir that must stay untouched. A few cases also run as real
subprocesses to prove there is no traceback on the command line.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys

import pytest

from conftest import run_script
from medtrain.entrypoint import run_main

GOOD_SFT = {"conversations": [{"from": "human", "value": "Fever?"}, {"from": "gpt", "value": "Rest."}]}
GOOD_PAIR = {"conversations": [{"from": "human", "value": "Fever?"}], "chosen": "Rest and water.", "rejected": "No."}
GOOD_KTO = {"messages": [{"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "Rest."}], "label": True}
GOOD_QUESTION = {"question": "2 + 2?", "answer": "4"}


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def sft_conv(*turns):
    return line({"conversations": [{"from": r, "value": v} for r, v in turns]})


# (case id, stage, file name, file content (str or bytes; line 1 is always a good record), extra flags, expected text)
CASES = [
    ("truncated-json-line", "sft", "d.jsonl", '{"conversations": [{"from": "human", "value": "hi"}', [], "d.jsonl:2: invalid JSON"),
    ("wrong-type-value", "sft", "d.jsonl", sft_conv(("human", "q"), ("gpt", "a")).replace('"a"', "7"), [],
     "d.jsonl:2: conversations[1].value: expected a string, got int"),
    ("unknown-role", "sft", "d.jsonl", sft_conv(("human", "q"), ("doctor", "a")), [],
     "d.jsonl:2: conversations[1].from: unknown role 'doctor'"),
    ("roles-out-of-order", "sft", "d.jsonl", sft_conv(("gpt", "a"), ("human", "q")), [],
     "d.jsonl:2: conversations[0]: roles out of order"),
    ("system-not-first", "sft", "d.jsonl", sft_conv(("human", "q"), ("system", "s"), ("gpt", "a")), [],
     "d.jsonl:2: conversations[1]: roles out of order"),
    ("empty-turn", "sft", "d.jsonl", sft_conv(("human", "   "), ("gpt", "a")), [], "d.jsonl:2: conversations[0].value: empty text"),
    ("empty-conversation", "sft", "d.jsonl", line({"conversations": []}), [], "d.jsonl:2: conversations: empty conversation"),
    ("no-answered-turn", "sft", "d.jsonl", sft_conv(("system", "s"), ("human", "q")), [],
     "d.jsonl:2: conversations: conversation must end with an assistant turn"),
    ("trailing-user-turn-strict", "sft", "d.jsonl", sft_conv(("human", "q"), ("gpt", "a"), ("human", "q2")),
     ["--strict_data"], "d.jsonl:2: conversations[2]: unanswered user turn at the end"),
    ("function-call-not-json", "sft", "d.jsonl", sft_conv(("human", "q"), ("function_call", "{oops"), ("observation", "r"),
     ("gpt", "a")), [], "d.jsonl:2: conversations[1].value: invalid JSON"),
    ("observation-without-call", "sft", "d.jsonl", sft_conv(("human", "q"), ("observation", "r"), ("gpt", "a")), [],
     "d.jsonl:2: conversations[1]: roles out of order: expected 'assistant'"),
    ("tools-not-a-list", "sft", "d.jsonl", line({**GOOD_SFT, "tools": '{"name": "f"}'}), [],
     "d.jsonl:2: tools: expected a list of tool schemas, got dict"),
    ("pair-tool-call-without-name", "dpo", "p.jsonl",
     line({**GOOD_PAIR, "chosen": {"from": "function_call", "value": '{"arguments": {}}'}}), [],
     "p.jsonl:2: chosen.value: expected a call"),
    ("reasoning-not-a-string", "sft", "d.jsonl",
     line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "reasoning_content": 3}]}),
     [], "d.jsonl:2: conversations[1].reasoning_content: expected a string, got int"),
    ("strict-and-skip", "sft", None, None, ["--strict_data", "--skip_invalid_samples"], "contradict each other"),
    ("bad-invalid-fraction", "sft", None, None, ["--max_invalid_fraction", "2"], "--max_invalid_fraction must be in [0, 1]"),
    ("non-utf8", "sft", "d.jsonl", b'{"instruction": "fi\xe8vre", "output": "x"}', [], "d.jsonl:2: not valid UTF-8 (byte 0xe8"),
    ("huge-truncated-line", "sft", "d.jsonl", '{"conversations": [{"from": "human", "value": "' + "x" * 2_000_000, [],
     "d.jsonl:2: invalid JSON"),
    ("duplicated-keys", "sft", "d.jsonl", '{"conversations": [], "conversations": []}', [], "d.jsonl:2: invalid JSON (duplicated key 'conversations' in one object)"),
    ("mixed-formats", "sft", "d.jsonl", line({"instruction": "q", "output": "a"}), [],
     "d.jsonl:2: record is in alpaca format but this file started in sharegpt format"),
    ("not-an-object", "sft", "d.jsonl", "[1, 2, 3]", [], "d.jsonl:2: expected a JSON object, got list"),
    ("unknown-sft-format", "sft", "d.jsonl", line({"text": "hello"}), [], "d.jsonl:2: unknown sft format with keys ['text']"),
    ("alpaca-output-not-string", "sft", "d.jsonl", line({"instruction": "q", "output": None}), [],
     "d.jsonl:2: record is in alpaca format"),
    ("zero-length-file", "sft", "d.jsonl", "", [], "d.jsonl: file is empty"),
    ("no-data-files", "sft", "notes.txt", "just notes", [], "no *.json/*.jsonl files found"),
    ("chosen-equals-rejected", "rm", "p.jsonl", line({**GOOD_PAIR, "rejected": "Rest and water."}), [],
     "p.jsonl:2: rejected: chosen and rejected are identical"),
    ("missing-rejected", "rm", "p.jsonl", line({"conversations": GOOD_PAIR["conversations"], "chosen": "x"}), [],
     "p.jsonl:2: rejected: missing 'rejected'"),
    ("empty-prompt", "rm", "p.jsonl", line({**GOOD_PAIR, "conversations": [{"from": "human", "value": ""}]}), [],
     "p.jsonl:2: conversations[0].value: empty text"),
    ("non-string-response", "rm", "p.jsonl", line({**GOOD_PAIR, "chosen": ["a", "b"]}), [],
     "p.jsonl:2: chosen: expected exactly one assistant message"),
    ("unknown-pair-format", "rm", "p.jsonl", line({"query": "q", "answer": "a"}), [], "p.jsonl:2: unknown preference format"),
    ("margin-not-a-number", "rm", "p.jsonl", line({**GOOD_PAIR, "margin": "high"}), [], "p.jsonl:2: margin: expected a number"),
    ("pair-prompt-ends-with-assistant", "dpo", "p.jsonl",
     line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "x", "rejected": "y"}),
     [], "p.jsonl:2: conversations: conversation must end with a user turn"),
    ("dpo-identical-pair", "dpo", "p.jsonl", line({**GOOD_PAIR, "chosen": "same", "rejected": " same "}), [],
     "p.jsonl:2: rejected: chosen and rejected are identical"),
    ("qlora-without-4bit", "sft", None, None, ["--qlora"], "--qlora needs --load_in_4bit"),
    ("4bit-and-8bit", "sft", None, None, ["--load_in_4bit", "--load_in_8bit"], "mutually exclusive"),
    ("unknown-template", "sft", None, None, ["--template_name", "llama9"], "unknown conversation template 'llama9'"),
    ("flash-attn-on-cpu", "rm", None, None, ["--attn_implementation", "flash_attention_2"],
     "--attn_implementation flash_attention_2 needs a CUDA GPU"),
    ("fp16-on-cpu", "dpo", None, None, ["--fp16"], "--fp16 needs a CUDA GPU"),
    ("quantized-full-training", "sft", None, None, ["--load_in_8bit", "--use_peft", "False"], "train through LoRA only"),
    ("unknown-flag", "dpo", None, None, ["--betaa", "0.1"], "unknown flag(s) --betaa"),
    ("bad-choice-truncation", "rm", None, None, ["--truncation", "middle"], "error"),
    ("reward-read-at-a-cut-reply", "rm", None, None, ["--truncation", "reply"], "invalid choice: 'reply'"),
    ("negative-lora-rank", "sft", None, None, ["--lora_rank", "0"], "--lora_rank must be positive"),
    ("bad-split-percentage", "sft", None, None, ["--validation_split_percentage", "150"], "must be in [0, 100)"),
    ("missing-model-dir", "sft", None, None, ["--model_name_or_path", "./no/such/model"], "no such directory"),
    ("grpo-no-answer", "grpo", "q.jsonl", line({"question": "Fever?"}), [], "q.jsonl:2: answer: missing the reference answer"),
    ("grpo-answer-not-an-option", "grpo", "q.jsonl", line({"question": "q", "options": ["a", "b"], "answer": "E"}), [],
     "q.jsonl:2: answer: 'E' is not one of the options A, B"),
    ("grpo-wrong-layout", "grpo", "q.jsonl", line({"instruction": "q", "output": "a"}), [], "q.jsonl:2: question: no 'question' field"),
    ("grpo-reward-model-without-path", "grpo", None, None, ["--reward_funcs", "reward_model"],
     "--reward_funcs reward_model needs --reward_model_name_or_path"),
    ("kto-label-not-boolean", "kto", "k.jsonl", line({**GOOD_KTO, "label": "yes"}), [],
     "k.jsonl:2: label: expected true or false, got 'yes'"),
    ("kto-no-label", "kto", "k.jsonl", line({"messages": GOOD_KTO["messages"]}), [], "k.jsonl:2: label: missing"),
    ("kto-batch-of-one", "kto", None, None, ["--per_device_train_batch_size", "1"],
     "--per_device_train_batch_size 1: KTO estimates its KL term"),
    ("orpo-unknown-loss", "orpo", None, None, ["--loss_type", "dpo"], "--loss_type dpo: unknown; choose from orpo, simpo"),
]

SCRIPTS = {"sft": "supervised_finetuning", "rm": "reward_modeling", "dpo": "dpo_training", "orpo": "orpo_training",
           "kto": "kto_training", "grpo": "grpo_training"}
GOOD = {"sft": GOOD_SFT, "kto": GOOD_KTO, "grpo": GOOD_QUESTION}


def invoke(module_name: str, args: list[str], monkeypatch) -> int:
    module = importlib.import_module(module_name)
    monkeypatch.setattr(sys, "argv", [module_name + ".py", *args])
    takes_args = bool(inspect.signature(module.main).parameters)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: module.main(args) if takes_args else module.main())
    return exit_info.value.code


def stage_args(stage, model_dir, data_dir, out_dir):
    args = ["--model_name_or_path", str(model_dir), "--train_file_dir", str(data_dir), "--output_dir", str(out_dir),
            "--overwrite_output_dir", "--report_to", "none", "--max_steps", "1"]
    return args


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_catalogue_case(case, tiny_chat_model_dir, tmp_path, capsys, monkeypatch):
    name, stage, filename, content, extra, expected = case
    data = tmp_path / "data"
    data.mkdir()
    good = GOOD.get(stage, GOOD_PAIR)
    if filename is None:
        (data / "ok.jsonl").write_text(line(good) + "\n")
    elif content == "":
        (data / filename).write_text("")
    elif filename.endswith(".txt"):
        (data / filename).write_text(content)
    else:
        body = content if isinstance(content, bytes) else content.encode("utf-8")
        (data / filename).write_bytes(line(good).encode() + b"\n" + body + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = invoke(SCRIPTS[stage], [*stage_args(stage, tiny_chat_model_dir, data, out), *extra], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert expected in err, err[-2000:]
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_catalogue_size():
    assert len(CASES) >= 30


def test_skip_invalid_samples_counts_and_reports(tiny_chat_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    lines = [line(GOOD_SFT), "{broken", sft_conv(("human", "q"), ("doctor", "a")), line(GOOD_SFT)]
    (data / "a.jsonl").write_text(line(GOOD_SFT) + "\n" + sft_conv(("human", "q"), ("doctor", "a")) + "\n" + line(GOOD_SFT) + "\n")
    (data / "b.jsonl").write_text("\n".join(lines[:2]) + "\n")  # a broken JSON line is one bad record
    out = tmp_path / "out"
    import supervised_finetuning

    trainer = supervised_finetuning.main(stage_args("sft", tiny_chat_model_dir, data, out) + ["--skip_invalid_samples"])
    report = (out / "invalid_samples.txt").read_text().splitlines()
    assert report == [f"{data / 'a.jsonl'}:2: conversations[1].from: unknown role 'doctor'; expected one of system, "
                      "human/user, gpt/assistant, function_call, observation/tool", f"{data / 'b.jsonl'}:2: invalid JSON (Expecting property name "
                      "enclosed in double quotes)"]
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("case_id", ["non-utf8", "unknown-flag", "chosen-equals-rejected"])
def test_catalogue_on_the_command_line(case_id, tiny_chat_model_dir, tmp_path):
    name, stage, filename, content, extra, expected = next(c for c in CASES if c[0] == case_id)
    data = tmp_path / "data"
    data.mkdir()
    good = GOOD.get(stage, GOOD_PAIR)
    body = b"" if content is None else (content if isinstance(content, bytes) else content.encode())
    (data / (filename or "ok.jsonl")).write_bytes(line(good).encode() + b"\n" + body + b"\n")
    proc = run_script(SCRIPTS[stage] + ".py", *stage_args(stage, tiny_chat_model_dir, data, tmp_path / "out"), *extra)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()
