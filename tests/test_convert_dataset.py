"""convert_dataset.py: exact ShareGPT output for each input kind, exact messages for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts live in the repo root, next to medtrain/
    sys.path.insert(0, str(ROOT))

import convert_dataset  # noqa: E402
from medtrain.entrypoint import run_main  # noqa: E402
from medtrain.formats import load_conversations  # noqa: E402


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def system(text: str) -> dict:
    return {"from": "system", "value": text}


@pytest.fixture
def convert(tmp_path, monkeypatch, capsys):
    """Write ``content`` to ``name`` in a fresh folder (the cwd), run the converter, return (status, out, err)."""
    monkeypatch.chdir(tmp_path)

    def run(name: str, content: str | bytes, *flags: str, out_file: str = "out.jsonl") -> tuple[int, str, str]:
        data = content.encode("utf-8") if isinstance(content, str) else content
        Path(name).write_bytes(data)
        try:
            status = run_main(lambda: convert_dataset.main(["--in_file", name, "--out_file", out_file, *flags]))
        except SystemExit as exc:
            status = exc.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def output_records(path: str = "out.jsonl") -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every record ends with a newline
    return [json.loads(line) for line in lines[:-1]]


def jsonl(*records: object) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


# --- inputs that convert ----------------------------------------------------------------------------------

ALPACA = [
    {"instruction": "解释高血压。", "input": " ", "output": "血压持续升高。"},  # a blank input is left out
    {"instruction": "Translate into Chinese.", "input": "Take it twice a day.", "output": "每天服用两次。"},
    {
        "instruction": "那需要吃药吗？",
        "output": "遵医嘱。",
        "history": [["我头痛。", "多休息。"], ["还发烧。", "量体温。"]],
    },
    {"instruction": "What is a fever?", "input": None, "output": "A raised temperature.", "system": "Be brief."},
]
ALPACA_EXPECTED = [
    {"conversations": [human("解释高血压。"), gpt("血压持续升高。")]},
    {"conversations": [human("Translate into Chinese.\nTake it twice a day."), gpt("每天服用两次。")]},
    {
        "conversations": [
            human("我头痛。"),
            gpt("多休息。"),
            human("还发烧。"),
            gpt("量体温。"),
            human("那需要吃药吗？"),
            gpt("遵医嘱。"),
        ]
    },
    {"conversations": [system("Be brief."), human("What is a fever?"), gpt("A raised temperature.")]},
]


def test_alpaca_json_lines(convert):
    assert convert("data.jsonl", jsonl(*ALPACA)) == (
        0,
        "wrote 4 conversations to out.jsonl (alpaca: 4, qa: 0)\n",
        "",
    )
    assert output_records() == ALPACA_EXPECTED
    # Non-ASCII text stays readable in the output file.
    assert "解释高血压。" in Path("out.jsonl").read_text(encoding="utf-8")


def test_alpaca_json_array(convert):
    assert convert("data.json", json.dumps(ALPACA, ensure_ascii=False, indent=2))[0] == 0
    assert output_records() == ALPACA_EXPECTED


def test_json_extension_holding_json_lines(convert):
    assert convert("data.json", jsonl(*ALPACA[:2]))[0] == 0
    assert output_records() == ALPACA_EXPECTED[:2]


def test_question_answer_variants(convert):
    records = [
        {"question": "什么是贫血？", "answer": "血红蛋白低于正常。"},
        {"query": "What is BMI?", "response": "Weight over height squared.", "id": 7},
        {"prompt": "感冒要吃抗生素吗？", "response": "通常不需要。", "system": "你是医生。"},
    ]
    status, out, _ = convert("qa.jsonl", jsonl(*records), "--data_type", "qa")
    assert (status, out) == (0, "wrote 3 conversations to out.jsonl (alpaca: 0, qa: 3)\n")
    assert output_records() == [
        {"conversations": [human("什么是贫血？"), gpt("血红蛋白低于正常。")]},
        {"conversations": [human("What is BMI?"), gpt("Weight over height squared.")]},
        {"conversations": [system("你是医生。"), human("感冒要吃抗生素吗？"), gpt("通常不需要。")]},
    ]


def test_auto_detects_each_record(convert):
    records = [{"question": "q1?", "answer": "a1"}, {"instruction": "i2", "output": "o2"}]
    assert convert("mixed.jsonl", jsonl(*records))[1] == "wrote 2 conversations to out.jsonl (alpaca: 1, qa: 1)\n"
    assert output_records() == [
        {"conversations": [human("q1?"), gpt("a1")]},
        {"conversations": [human("i2"), gpt("o2")]},
    ]


def test_csv(convert):
    # A quoted cell with a comma and a line break, an empty input cell, a history cell holding JSON.
    content = (
        "instruction,input,output,history\r\n"
        '"Summarise, briefly:","Line one\nline two",Short.,\r\n'
        'Next?,,Done.,"[[""Hi"", ""Hello""]]"\r\n'
    )
    assert convert("data.csv", content)[0] == 0
    assert output_records() == [
        {"conversations": [human("Summarise, briefly:\nLine one\nline two"), gpt("Short.")]},
        {"conversations": [human("Hi"), gpt("Hello"), human("Next?"), gpt("Done.")]},
    ]


def test_tsv(convert):
    content = 'question\tanswer\n咳嗽怎么办？\t多喝水。\n\nHe said "hi"\tOK, noted.\n'
    assert convert("data.tsv", content)[0] == 0
    assert output_records() == [
        {"conversations": [human("咳嗽怎么办？"), gpt("多喝水。")]},
        {"conversations": [human('He said "hi"'), gpt("OK, noted.")]},
    ]


def test_in_format_overrides_the_extension(convert):
    assert convert("data.txt", "question,answer\nq?,a\n", "--in_format", "csv")[0] == 0
    assert output_records() == [{"conversations": [human("q?"), gpt("a")]}]


def test_line_separator_characters_are_escaped(convert):
    assert convert("data.jsonl", jsonl({"question": "a\u2028b", "answer": "c\x85d"}))[0] == 0
    text = Path("out.jsonl").read_text(encoding="utf-8")
    assert (
        text == '{"conversations": [{"from": "human", "value": "a\\u2028b"}, {"from": "gpt", "value": "c\\u0085d"}]}\n'
    )


def test_same_conversations_as_the_sft_stage_reading_alpaca(convert):
    """Converting first must not change what the SFT stage trains on."""
    sample = ROOT / "data" / "alpaca" / "medical_alpaca_zh_en.json"
    if not sample.is_file():
        pytest.skip("data/alpaca/medical_alpaca_zh_en.json is not in this checkout")
    status, out, _ = convert("sample.json", sample.read_bytes())
    assert (status, out) == (0, "wrote 20 conversations to out.jsonl (alpaca: 20, qa: 0)\n")
    direct = [record["messages"] for record in load_conversations([str(sample)])]
    converted = [record["messages"] for record in load_conversations(["out.jsonl"])]
    assert converted == direct


# --- bad inputs -------------------------------------------------------------------------------------------


def assert_fails(result: tuple[int, str, str], message: str) -> None:
    """Exit 2, exactly ``error: message`` on stderr, and no output file or temporary file left behind."""
    assert result == (2, "", f"error: {message}\n")
    assert not Path("out.jsonl").exists()
    assert [p.name for p in Path(".").iterdir() if p.name.startswith(".")] == []


def test_wrong_type_names_file_line_and_field(convert):
    # 15 good records, a blank line (still counted), then the bad one on line 17.
    good = jsonl(*[{"instruction": f"q{i}", "output": f"a{i}"} for i in range(15)])
    content = good + "\n" + jsonl({"instruction": "q", "output": 42})
    assert_fails(convert("data.jsonl", content), "data.jsonl:17: output: expected a string, got int")


def test_wrong_type_in_json_array_names_the_element_line(convert):
    content = '[\n  {"instruction": "a", "output": "b"},\n\n  {\n    "instruction": "c",\n    "output": null\n  }\n]\n'
    # The second element's "{" is on line 4.
    assert_fails(convert("data.json", content), "data.json:4: output: expected a string, got null")


def test_truncated_json_line(convert):
    line = '{"instruction": "x", "output": "y"'  # 34 characters, the closing brace lost
    assert_fails(
        convert("data.jsonl", jsonl(ALPACA[0]) + line),
        "data.jsonl:2: invalid JSON (Expecting ',' delimiter at column 35)",
    )


def test_missing_field(convert):
    assert_fails(convert("data.jsonl", jsonl({"instruction": "x"})), "data.jsonl:1: output: missing")


def test_missing_field_when_type_is_forced(convert):
    assert_fails(
        convert("data.jsonl", jsonl({"instruction": "x", "output": "y"}), "--data_type", "qa"),
        "data.jsonl:1: question: missing (expected one of question, query, prompt)",
    )


def test_empty_answer(convert):
    assert_fails(convert("data.jsonl", jsonl({"query": "x", "response": "  "})), "data.jsonl:1: response: empty")


def test_bad_history_pair(convert):
    record = {"instruction": "x", "output": "y", "history": [["q", "a"], ["q", "a", "extra"]]}
    assert_fails(
        convert("data.jsonl", jsonl(record)),
        "data.jsonl:1: history[1]: expected a [question, answer] pair, got a list of 3",
    )


def test_unknown_record_layout(convert):
    assert_fails(
        convert("data.jsonl", jsonl({"text": "x"})),
        "data.jsonl:1: cannot tell the record type from its keys (text): expected alpaca "
        "(instruction, input, output) or qa (question/answer, query/response, prompt/response)",
    )


def test_record_not_an_object(convert):
    assert_fails(convert("data.jsonl", "[1, 2]\n"), "data.jsonl:1: expected a JSON object, got list")


def test_csv_row_of_the_wrong_width(convert):
    assert_fails(
        convert("data.csv", 'question,answer\n"multi\nline",ok\nonly one cell\n'),
        "data.csv:4: expected 2 columns like the header, got 1",
    )


def test_csv_quote_never_closed(convert):
    assert_fails(
        convert("data.csv", 'question,answer\nq,a\n"open,b\nc,d\n'),
        "data.csv:3: invalid CSV (unexpected end of data)",
    )


def test_non_utf8(convert):
    # GBK bytes of "发热" in the second record: its first byte, 0xb7, is at offset 36 (line 1) + 17 = 53.
    # (Some GBK text is valid UTF-8 by chance: "头痛" is b"\xcd\xb7\xcd\xb4", which decodes as "ͷʹ".)
    content = b'{"instruction": "a", "output": "b"}\n{"instruction": "' + "发热".encode("gbk") + b'", "output": "c"}\n'
    assert_fails(
        convert("data.jsonl", content),
        "data.jsonl:2: not valid UTF-8 (byte 0xb7 at offset 53); re-save the file as UTF-8",
    )


def test_empty_file(convert):
    assert_fails(convert("data.jsonl", "\n  \n"), "data.jsonl: empty file, no records")


def test_empty_array(convert):
    assert_fails(convert("data.json", "[ ]"), "data.json: nothing to convert (no records)")


def test_missing_input_file(convert):
    assert_fails(convert("data.jsonl", "", "--in_file", "absent.jsonl"), "absent.jsonl: no such file")


def test_unknown_extension(convert):
    assert_fails(
        convert("data.txt", "x"),
        "cannot tell the format of data.txt from its extension (known: .json, .jsonl, .ndjson, .csv, .tsv); "
        "pass --in_format json|jsonl|csv|tsv",
    )


def test_existing_out_file_is_kept_unless_overwrite(convert):
    Path("out.jsonl").write_text("precious\n")
    assert convert("data.jsonl", jsonl(ALPACA[0])) == (
        2,
        "",
        "error: out.jsonl already exists; pass --overwrite to replace it\n",
    )
    assert Path("out.jsonl").read_text() == "precious\n"
    assert convert("data.jsonl", jsonl(ALPACA[0]), "--overwrite")[0] == 0
    assert output_records() == ALPACA_EXPECTED[:1]


def test_failed_overwrite_keeps_the_old_file(convert):
    Path("out.jsonl").write_text("precious\n")
    assert convert("data.jsonl", jsonl({"instruction": "x"}), "--overwrite")[0] == 2
    assert Path("out.jsonl").read_text() == "precious\n"


# --- --skip_invalid ---------------------------------------------------------------------------------------


def test_skip_invalid_counts_and_reports(convert):
    content = (
        jsonl(ALPACA[0])
        + '{"instruction": "x", "output": "y"\n'
        + jsonl({"question": "q", "answer": 5}, {"question": "q?", "answer": "a"}, ["not", "a", "record"])
    )
    status, out, err = convert("data.jsonl", content, "--skip_invalid")
    assert (status, err) == (0, "")
    assert out == (
        "wrote 2 conversations to out.jsonl (alpaca: 1, qa: 1)\n"
        "skipped 3 invalid records; reasons in out.jsonl.skipped.txt\n"
    )
    assert output_records() == [ALPACA_EXPECTED[0], {"conversations": [human("q?"), gpt("a")]}]
    assert Path("out.jsonl.skipped.txt").read_text(encoding="utf-8") == (
        "data.jsonl:2: invalid JSON (Expecting ',' delimiter at column 35)\n"
        "data.jsonl:3: answer: expected a string, got int\n"
        "data.jsonl:5: expected a JSON object, got list\n"
    )


def test_skip_invalid_with_nothing_left(convert):
    content = jsonl({"instruction": "x"}, {"instruction": "y"})
    assert convert("data.jsonl", content, "--skip_invalid", "--report_file", "bad.txt") == (
        2,
        "",
        "error: data.jsonl: nothing to convert (2 invalid, listed in bad.txt)\n",
    )
    assert not Path("out.jsonl").exists()
    assert Path("bad.txt").read_text() == "data.jsonl:1: output: missing\ndata.jsonl:2: output: missing\n"


def test_skip_invalid_does_not_skip_an_unreadable_file(convert):
    assert_fails(
        convert("data.json", '[{"instruction": "x", "output": "y"} {"instruction": "z"}]', "--skip_invalid"),
        "data.json:1: invalid JSON array: expected ',' or ']'",
    )


# --- the command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"instruction": "x", "output": "y"', "data.jsonl:1: invalid JSON (Expecting ',' delimiter at column 35)"),
        (
            b'{"instruction": "\xff"}',
            "data.jsonl:1: not valid UTF-8 (byte 0xff at offset 17); re-save the file as UTF-8",
        ),
    ],
)
def test_command_line_exits_2_without_traceback(tmp_path, content, message):
    (tmp_path / "data.jsonl").write_bytes(content)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "convert_dataset.py"), "--in_file", "data.jsonl", "--out_file", "out.jsonl"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
