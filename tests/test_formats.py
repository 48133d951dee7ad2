"""Every SFT/preference input format normalises to the same messages; bad records name file:line:field."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from medtrain.errors import DataError
from medtrain.formats import LoadReport, find_data_files, load_conversations, load_preferences, load_prompts

EXPECTED = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "I have a fever."},
    {"role": "assistant", "content": "Drink water and rest."},
    {"role": "user", "content": "And if it lasts?"},
    {"role": "assistant", "content": "See a doctor after three days."},
]


def sharegpt():
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in EXPECTED]}


def test_every_sft_format_loads_to_the_same_conversation(tmp_path):
    share = write_jsonl(tmp_path / "share.jsonl", [sharegpt()])
    openai = write_jsonl(tmp_path / "openai.jsonl", [{"messages": EXPECTED}])
    user_roles = write_jsonl(tmp_path / "roles.jsonl", [{"conversations": [
        {"from": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "value": t["value"]}
        for t in sharegpt()["conversations"]]}])
    alpaca = tmp_path / "alpaca.json"  # JSON array, history + system
    alpaca.write_text(json.dumps([{"system": "You are a careful doctor.", "history": [["I have a fever.", "Drink water and rest."]],
                                   "instruction": "And if it lasts?", "input": "", "output": "See a doctor after three days."}],
                                 indent=2), encoding="utf-8")
    for path in (share, openai, user_roles, str(alpaca)):
        records = load_conversations([path])
        assert [r["messages"] for r in records] == [EXPECTED], path
    assert load_conversations([share])[0]["source"] == f"{share}:1"


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "发烧", "output": "fever"}])
    assert load_conversations([path])[0]["messages"] == [
        {"role": "user", "content": "Translate\n发烧"}, {"role": "assistant", "content": "fever"}]


def test_json_array_records_report_their_line(tmp_path):
    path = tmp_path / "arr.json"
    good = {"instruction": "q", "output": "a"}
    path.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ",\n" + '{"instruction": "q", "output": 3}\n]',
                    encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_conversations([str(path)])
    assert str(err.value) == f"{path}:4: output: expected a string, got int"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [{"from": "human", "value": "hi"}', "invalid JSON"),
        ('{"conversations": [{"from": "doctor", "value": "hi"}, {"from": "gpt", "value": "x"}]}',
         "conversations[0].from: unknown role 'doctor'"),
        ('{"conversations": []}', "conversations: empty conversation"),
        ('{"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}',
         "conversations[0].value: expected a string, got int"),
        ('{"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]}',
         "conversations[0].value: empty text"),
        ('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}',
         "conversations[0]: roles out of order"),
        ('{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "c"}]}',
         "conversations: conversation must end with an assistant turn"),
        ('{"conversations": [{"from": "human", "value": "a", "value": "b"}]}', "duplicated key 'value'"),
        ('{"text": "not a conversation"}', "unknown sft format with keys ['text']"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_bad_sft_records_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(sharegpt()) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_conversations([str(path)])
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text, text


def test_non_utf8_empty_and_missing_inputs(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(sharegpt()).encode() + b"\n" + '{"instruction": "fi\xe8vre", "output": "x"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe8"):
        load_conversations([str(bad)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load_conversations([str(empty)])
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"nodata: no \*.json/\*.jsonl files found"):
        find_data_files(str(tmp_path / "nodata"))
    with pytest.raises(DataError, match="data directory does not exist"):
        find_data_files(str(tmp_path / "missing"))


def test_bom_is_accepted_and_files_are_found_recursively_in_order(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "x.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(sharegpt()).encode())
    write_jsonl(tmp_path / "a.json", [sharegpt()])
    files = find_data_files(str(tmp_path))
    assert files == [str(tmp_path / "a.json"), str(tmp_path / "b" / "c" / "x.jsonl")]
    assert len(load_conversations(files)) == 2


def test_skip_invalid_collects_every_bad_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(sharegpt()), "{broken", json.dumps({"conversations": []}), json.dumps(sharegpt())]),
                    encoding="utf-8")
    with pytest.raises(DataError) as err:  # without a report, every problem is read first, then one error
        load_conversations([str(path)])
    assert str(err.value).splitlines() == [
        "2 invalid records:", f"  {path}:2: invalid JSON (Expecting property name enclosed in double quotes)",
        f"  {path}:3: conversations: empty conversation"]
    report = LoadReport()  # JSON Lines lines are independent: a broken one does not hide the records after it
    records = load_conversations([str(path)], report)
    assert len(records) == 2 and [str(p) for p in report.problems] == str(err.value).replace("  ", "").splitlines()[1:]
    assert report.records == {str(path): 4} and report.file_errors == [] and report.repaired == []


def test_trailing_user_turn_is_dropped_and_noted(tmp_path):
    conv = sharegpt()
    conv["conversations"].append({"from": "human", "value": "Thanks, anything else?"})
    path = write_jsonl(tmp_path / "t.jsonl", [conv])
    report = LoadReport()
    assert load_conversations([path], report)[0]["messages"] == EXPECTED
    assert [str(r) for r in report.repaired] == [
        f"{path}:1: conversations[5]: unanswered user turn at the end: dropped, the answered turns are kept"]
    assert report.problems == []


PREF_PROMPT = [{"role": "user", "content": "Is it a cold?"}, {"role": "assistant", "content": "Probably."},
               {"role": "user", "content": "What should I do?"}]


def test_every_preference_format_gives_the_same_pair(tmp_path):
    conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in PREF_PROMPT]
    rows = {
        "medicalgpt": {"conversations": conv, "chosen": "Rest and drink fluids.", "rejected": "Nothing."},
        "llamafactory": {"conversations": conv, "chosen": {"from": "gpt", "value": "Rest and drink fluids."},
                         "rejected": {"from": "gpt", "value": "Nothing."}},
        "trl_messages": {"prompt": PREF_PROMPT, "chosen": [{"role": "assistant", "content": "Rest and drink fluids."}],
                         "rejected": [{"role": "assistant", "content": "Nothing."}]},
    }
    for name, row in rows.items():
        pair = load_preferences([write_jsonl(tmp_path / f"{name}.jsonl", [row])])[0]
        assert (pair["messages"], pair["chosen"], pair["rejected"]) == (PREF_PROMPT, "Rest and drink fluids.", "Nothing."), name
    old = load_preferences([write_jsonl(tmp_path / "old.jsonl", [
        {"question": "What should I do?", "response_chosen": "Rest.", "response_rejected": "Nothing."}])])[0]
    assert (old["messages"], old["chosen"], old["rejected"]) == ([PREF_PROMPT[-1]], "Rest.", "Nothing.")
    simple = load_preferences([write_jsonl(tmp_path / "simple.jsonl", [
        {"prompt": "What should I do?", "chosen": "Rest.", "rejected": "Nothing.", "margin": 2}])])[0]
    assert simple["messages"] == [PREF_PROMPT[-1]] and simple["margin"] == 2.0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected: chosen and rejected are identical"),
        ({"prompt": "q", "chosen": "a"}, "rejected: missing 'rejected'"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt: empty text"),
        ({"prompt": "q", "chosen": 1, "rejected": "b"}, "chosen: expected a string, got int"),
        ({"question": "q", "response_chosen": "a", "response_rejected": None}, "response_rejected: missing"),
        ({"query": "q", "answer": "a"}, "unknown preference format"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin: expected a number, got str"),
    ],
)
def test_bad_preference_records(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pref.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_preferences([path])
    assert str(err.value).startswith(f"{path}:1: ") and message in str(err.value), str(err.value)


def test_prompts_come_from_sft_preference_and_simple_files(tmp_path):
    sft = load_prompts([write_jsonl(tmp_path / "s.jsonl", [sharegpt()])])[0]["messages"]
    assert sft == EXPECTED[:-1]
    q = load_prompts([write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?"}])])[0]["messages"]
    assert q == [{"role": "user", "content": "Why?"}]
