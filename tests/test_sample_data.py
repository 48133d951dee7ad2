"""Structure and counts of the sample data under data/, checked with plain json so the files cannot rot silently.

Nothing here imports project code: if a loader changes, these files still have to match the documented formats.
"""

import json
import re
import string
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
SHARED_QWEN = Path(__file__).resolve().parent.parent.parent / "shared" / "tokenizers" / "qwen2.5" / "tokenizer.json"

SFT_ZH = DATA / "sft" / "medical_sft_zh.jsonl"
SFT_EN = DATA / "sft" / "medical_sft_en.jsonl"
SFT_OPENAI = DATA / "sft_openai" / "medical_sft_messages.jsonl"
ALPACA = DATA / "alpaca" / "medical_alpaca_zh_en.json"
PT_ZH = DATA / "pretrain" / "medical_zh.txt"
PT_EN = DATA / "pretrain" / "medical_en.txt"
PT_MIXED = DATA / "pretrain" / "medical_mixed.jsonl"
RW_ZH = DATA / "reward" / "medical_pairs_zh.jsonl"
RW_EN = DATA / "reward" / "medical_pairs_en.jsonl"
HELDOUT = DATA / "prompts" / "heldout_questions.jsonl"
README = DATA / "README.md"

TRAINING_FILES = [SFT_ZH, SFT_EN, SFT_OPENAI, ALPACA, PT_ZH, PT_EN, PT_MIXED, RW_ZH, RW_EN]

CJK = re.compile(r"[\u4e00-\u9fff]")


def load_jsonl(path: Path) -> list[dict]:
    """Every line must be one JSON object; a blank or broken line fails with its line number."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        assert line.strip(), f"{path.name}:{lineno}: blank line"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name}:{lineno}: not a JSON object"
        rows.append(row)
    return rows


def assert_text(value: object, where: str) -> None:
    """A text field must be a non-empty string without surrounding whitespace."""
    assert isinstance(value, str), f"{where}: not a string"
    assert value.strip(), f"{where}: empty"
    assert value == value.strip(), f"{where}: leading or trailing whitespace"


def check_sharegpt(conv: list, where: str, last: str) -> tuple[int, bool]:
    """Check roles: optional leading system, then human/gpt alternating, ending with `last`.

    Returns (number of human turns, has system message).
    """
    assert isinstance(conv, list) and conv, f"{where}: no conversations"
    for i, msg in enumerate(conv):
        assert set(msg) == {"from", "value"}, f"{where}[{i}]: keys {sorted(msg)}"
        assert_text(msg["value"], f"{where}[{i}]")
    has_system = conv[0]["from"] == "system"
    body = conv[1:] if has_system else conv
    expected = ["human" if i % 2 == 0 else "gpt" for i in range(len(body))]
    assert [m["from"] for m in body] == expected, f"{where}: roles {[m['from'] for m in conv]}"
    assert body and body[-1]["from"] == last, f"{where}: must end with {last}"
    return sum(m["from"] == "human" for m in body), has_system


def normalise(text: str) -> str:
    """Lowercase and drop whitespace and punctuation (ASCII and CJK) so near-copies still match."""
    drop = set(string.punctuation) | set("，。？！、；：“”‘’（）《》…—·")
    return "".join(ch for ch in text.lower() if not ch.isspace() and ch not in drop)


def strings(obj: object) -> list[str]:
    """Every string inside a decoded JSON value."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return [s for item in obj for s in strings(item)]
    return []


def sft_stats(rows: list[dict], name: str) -> tuple[int, int]:
    """Return (multi-turn count, system count) of ShareGPT SFT rows after checking each one."""
    multi = systems = 0
    for i, row in enumerate(rows):
        assert set(row) == {"conversations"}, f"{name}:{i + 1}: keys {sorted(row)}"
        pairs, has_system = check_sharegpt(row["conversations"], f"{name}:{i + 1}", last="gpt")
        assert 1 <= pairs <= 4, f"{name}:{i + 1}: {pairs} user/assistant pairs"
        multi += pairs >= 2
        systems += has_system
    return multi, systems


