"""inference.py on tiny models: the chat renders its history exactly as training rendered it, streams without the
stop text, keeps/clears history; batch mode writes one row per prompt (left padding does not change greedy answers);
an adapter uses the chat format recorded at training time and answers like its merged model; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from medtrain.chat_format import get_chat_format, save_chat_format
from medtrain.entrypoint import run_main
from medtrain.tokenization import encode_dialog

import inference
from inference import ChatStreamer, InferenceArguments, chat, generate_responses, prompt_ids

HELDOUT = ROOT / "data" / "prompts" / "heldout_questions.jsonl"
SYSTEM = "You are a doctor."
U1, A1, U2, A2 = "I have a fever.", "Rest and drink water.", "For how long?", "Three days."

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(model_dir: Path):
    from medtrain.merging import load_base
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    return load_base(str(model_dir), "causal_lm", torch.float32), tokenizer


class FakeGenerate:
    """Stands in for ``model.generate``: records the prompt ids it is fed and 'generates' fixed answers + stop id."""

    def __init__(self, answers: list[str], stop_id: int):
        self.answers, self.stop_id = answers, stop_id
        self.prompts: list[list[int]] = []
        self.configs = []

    def __call__(self, input_ids, attention_mask, generation_config, streamer=None, tokenizer=None):
        self.prompts.append(input_ids[0][attention_mask[0].bool()].tolist())
        self.configs.append(generation_config)
        answer = self.answers[len(self.prompts) - 1]
        new = torch.tensor([tokenizer.encode(answer, add_special_tokens=False) + [self.stop_id]])
        if streamer is not None:
            streamer.put(input_ids)
            for token in new[0]:
                streamer.put(token[None])
            streamer.end()
        return torch.cat([input_ids, new], dim=1)


def training_prompt(tokenizer, chat_format, conversation: list[dict]) -> list[int]:
    """What SFT tokenises for ``conversation``, minus its last answer."""
    pieces = chat_format.dialog(conversation)
    full = encode_dialog(tokenizer, pieces, max_length=10**6).input_ids
    return full[: len(full) - len(tokenizer.encode(pieces[-1][1], add_special_tokens=False))]


# ----------------------------------------------------------------------------------------------------------------
# The chat: history rendered as training renders it


@pytest.mark.parametrize("case", ["vicuna", "tokenizer_chatml"])
def test_chat_feeds_the_model_the_training_rendering_of_its_history(case, tiny_model_dir, tiny_chat_model_dir,
                                                                    capsys, monkeypatch):
    model_dir = tiny_model_dir if case == "vicuna" else tiny_chat_model_dir
    model, tokenizer = load(model_dir)
    chat_format = get_chat_format(tokenizer, "vicuna" if case == "vicuna" else None, SYSTEM)
    fake = FakeGenerate([A1, A2, A1], tokenizer.convert_tokens_to_ids(chat_format.stop_str))
    monkeypatch.setattr(model, "generate", fake)
    inputs = iter([U1, "", U2, "clear", U1, "exit", "never read"])
    history = chat(model, tokenizer, chat_format, InferenceArguments(max_new_tokens=16),
                   read=lambda prompt: next(inputs))

    turn1 = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}]
    turn2 = turn1 + [{"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
    assert len(fake.prompts) == 3
    assert fake.prompts[0] == training_prompt(tokenizer, chat_format, turn1)
    assert fake.prompts[1] == training_prompt(tokenizer, chat_format, turn2)  # the 2-turn history, exactly
    assert fake.prompts[2] == fake.prompts[0]  # `clear` started over
    assert history == turn1
    expected_text = {
        "vicuna": f"{SYSTEM} USER: {U1} ASSISTANT: {A1}</s>USER: {U2} ASSISTANT:",
        "tokenizer_chatml": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
                            f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{U2}<|im_end|>\n"
                            "<|im_start|>assistant\n",
    }[case]
    assert tokenizer.decode(fake.prompts[1], skip_special_tokens=False) == expected_text
    config = fake.configs[0]
    assert config.eos_token_id == [tokenizer.eos_token_id] and config.do_sample and config.temperature == 0.7
    out = capsys.readouterr().out
    assert out == ("Chat with the model. `clear` starts a new conversation, `exit` quits.\n"
                   f"Assistant: {A1}\nAssistant: {A2}\n(conversation cleared)\nAssistant: {A1}\n")


def test_prompt_ids_match_sft_for_a_history_with_a_system_message(tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    chat_format = get_chat_format(tokenizer, "chatml", None)
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
                    {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
                    {"role": "assistant", "content": A2}]
    assert prompt_ids(tokenizer, chat_format, conversation[:-1]) == training_prompt(tokenizer, chat_format, conversation)


def test_streamer_hides_a_stop_text_split_across_chunks(tiny_model_dir, capsys):
    _, tokenizer = load(tiny_model_dir)
    streamer = ChatStreamer(tokenizer, "### End")
    for chunk in ["Rest and", " drink water. #", "##", " End and more", " text"]:
        streamer.on_finalized_text(chunk)
    streamer.on_finalized_text("", stream_end=True)
    streamer.on_finalized_text("Next answer #")  # the streamer is reset for the next answer
    streamer.on_finalized_text("#", stream_end=True)
    assert capsys.readouterr().out == "Rest and drink water. \nNext answer ##\n"


def test_a_multi_token_stop_text_ends_generation_and_the_answer(tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    chat_format = get_chat_format(tokenizer, "llama3", None)  # "<|eot_id|>" is plain text to this tokenizer
    assert len(tokenizer.encode("<|eot_id|>", add_special_tokens=False)) > 1
    stop_ids = inference.stop_token_ids(tokenizer, chat_format)
    assert stop_ids == [tokenizer.eos_token_id]
    config = inference.generation_config(tokenizer, stop_ids, 8, 0.0, 0.9, 1.0, chat_format.stop_str)
    assert config.stop_strings == ["<|eot_id|>"] and not config.do_sample and config.temperature is None
    ids = tokenizer.encode(" Rest well.<|eot_id|><|start_header_id|>user", add_special_tokens=False)
    assert inference.decode_response(tokenizer, chat_format, ids, stop_ids) == "Rest well."
    eos_first = tokenizer.encode("Rest", add_special_tokens=False) + [tokenizer.eos_token_id, 7, 8]
    assert inference.decode_response(tokenizer, chat_format, eos_first, stop_ids) == "Rest"


# ----------------------------------------------------------------------------------------------------------------
# Batch mode


def test_batch_mode_writes_one_row_per_prompt(tiny_chat_model_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    rows = HELDOUT.read_text(encoding="utf-8").splitlines()
    conversation = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                    {"role": "user", "content": U2}]
    data.write_text("\n".join(rows + [json.dumps({"messages": conversation})]) + "\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    count = inference.main(["--base_model", str(tiny_chat_model_dir), "--data_file", str(data), "--output_file",
                            str(out), "--max_new_tokens", "6", "--batch_size", "4"])
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert count == len(written) == len(rows) + 1 == 9
    assert [r.get("question") for r in written[:8]] == [json.loads(r)["question"] for r in rows]
    assert written[8] == {"messages": conversation, "response": written[8]["response"]}
    assert all(sorted(r) in (["question", "response"], ["messages", "response"]) for r in written)
    assert all(isinstance(r["response"], str) for r in written)
    err = capsys.readouterr().err
    assert (f'chat format: {{"kind": "tokenizer", "template_name": null, "system_prompt": null}} '
            f"(default: no medtrain_chat_format.json in {tiny_chat_model_dir})") in err
    # greedy answers do not depend on the batch (left padding, positions from the attention mask)
    model, tokenizer = load(tiny_chat_model_dir)
    chat_format = get_chat_format(tokenizer, None)
    one_by_one = generate_responses(model, tokenizer, chat_format, [[{"role": "user", "content": json.loads(r)["question"]}]
                                                                    for r in rows] + [conversation],
                                    max_new_tokens=6, batch_size=1)
    assert one_by_one == [r["response"] for r in written]


def test_adapter_uses_the_recorded_chat_format_and_answers_like_its_merged_model(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    import merge_peft_adapter

    model, tokenizer = load(tiny_model_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    save_chat_format(get_chat_format(tokenizer, "vicuna", SYSTEM), str(adapter))
    merged = tmp_path / "merged"
    merge_peft_adapter.main(["--base_model", str(tiny_model_dir), "--lora_model", str(adapter), "--output_dir",
                             str(merged)])
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in (U1, U2)), encoding="utf-8")
    capsys.readouterr()
    inference.main(["--base_model", str(tiny_model_dir), "--lora_model", str(adapter), "--data_file", str(data),
                    "--output_file", str(tmp_path / "a.jsonl"), "--max_new_tokens", "5"])
    inference.main(["--base_model", str(merged), "--data_file", str(data), "--output_file", str(tmp_path / "m.jsonl"),
                    "--max_new_tokens", "5"])
    record = '{"kind": "template", "template_name": "vicuna", "system_prompt": "You are a doctor."}'
    err = capsys.readouterr().err
    assert f"chat format: {record} (recorded at training time in {adapter}/medtrain_chat_format.json)" in err
    assert f"chat format: {record} (recorded at training time in {merged}/medtrain_chat_format.json)" in err
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "m.jsonl").read_text()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("extra, message", [
    (["--template_name", "no-such-template"], "error: unknown conversation template 'no-such-template'; choose one of:"),
    (["--data_file", "/nonexistent/prompts.jsonl", "--output_file", "out.jsonl"],
     "error: /nonexistent/prompts.jsonl: data directory does not exist"),
    (["--data_file", "prompts.jsonl"], "error: batch mode needs both --data_file and --output_file."),
    (["--lora_model", "/nonexistent/adapter"], "error: --lora_model /nonexistent/adapter: no such directory."),
    (["--temperature", "-1"], "error: --temperature must be >= 0 (0 = greedy), got -1.0."),
])
def test_bad_input_exits_2_with_one_clear_message(extra, message, tiny_chat_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: inference.main(["--base_model", str(tiny_chat_model_dir), *extra]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_command_line_chat_streams_and_quits(tiny_chat_model_dir):
    """The script on a pipe: two questions, `clear`, end of input; exit status 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), "--base_model", str(tiny_chat_model_dir), "--max_new_tokens", "4",
         "--temperature", "0"],
        input=f"{U1}\n{U2}\nclear\n", capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
                 OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout  # (the tiny model's random answers may contain newlines: count markers, not lines)
    assert out.startswith("Chat with the model. `clear` starts a new conversation, `exit` quits.\nUser: Assistant: ")
    assert out.count("User: ") == 4 and out.count("Assistant: ") == 2
    assert out.endswith("User: (conversation cleared)\nUser: \n")
    assert "Traceback" not in result.stderr
