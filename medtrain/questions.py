"""Questions with reference answers (GRPO's verifiable rewards): free-text, math and multiple-choice files.

Multiple-choice questions are read by the evaluation stage's reader (:func:`medtrain.benchmarks.parse_mc_record`,
:func:`medtrain.benchmarks.iter_csv_rows`), so a file GRPO trains on is a file the evaluator scores, with the same
``file:line: field`` errors. Layouts (a file may mix open and multiple-choice records):

- Open questions, JSON / JSON Lines ``{"question", "answer"}`` (MedicalGPT's GRPO sample), or a CSV with the
  columns ``Question,Answer``. A numeric answer (``46``) is read as text ``"46"``.
- Multiple choice, the evaluation stage's layouts (docs/evaluation.md): JSON / JSON Lines ``{"question",
  "options": [..] | {"A": .., ..}, "answer"}`` or the options as keys ``A``..``E``; the answer a letter or a 0-based
  option index; an optional ``context`` is shown before the question. CSV with the CMMLU header
  ``,Question,A,B,C,D,Answer`` (a leading index column is optional; names are case-insensitive).
- Every record may call its question ``prompt`` and may give ``system`` (a system turn) and ``answer_type``
  (choice/math/text; a record with options is always ``choice``).

Each record becomes ``{"messages": [user turn], "answer", "answer_type", "choices", "source"}``. A multiple-choice
question is shown as its context (if any), the question, then one ``X. option`` line per option; its answer is the
option letter. An open question's type is its ``answer_type``, else the ``default_answer_type`` (``--answer_type``),
and under ``auto`` ``math`` when the reference is a number or formula (``medtrain.rewards.looks_mathematical``), else
``text``.
"""

from __future__ import annotations

from .benchmarks import (
    LETTERS,
    field_name,
    is_multiple_choice,
    iter_csv_rows,
    parse_mc_record,
    question_key,
    subject_from_file,
)
from .errors import DataError
from .formats import LoadReport, Record, _string, iter_json_items
from .rewards import ANSWER_TYPES, looks_mathematical

QUESTION_EXTENSIONS = (".json", ".jsonl", ".csv")


def choice_prompt(question: str, options: list[str]) -> str:
    """The question, then ``A. first option`` ... one line per option."""
    return question.rstrip() + "\n" + "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def _answer_type(record: Record, default_answer_type: str) -> str:
    answer_type = record.data.get("answer_type") or default_answer_type
    if answer_type not in ANSWER_TYPES + ["auto"]:
        raise record.error(f"expected one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}", "answer_type")
    return answer_type


def parse_question(record: Record, default_answer_type: str = "auto") -> dict:
    """One record as ``{"messages", "answer", "answer_type", "choices"}`` (see the module docstring)."""
    data = record.data
    if not isinstance(data, dict):
        raise record.error(f"expected a JSON object, got {type(data).__name__}")
    if is_multiple_choice(data):
        # the evaluator's rules and errors; --answer_type is for open questions, a question with options is
        # always scored by the letter it names
        if _answer_type(record, "choice") not in ("choice", "auto"):
            raise record.error(f"a question with options is scored by its option letter: use choice (or leave "
                               f"answer_type out), got {data['answer_type']!r}", "answer_type")
        _, mc = parse_mc_record(record, subject_from_file(record.file))
        question = choice_prompt(mc.question, mc.choices)
        if mc.context:
            question = mc.context + "\n" + question
        choices = LETTERS[: len(mc.choices)]
        answer, answer_type = choices[mc.answer], "choice"
    else:
        key = question_key(record)
        if key not in data:
            raise record.error(f"no 'question' field (keys: {', '.join(sorted(data)) or 'none'}); expected "
                               '{"question", "answer"} or {"question", "options", "answer"} or a CSV '
                               "Question,A,B,C,D,Answer", "question")
        question = _string(record, data[key], field_name(record, key))
        if "answer" not in data or data["answer"] is None:
            raise record.error("missing the reference answer: GRPO's accuracy reward compares completions with it",
                               field_name(record, "answer"))
        raw = data["answer"]
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = str(raw)
        answer = _string(record, raw, field_name(record, "answer")).strip()
        answer_type = _answer_type(record, default_answer_type)
        if answer_type == "choice":
            raise record.error("answer_type choice needs options ('options' or A/B/C... fields)", "options")
        if answer_type == "auto":
            answer_type = "math" if looks_mathematical(answer) else "text"
        choices = ""
    messages = [{"role": "user", "content": question}]
    if data.get("system"):
        messages.insert(0, {"role": "system", "content": _string(record, data["system"], field_name(record, "system"))})
    return {"messages": messages, "answer": answer, "answer_type": answer_type, "choices": choices}


def load_questions(files: list[str], report: LoadReport | None = None, default_answer_type: str = "auto") -> list[dict]:
    """Load question files (``.json``/``.jsonl``/``.csv``). Bad records are collected in ``report`` (the stage's
    bad-record policy, :func:`medtrain.data.check_invalid_records`, decides); without one any problem raises."""
    collect = report if report is not None else LoadReport()
    out = []
    for path in files:
        collect.records.setdefault(path, 0)
        try:
            items = iter_csv_rows(path, options_required=False) if path.endswith(".csv") else iter_json_items(path)
            for item in items:
                collect.records[path] += 1
                if isinstance(item, DataError):  # a JSON line that does not parse, a CSV row of the wrong width
                    collect.problems.append(item)
                    continue
                try:
                    row = parse_question(item, default_answer_type)
                except DataError as err:
                    collect.problems.append(err)
                    continue
                row["source"] = item.where
                out.append(row)
        except DataError as err:
            collect.file_errors.append(err)
    if report is None:
        collect.raise_if_any()
    return out