def test_sft_counts_roles_multi_turn_and_system_share():
    zh, en = load_jsonl(SFT_ZH), load_jsonl(SFT_EN)
    assert len(zh) >= 36 and len(en) >= 36
    multi_zh, sys_zh = sft_stats(zh, SFT_ZH.name)
    multi_en, sys_en = sft_stats(en, SFT_EN.name)
    total = len(zh) + len(en)
    assert total >= 72
    assert 3 * (multi_zh + multi_en) >= total, "at least a third must be multi-turn"
    assert multi_zh >= 1 and multi_en >= 1
    assert sys_zh + sys_en >= 10


def test_sft_languages_match_file_names():
    for row in load_jsonl(SFT_ZH):
        for msg in row["conversations"]:
            assert CJK.search(msg["value"]), f"zh file has a turn without Chinese: {msg['value'][:40]}"
    for row in load_jsonl(SFT_EN):
        for msg in row["conversations"]:
            assert not CJK.search(msg["value"]), f"en file has Chinese: {msg['value'][:40]}"


def test_sft_first_questions_are_unique():
    questions = [
        next(m["value"] for m in row["conversations"] if m["from"] == "human")
        for row in load_jsonl(SFT_ZH) + load_jsonl(SFT_EN)
    ]
    assert len(questions) == len(set(questions))


def test_sft_conversations_stay_short():
    # Character budgets keep sequences short for the CPU pipeline without needing a tokenizer.
    for path, budget in ((SFT_ZH, 400), (SFT_EN, 1200)):
        for i, row in enumerate(load_jsonl(path), start=1):
            size = sum(len(m["value"]) for m in row["conversations"])
            assert size <= budget, f"{path.name}:{i}: {size} characters > {budget}"


@pytest.mark.skipif(not SHARED_QWEN.exists(), reason="needs ../shared/tokenizers/qwen2.5 (reference tokenizer)")
def test_sft_and_reward_rows_fit_300_qwen_tokens():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SHARED_QWEN))
    for path in (SFT_ZH, SFT_EN, RW_ZH, RW_EN):
        for i, row in enumerate(load_jsonl(path), start=1):
            text = "\n".join(m["value"] for m in row["conversations"]) + "\n" + row.get("chosen", "")
            n = len(tok.encode(text).ids)
            assert n <= 300, f"{path.name}:{i}: {n} tokens"


def test_openai_messages_format_and_distinct_from_sharegpt():
    rows = load_jsonl(SFT_OPENAI)
    assert len(rows) == 8
    sharegpt_texts = {m["value"] for row in load_jsonl(SFT_ZH) + load_jsonl(SFT_EN) for m in row["conversations"]}
    with_system = multi = 0
    for i, row in enumerate(rows, start=1):
        assert set(row) == {"messages"}
        msgs = row["messages"]
        for msg in msgs:
            assert set(msg) == {"role", "content"}
            assert_text(msg["content"], f"{SFT_OPENAI.name}:{i}")
            # System prompts are shared on purpose; questions and answers must be new.
            if msg["role"] != "system":
                assert msg["content"] not in sharegpt_texts, f"{SFT_OPENAI.name}:{i}: repeats a ShareGPT turn"
        has_system = msgs[0]["role"] == "system"
        body = msgs[1:] if has_system else msgs
        assert [m["role"] for m in body] == ["user" if j % 2 == 0 else "assistant" for j in range(len(body))]
        assert body[-1]["role"] == "assistant"
        with_system += has_system
        multi += len(body) >= 4
    assert with_system >= 1 and multi >= 1


def test_alpaca_array_records_and_history():
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    assert isinstance(records, list) and len(records) == 20
    with_input = with_history = 0
    for i, rec in enumerate(records):
        assert {"instruction", "input", "output"} <= set(rec) <= {"instruction", "input", "output", "history"}
        assert_text(rec["instruction"], f"alpaca[{i}].instruction")
        assert_text(rec["output"], f"alpaca[{i}].output")
        assert isinstance(rec["input"], str)
        if rec["input"]:
            assert_text(rec["input"], f"alpaca[{i}].input")
            with_input += 1
        if "history" in rec:
            with_history += 1
            assert isinstance(rec["history"], list) and rec["history"]
            for j, turn in enumerate(rec["history"]):
                assert isinstance(turn, list) and len(turn) == 2, f"alpaca[{i}].history[{j}] must be [q, a]"
                for text in turn:
                    assert_text(text, f"alpaca[{i}].history[{j}]")
    assert with_history == 3, f"{with_history} records with history, expected 3"
    assert 1 <= with_input < 20
    assert any(CJK.search(r["instruction"]) for r in records)
    assert any(not CJK.search(r["instruction"]) for r in records)


