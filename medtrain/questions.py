"""Questions with reference answers (GRPO's verifiable rewards): free-text, math and multiple-choice files.

Supported layouts (one per file; each error names ``file:line: field``):

- JSON / JSON Lines ``{"question", "answer"}`` (MedicalGPT's GRPO sample); ``prompt`` may stand for ``question``;
  optional ``system`` and ``answer_type`` (choice/math/text). A numeric answer (``46``) is read as text ``"46"``.
- JSON / JSON Lines multiple choice: ``{"question", "options": [..] | {"A": .., ..}, "answer": "B"}``, or the
  options as top-level letter keys ``{"question", "A", "B", "C", "D", "answer"}``; the answer is a letter or a
  0-based option index (``1`` = B), as in the evaluation stage's layout.
- CSV with a header ``Question,A,B,C,D,Answer`` (CMMLU's layout; a leading index column is ignored; header names
  are matched case-insensitively).

Each record becomes ``{"messages": [user turn], "answer", "answer_type", "choices", "source"}``. A multiple-choice
question is shown as the question followed by one ``X. option`` line per option; its answer is the option letter.
Without an ``answer_type`` the type is ``choice`` when there are options, else ``math`` when the reference is a
number or formula (``medtrain.rewards.looks_mathematical``), else ``text``.
"""

from __future__ import annotations

import csv
import io
import string
from typing import Any

from .errors import DataError
from .formats import LoadReport, Record, _string, iter_json_records, read_text
from .rewards import ANSWER_TYPES, looks_mathematical

QUESTION_EXTENSIONS = (".json", ".jsonl", ".csv")
LETTERS = string.ascii_uppercase


def choice_prompt(question: str, options: list[str]) -> str:
    """The question, then ``A. first option`` ... one line per option."""
    return question.rstrip() + "\n" + "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def _options(record: Record) -> list[str] | None:
    """The options of a multiple-choice record in letter order, or None for an open question."""
    data = record.data
    if "options" in data:
        options = data["options"]
        if isinstance(options, dict):
            keys = [str(k).strip().upper() for k in options]
            if keys != list(LETTERS[: len(keys)]):
                raise record.error(f"option keys must be A, B, C, ... in order, got {list(options)}", "options")
            options = list(options.values())
        if not isinstance(options, list) or len(options) < 2:
            raise record.error("expected a list (or A/B/C... mapping) of at least 2 options", "options")
        return [_string(record, o, f"options[{i}]") for i, o in enumerate(options)]
    letters = [k for k in LETTERS if k in data]
    if len(letters) >= 2:
        if letters != list(LETTERS[: len(letters)]):
            raise record.error(f"option columns must be A, B, C, ... without gaps, got {', '.join(letters)}")
        return [_string(record, _cell(data[k]), k) for k in letters]
    return None


def _cell(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def parse_question(record: Record, default_answer_type: str = "auto") -> dict:
    """One record as ``{"messages", "answer", "answer_type", "choices"}`` (see the module docstring)."""
    data = record.data
    if not isinstance(data, dict):
        raise record.error(f"expected a JSON object, got {type(data).__name__}")
    key = "question" if "question" in data else "prompt" if "prompt" in data else None
    if key is None:
        raise record.error(f"no 'question' field (keys: {', '.join(sorted(data)) or 'none'}); expected "
                           '{"question", "answer"} or {"question", "options", "answer"} or a CSV '
                           "Question,A,B,C,D,Answer", "question")
    question = _string(record, data[key], key)
    if "answer" not in data or data["answer"] is None:
        raise record.error("missing the reference answer: GRPO's accuracy reward compares completions with it",
                           "answer")
    options = _options(record)
    raw = data["answer"]
    if options and isinstance(raw, int) and not isinstance(raw, bool):
        # a 0-based option index, as the evaluation stage's multiple-choice layout allows
        if not 0 <= raw < len(options):
            raise record.error(f"option index {raw} is out of range (0 to {len(options) - 1})", "answer")
        raw = LETTERS[raw]
    answer = _string(record, _cell(raw), "answer").strip()
    answer_type = data.get("answer_type") or default_answer_type
    if answer_type not in ANSWER_TYPES + ["auto"]:
        raise record.error(f"expected one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}", "answer_type")
    if answer_type == "auto":
        answer_type = "choice" if options else "math" if looks_mathematical(answer) else "text"
    choices = ""
    if answer_type == "choice":
        if not options:
            raise record.error("answer_type choice needs options ('options' or A/B/C... fields)", "options")
        choices = LETTERS[: len(options)]
        answer = answer.upper()
        if answer not in choices:
            raise record.error(f"expected the letter of an option ({', '.join(choices)}), got {data['answer']!r}",
                               "answer")
        question = choice_prompt(question, options)
    messages = [{"role": "user", "content": question}]
    if data.get("system"):
        messages.insert(0, {"role": "system", "content": _string(record, data["system"], "system")})
    return {"messages": messages, "answer": answer, "answer_type": answer_type, "choices": choices}


def iter_csv_records(path: str) -> list[Record]:
    """Rows of a CSV file with a header as records (keys: ``question``, ``answer``, option letters), with lines."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("file is empty", file=path) from None
    names = []
    for name in header:
        clean = name.strip()
        names.append(clean.upper() if len(clean) == 1 and clean.upper() in LETTERS else clean.lower())
    missing = [n for n in ("question", "answer") if n not in names]
    if missing:
        raise DataError(f"CSV header {header} lacks {', '.join(missing)}: expected Question,A,B,C,D,Answer "
                        "(CMMLU layout)", file=path, line=1)
    records = []
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise DataError(f"expected {len(names)} columns as in the header, got {len(row)}", file=path, line=start)
        records.append(Record({k: v for k, v in zip(names, row) if k}, path, start))
    return records


def load_questions(files: list[str], report: LoadReport | None = None, default_answer_type: str = "auto") -> list[dict]:
    """Load question files (``.json``/``.jsonl``/``.csv``). Bad records are collected in ``report`` (the stage's
    bad-record policy, :func:`medtrain.data.check_invalid_records`, decides); without one any problem raises."""
    collect = report if report is not None else LoadReport()
    out = []
    for path in files:
        collect.records.setdefault(path, 0)
        try:
            records = iter_csv_records(path) if path.endswith(".csv") else iter_json_records(path)
            for record in records:
                collect.records[path] += 1
                try:
                    item = parse_question(record, default_answer_type)
                except DataError as err:
                    collect.problems.append(err)
                    continue
                item["source"] = record.where
                out.append(item)
        except DataError as err:
            collect.file_errors.append(err)
    if report is None:
        collect.raise_if_any()
    return out
