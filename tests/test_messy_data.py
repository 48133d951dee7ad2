"""Messy real files: repaired trailing user turns, a few bad records skipped with a report, too many stop the run.

The 1,000-conversation file mirrors MedicalGPT's multi-turn ShareGPT sample: 7 conversations end with an
unanswered user turn and 1 has an empty turn (0.8% defects). It is built here from synthetic conversations.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from medtrain.arguments import DataArguments
from medtrain.data import allowed_invalid, check_invalid_records, load_splits
from medtrain.errors import DataError
from medtrain.formats import LoadReport, load_conversations

TRAILING = [13, 101, 250, 404, 555, 777, 990]  # 0-based records ending with an unanswered user turn
EMPTY = 612  # record with an empty assistant turn


def conversation(i: int, turns: int = 3) -> dict:
    conv = [{"from": "system", "value": "You are a careful doctor."}] if i % 5 == 0 else []
    for t in range(turns):
        conv.append({"from": "human", "value": f"Patient {i}, question {t}: is a fever of {37 + t % 3} bad?"})
        conv.append({"from": "gpt", "value": f"Answer {t} for patient {i}: rest and drink water."})
    return {"conversations": conv}


def messy_file(path, n: int = 1000, trailing=TRAILING, empty=(EMPTY,)) -> str:
    rows = [conversation(i, turns=1 + i % 3) for i in range(n)]
    for i in trailing:
        rows[i]["conversations"].append({"from": "human", "value": "Thanks! One more thing?"})
    for i in empty:
        rows[i]["conversations"][-1]["value"] = "  "
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def data_args(directory, **kwargs) -> DataArguments:
    return DataArguments(train_file_dir=str(directory), **kwargs)


def test_messy_file_trains_by_default_with_a_loud_report(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    path = messy_file(data / "multi_turn.jsonl")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        train, _ = load_splits(data_args(data), load_conversations, report_dir=str(out))
    assert len(train) == 999  # the empty-turn record skipped; the 7 trailing turns dropped, their answers kept
    by_source = {r["source"]: r for r in train}
    for i in TRAILING:
        messages = by_source[f"{path}:{i + 1}"]["messages"]
        assert messages[-1]["role"] == "assistant" and messages == _expected(i)
    assert f"{path}:{EMPTY + 1}" not in by_source
    report = (out / "invalid_samples.txt").read_text().splitlines()
    assert report[0] == f"{path}:{EMPTY + 1}: conversations[{2 * (1 + EMPTY % 3) - 1}].value: empty text"
    assert report[1:] == [f"{path}:{i + 1}: conversations[{2 * (1 + i % 3) + (i % 5 == 0)}]: unanswered user turn "
                          "at the end: dropped, the answered turns are kept" for i in TRAILING]
    log = caplog.text
    assert "SKIPPED 1 bad record(s) (policy: --max_invalid_fraction 0.01)" in log
    assert "7 conversation(s) ended with an unanswered user turn" in log and f"{path}:{TRAILING[0] + 1}" in log


def _expected(i: int) -> list[dict]:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in conversation(i, turns=1 + i % 3)["conversations"]]


def test_strict_mode_stops_listing_all_eight(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = messy_file(data / "multi_turn.jsonl")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        load_splits(data_args(data, strict_data=True), load_conversations, report_dir=str(out))
    text = str(err.value)
    assert text.startswith("8 bad record(s) in 1 file(s) and --strict_data is set\nproblems:\n")
    listed = [line.strip().split(": ")[0] for line in text.splitlines() if line.startswith(f"  {path}:")]
    assert listed == [f"{path}:{i + 1}" for i in sorted(TRAILING + [EMPTY])]
    assert "--max_invalid_fraction" in text and "--skip_invalid_samples" in text
    assert not out.exists()  # nothing written when the run stops


def test_past_the_threshold_is_a_format_problem(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bad = list(range(0, 1000, 80))  # 13 empty turns in 1,000 records: 1.3% > 1%
    path = messy_file(data / "m.jsonl", trailing=[], empty=bad)
    with pytest.raises(DataError) as err:
        load_splits(data_args(data), load_conversations, report_dir=str(tmp_path / "out"))
    text = str(err.value)
    assert text.startswith("too many bad records, which looks like a format problem rather than noise:\n"
                           f"  {path}: 13 of 1000 records are invalid; --max_invalid_fraction 0.01 allows 10 in a "
                           "file of 1000 records (all 13 listed in ")
    assert text.count(f"  {path}:") == 10 + 1 and "... and 3 more" in text
    assert len((tmp_path / "out" / "invalid_samples.txt").read_text().splitlines()) == 13
    for flags in (dict(max_invalid_fraction=0.02), dict(skip_invalid_samples=True)):
        train, _ = load_splits(data_args(data, **flags), load_conversations)
        assert len(train) == 987


def test_tiny_files_tolerate_no_bad_record_and_problems_are_collected_over_all_files(tmp_path):
    assert [allowed_invalid(n, 0.01) for n in (1, 99, 100, 199, 200, 1000)] == [0, 0, 1, 1, 2, 10]
    assert allowed_invalid(1000, 0.0) == 0 and allowed_invalid(7, 1.0) == 7
    data = tmp_path / "data"
    data.mkdir()
    a = messy_file(data / "a.jsonl", n=50, trailing=[], empty=[3])
    b = messy_file(data / "b.jsonl", n=300, trailing=[], empty=[7, 9])  # 2 allowed in 300: fine alone
    (data / "c.json").write_text('[{"conversations": []},', encoding="utf-8")  # broken array: a whole-file problem
    report = LoadReport()
    load_conversations(sorted(str(p) for p in data.iterdir()), report)
    with pytest.raises(DataError) as err:
        check_invalid_records(report, data_args(data))
    text = str(err.value)
    assert f"  {data / 'c.json'}:1: invalid JSON in array (Expecting value) (the whole file" in text
    assert f"  {a}: 1 of 50 records are invalid; --max_invalid_fraction 0.01 allows 0 in a file of 50 records" in text
    assert f"{b}: 2 of 300" not in text  # within its allowance
    assert [line.split(": ")[0].strip() for line in text.split("problems:\n")[1].splitlines()[:4]] == [
        f"{a}:4", f"{b}:8", f"{b}:10", f"{data / 'c.json'}:1"]


def test_sft_trains_on_the_messy_file_and_strict_stops(tiny_chat_model_dir, tmp_path, monkeypatch, capsys):
    from test_bad_input_catalogue import invoke, stage_args

    import supervised_finetuning

    data = tmp_path / "data"
    data.mkdir()
    messy_file(data / "multi_turn.jsonl")
    out = tmp_path / "out"
    trainer = supervised_finetuning.main(stage_args("sft", tiny_chat_model_dir, data, out)
                                         + ["--model_max_length", "128"])
    assert trainer.state.global_step == 1
    assert len((out / "invalid_samples.txt").read_text().splitlines()) == 8
    strict_out = tmp_path / "strict"
    code = invoke("supervised_finetuning", stage_args("sft", tiny_chat_model_dir, data, strict_out) + ["--strict_data"],
                  monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "error: 8 bad record(s) in 1 file(s) and --strict_data is set" in err
    assert "Traceback" not in err and not os.path.exists(strict_out / "invalid_samples.txt")


def test_a_single_bad_record_leads_the_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = messy_file(data / "small.jsonl", n=20, trailing=[], empty=[4])
    with pytest.raises(DataError) as err:
        load_splits(data_args(data), load_conversations)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}:5: conversations[{2 * (1 + 4 % 3) - 1}].value: empty text"
    assert lines[1] == ("(stopped: too many bad records, which looks like a format problem rather than noise:")
    assert lines[2] == f"  {path}: 1 of 20 records are invalid; --max_invalid_fraction 0.01 allows 0 in a file of 20 records)"
    assert "--skip_invalid_samples" in lines[3]