def test_pretrain_text_files_are_one_paragraph_per_line():
    zh_lines = PT_ZH.read_text(encoding="utf-8").splitlines()
    en_lines = PT_EN.read_text(encoding="utf-8").splitlines()
    for path, lines in ((PT_ZH, zh_lines), (PT_EN, en_lines)):
        assert len(lines) >= 8, f"{path.name}: {len(lines)} paragraphs"
        for n, line in enumerate(lines, start=1):
            assert_text(line, f"{path.name}:{n}")
    zh_chars = sum(len(CJK.findall(line)) for line in zh_lines)
    en_words = sum(len(line.split()) for line in en_lines)
    assert 2000 <= zh_chars <= 3000, zh_chars
    assert 1200 <= en_words <= 1900, en_words
    assert not any(CJK.search(line) for line in en_lines)


def test_pretrain_mixed_jsonl_has_both_languages():
    rows = load_jsonl(PT_MIXED)
    assert len(rows) == 15
    for i, row in enumerate(rows, start=1):
        assert set(row) == {"text"}
        assert_text(row["text"], f"{PT_MIXED.name}:{i}")
    assert any(CJK.search(r["text"]) for r in rows)
    assert any(not CJK.search(r["text"]) for r in rows)


def test_reward_pairs_structure_and_counts():
    total = multi = systems = 0
    for path in (RW_ZH, RW_EN):
        file_systems = 0
        for i, row in enumerate(load_jsonl(path), start=1):
            where = f"{path.name}:{i}"
            assert set(row) == {"conversations", "chosen", "rejected"}, f"{where}: keys {sorted(row)}"
            humans, has_system = check_sharegpt(row["conversations"], where, last="human")
            assert_text(row["chosen"], f"{where}.chosen")
            assert_text(row["rejected"], f"{where}.rejected")
            assert row["chosen"] != row["rejected"], where
            total += 1
            multi += humans >= 2
            file_systems += has_system
        assert file_systems >= 1, f"{path.name}: no pair with a system message"
        systems += file_systems
    assert total >= 64
    assert multi >= 12
    assert systems >= 2


def test_reward_languages_match_file_names():
    for row in load_jsonl(RW_ZH):
        assert CJK.search(row["chosen"]) and CJK.search(row["rejected"])
    for row in load_jsonl(RW_EN):
        assert not CJK.search(row["chosen"] + row["rejected"])


def test_heldout_questions_are_new():
    rows = load_jsonl(HELDOUT)
    assert len(rows) == 8
    questions = []
    for i, row in enumerate(rows, start=1):
        assert set(row) == {"question"}
        assert_text(row["question"], f"{HELDOUT.name}:{i}")
        questions.append(row["question"])
    assert len(set(questions)) == 8
    assert sum(bool(CJK.search(q)) for q in questions) == 4
    # Compare against decoded strings, not raw file text, so JSON escapes cannot hide a copy.
    corpus = []
    for path in TRAINING_FILES:
        if path.suffix == ".txt":
            corpus.append(path.read_text(encoding="utf-8"))
        elif path.suffix == ".json":
            corpus.extend(strings(json.loads(path.read_text(encoding="utf-8"))))
        else:
            corpus.extend(strings(load_jsonl(path)))
    haystack = normalise("\n".join(corpus))
    for q in questions:
        assert normalise(q) not in haystack, f"held-out question appears in training data: {q}"


def test_readme_describes_every_file():
    text = README.read_text(encoding="utf-8")
    for path in TRAINING_FILES + [HELDOUT]:
        assert str(path.relative_to(DATA)) in text, f"README does not mention {path.relative_to(DATA)}"
    assert "Apache-2.0" in text
