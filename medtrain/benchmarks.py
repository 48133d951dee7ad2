"""Benchmark files -> validated questions -> lm-eval task configs that read local files.

A benchmark directory (``--benchmark_dir``) holds any mix of three layouts; files in a ``dev/`` folder are worked
examples for k-shot prompts, every other file holds test questions:

- CMMLU-style CSV (``*.csv``, one file per subject): header ``,Question,A,B,C,D,Answer`` (the first, unnamed column
  is an index and optional; names are case-insensitive, so C-Eval/CMB exports ``id,question,A,B,C,D,answer`` read
  too; options A..E, at least two, without gaps). The subject is the file name without ``.csv`` (and without a
  C-Eval ``_test``/``_dev``/``_val`` suffix).
- Generic multiple choice (``*.jsonl`` or a ``*.json`` array): one object per question with ``question`` (or
  ``prompt``); the options as ``options`` (a list, or a mapping ``{"A": .., "B": ..}``) or keys ``A``..``E`` (2 to 5
  texts; JSON numbers are read as text); ``answer`` a letter (``"B"``) or a 0-based index (``1``); optional
  ``subject`` (default: the file name), ``context`` (text shown before the question) and ``id``.
- PubMedQA PQA-L (``*.json``, a dict PMID -> ``{"QUESTION", "CONTEXTS", "final_decision"}``). A ground-truth file
  (dict PMID -> "yes"/"no"/"maybe", e.g. ``pubmedqa_test_ground_truth.json``) beside it selects the test PMIDs
  (kept in the PQA-L file's order); the other PMIDs become the dev pool for k-shot. Without one, every PMID is a
  test question.

The multiple-choice reader (:func:`iter_csv_rows`, :func:`parse_mc_record`) is also GRPO's
(:mod:`medtrain.questions`): a file trains GRPO exactly as it is scored here, with the same errors.
Everything is checked before anything is written: the first bad record stops the run with ``file:line: field:``.
:func:`write_tasks` then writes the normalised questions as JSON Lines and one lm-eval task YAML per subject
(``dataset_path: json`` + ``data_files``), so ``lm_eval --include_path OUT/tasks`` re-runs the exact same questions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import ConfigError, DataError
from .formats import _DECODER, Record, iter_json_records, read_text  # _DECODER: duplicated keys are an error

LETTERS = "ABCDE"
PUBMEDQA_LABELS = ["yes", "no", "maybe"]
TASK_PREFIX = "medtrain_"  # lm-eval ships its own cmmlu_* / pubmedqa tasks: never shadow or clash with them
DEV_FOLDER = "dev"
BENCHMARK_EXTENSIONS = (".csv", ".jsonl", ".json")

# CMMLU's own prompt names the subject in Chinese; these are our translations of the subject file names.
SUBJECTS_ZH = {
    "anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medicine": "大学医学",
    "professional_medicine": "专业医学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
    "nutrition": "营养学", "genetics": "遗传学", "medical_genetics": "医学遗传学", "human_sexuality": "人类性行为",
    "college_biology": "大学生物学", "high_school_biology": "高中生物", "food_science": "食品科学",
    "sports_science": "体育学",
}
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass
class Question:
    """One benchmark question in the normalised form every layout is turned into."""

    question: str
    choices: list[str]
    answer: int  # index into choices
    source: str  # file:line it came from
    context: str = ""
    id: str = ""

    def to_json(self, letters: bool) -> dict:
        return {
            "id": self.id or self.source, "source": self.source, "question": self.question, "context": self.context,
            "choices": self.choices, "letters": list(LETTERS[: len(self.choices)]) if letters else self.choices,
            "answer": self.answer,
        }


@dataclass
class Subject:
    """The test (and optional dev) questions of one subject, and how its prompt is written."""

    name: str
    kind: str  # "mc" (lettered options) or "pubmedqa" (yes/no/maybe words)
    test: list[Question] = field(default_factory=list)
    dev: list[Question] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    dev_files: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return TASK_PREFIX + re.sub(r"\W+", "_", self.name).strip("_").lower()

    @property
    def chinese(self) -> bool:
        return any(_CJK.search(q.question) for q in self.test[:50])


# --------------------------------------------------------------------------------------------------------------
# Readers: multiple choice (shared with GRPO) and PubMedQA; read_* return {subject name: [Question]} per file


def subject_from_file(path: str) -> str:
    """A file's default subject: its name without the extension and a C-Eval ``_test``/``_dev``/``_val`` suffix."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"_(test|dev|val)$", "", stem)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


@dataclass
class CsvRow(Record):
    """One data row of a CSV file. ``data`` maps each named column to its cell, keyed ``question``, ``answer``,
    ``A``..``E`` and the other names in lower case; ``columns`` maps those keys back to the header's own spelling,
    so an error names the column as the file does (``Answer``)."""

    columns: dict[str, str] = field(default_factory=dict)

    def column(self, key: str) -> str:
        return self.columns.get(key, key)


def field_name(record: Record, key: str) -> str:
    """How an error names field ``key``: the CSV column as the header spells it, else the JSON key."""
    return record.column(key) if isinstance(record, CsvRow) else key


def iter_csv_rows(path: str, options_required: bool = True) -> Iterator[CsvRow | DataError]:
    """The rows of a CMMLU-layout CSV (header ``,Question,A,B,C,D,Answer``; quoted fields may span lines), each
    with the line it starts on; blank rows are skipped.

    Whole-file problems (empty, not UTF-8, a bad header, malformed quoting, a header without rows) are raised; a
    row whose field count differs from the header's is yielded as a DataError, so a caller that collects bad
    records reads on. The option columns must be ``A``, ``B``, ... without gaps; with ``options_required`` off a
    header with none at all is accepted too (GRPO's open ``Question,Answer`` questions).
    """
    text = read_text(path)
    if not text.strip():
        raise DataError("file is empty (a CMMLU-layout CSV needs the header ,Question,A,B,C,D,Answer)", file=path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        raw_header = next(reader)
        keys, columns = [], {}
        for name in raw_header:
            key = name.strip().lower()
            key = key.upper() if len(key) == 1 and key.upper() in LETTERS else key
            if key and key in columns:
                raise DataError(f"column {name.strip()!r} appears twice (found {','.join(raw_header)})", file=path,
                                line=1, field="header")
            keys.append(key)
            if key:
                columns[key] = name.strip()
        for required in ("question", "answer"):
            if required not in columns:
                raise DataError(f"missing column {required.capitalize()!r} (the CMMLU layout is "
                                f",Question,A,B,C,D,Answer; found {','.join(raw_header)})", file=path, line=1,
                                field="header")
        letters = [letter for letter in LETTERS if letter in columns]
        if letters != list(LETTERS[: len(letters)]):
            raise DataError(f"option columns must be A, B, C, ... without gaps, found {','.join(raw_header)}",
                            file=path, line=1, field="header")
        if len(letters) < 2 and (options_required or letters):
            raise DataError(f"missing option columns: need A, B (and C, D, E as the benchmark has), found "
                            f"{','.join(raw_header)}", file=path, line=1, field="header")
        rows = 0
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            rows += 1
            if len(row) != len(keys):
                yield DataError(f"{len(row)} fields, the header has {len(keys)} (an unquoted comma or quote in a "
                                "field?)", file=path, line=line)
                continue
            yield CsvRow({key: cell for key, cell in zip(keys, row) if key}, path, line, columns)
    except csv.Error as err:
        raise DataError(f"malformed CSV ({err})", file=path, line=reader.line_num) from None
    if not rows:
        raise DataError("no questions: the file has a header but no rows", file=path)


def read_csv(path: str) -> dict[str, list[Question]]:
    """A CMMLU-layout CSV (one subject, named after the file); the first bad row stops with its file:line."""
    subject = subject_from_file(path)
    questions = []
    for row in iter_csv_rows(path):
        if isinstance(row, DataError):
            raise row
        questions.append(parse_mc_record(row, subject)[1])
    return {subject: questions}


def is_multiple_choice(data: Any) -> bool:
    """Whether a record has options (``options``, or any of the keys/columns ``A``..``E``): it is then read by
    :func:`parse_mc_record`, and everything that looks like options but is not valid is an error, not text."""
    return isinstance(data, dict) and ("options" in data or any(letter in data for letter in LETTERS))


def _option_text(value: Any) -> Any:
    # JSON numbers are option texts too ({"A": 5, "B": 10} for a dose question); booleans are not
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def question_key(record: Record) -> str:
    """``question``, or ``prompt`` where a record calls it that (not both)."""
    data = record.data
    if "question" in data and "prompt" in data:
        raise record.error("give the question text once, as 'question' or as 'prompt'", field="prompt")
    return "prompt" if "prompt" in data else "question"


def parse_mc_record(record: Record, default_subject: str) -> tuple[str, Question]:
    """One multiple-choice record (a JSON object or a :class:`CsvRow`) -> (subject, :class:`Question`).

    The one reader of multiple-choice questions: the evaluation stage and GRPO (:mod:`medtrain.questions`) both
    use it, so they accept the same files and name the same ``file:line: field`` in their errors. A CSV row takes
    its subject from the file (``default_subject``) and its answer as a letter only; a JSON object may also give
    ``subject``, ``context``, ``id`` and a 0-based answer index.
    """
    data = record.data
    if not isinstance(data, dict):
        raise record.error(f"expected a JSON object per question, got {type(data).__name__}")
    from_csv = isinstance(record, CsvRow)
    key = "question" if from_csv else question_key(record)
    question = data.get(key)
    if not isinstance(question, str) or not question.strip():
        if from_csv:
            raise record.error("empty question", field=field_name(record, key))
        raise record.error("missing or empty (the generic layout needs question, options or A..E, answer)", field=key)
    # options: a list, an A/B/C... mapping, or the keys (CSV columns) A..E themselves
    keyed = [letter for letter in LETTERS if letter in data]
    if "options" in data and not from_csv:
        if keyed:
            raise record.error(f"give the options once, as 'options' or as keys A..E (found both, and {keyed[0]!r})",
                               field="options")
        options = data["options"]
        if isinstance(options, dict):
            names = [str(k).strip().upper() for k in options]
            if names != list(LETTERS[: len(names)]):
                raise record.error(f"as a mapping, the option keys must be A, B, C, ... in order, got "
                                   f"{', '.join(map(str, options))}", field="options")
            options = list(options.values())
        if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
            raise record.error(f"must be a list of 2 to {len(LETTERS)} option texts (or a mapping A, B, ... -> "
                               "text)", field="options")
        letters = LETTERS[: len(options)]
    else:
        letters = "".join(keyed)
        if not from_csv and letters != LETTERS[: len(letters)]:
            raise record.error(f"option keys must be A, B, C, ... without gaps, got {', '.join(letters)}",
                               field="options")
        if len(letters) < 2:
            raise record.error("no options: give 'options' (a list) or keys A, B, ... (at least two)", field="options")
        options = [data[letter] for letter in letters]
    options = [_option_text(option) for option in options]
    for letter, option in zip(letters, options):
        if not isinstance(option, str) or not option.strip():
            if from_csv:
                raise record.error(f"option {letter} is empty", field=field_name(record, letter))
            raise record.error("option text must be a non-empty string", field=f"options[{letter}]")
    # the answer: a letter (any case), or in JSON a 0-based index
    answer = data.get("answer")
    if from_csv:
        letter = answer.strip().upper()
        if not letter or letter not in letters:  # '' is in every string
            raise record.error(f"answer {letter or '(empty)'!r} is not one of the options {', '.join(letters)}",
                               field=field_name(record, "answer"))
        index = letters.index(letter)
    elif answer is None:
        raise record.error(f"missing: the letter of the right option ({', '.join(letters)}) or its 0-based index",
                           field="answer")
    elif isinstance(answer, str) and answer.strip().upper() in letters and answer.strip():
        index = letters.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        index = answer
    else:
        raise record.error(f"{answer!r} is not one of the options {', '.join(letters)} (a letter, or a 0-based "
                           f"index below {len(options)})", field="answer")
    if from_csv:  # a CSV file is one subject; its ids are file:line (extra columns are not read)
        return default_subject, Question(question.strip(), [o.strip() for o in options], index, record.where)
    subject = data.get("subject", default_subject)
    if not isinstance(subject, str) or not subject.strip():
        raise record.error("must be a non-empty string", field="subject")
    context = data.get("context", "")
    if not isinstance(context, str):
        raise record.error("must be a string", field="context")
    ident = data.get("id", "")
    return subject.strip(), Question(question.strip(), [o.strip() for o in options], index, record.where,
                                     context.strip(), str(ident))


def read_mc_jsonl(path: str, records: list[Record] | None = None) -> dict[str, list[Question]]:
    """The generic multiple-choice layout (JSON Lines, or a JSON array of the same objects)."""
    by_subject: dict[str, list[Question]] = {}
    for record in records if records is not None else iter_json_records(path):
        subject, question = parse_mc_record(record, subject_from_file(path))
        by_subject.setdefault(subject, []).append(question)
    if not by_subject:
        raise DataError("no questions in the file", file=path)
    return by_subject


def _pubmedqa_question(path: str, text: str, pmid: str, item: Any, label: str | None = None) -> Question:
    line = _line_of(text, max(text.find(f'"{pmid}"'), 0))
    if not isinstance(item, dict):
        raise DataError("expected an object with QUESTION, CONTEXTS, final_decision", file=path, line=line, field=pmid)
    question, contexts, decision = item.get("QUESTION"), item.get("CONTEXTS"), item.get("final_decision")
    if not isinstance(question, str) or not question.strip():
        raise DataError("missing or empty", file=path, line=line, field=f"{pmid}.QUESTION")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise DataError("must be a list of strings", file=path, line=line, field=f"{pmid}.CONTEXTS")
    if decision not in PUBMEDQA_LABELS:
        raise DataError(f"{decision!r} is not one of yes, no, maybe", file=path, line=line,
                        field=f"{pmid}.final_decision")
    if label is not None and label != decision:
        raise DataError(f"the ground-truth file says {label!r}, final_decision says {decision!r}", file=path,
                        line=line, field=f"{pmid}.final_decision")
    return Question(question.strip(), list(PUBMEDQA_LABELS), PUBMEDQA_LABELS.index(decision), f"{path}:{line}",
                    " ".join(c.strip() for c in contexts), pmid)


def _load_json_object(path: str) -> tuple[str, Any]:
    text = read_text(path)
    if not text.strip():
        raise DataError("file is empty", file=path)
    try:
        return text, _DECODER.decode(text)
    except ValueError as err:
        raise DataError(f"invalid JSON ({str(err).split(': line')[0]})", file=path,
                        line=getattr(err, "lineno", None)) from None


def _is_ground_truth(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(v in PUBMEDQA_LABELS for v in data.values())


def _is_pqal(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "QUESTION" in v for v in data.values())


# --------------------------------------------------------------------------------------------------------------
# A whole benchmark directory


def find_benchmark_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ConfigError(f"--benchmark_dir {directory}: no such directory")
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files)
                     if f.endswith(BENCHMARK_EXTENSIONS) and not f.startswith("."))
    if not found:
        raise DataError("no benchmark files (*.csv CMMLU layout, *.jsonl multiple choice, *.json PubMedQA) found",
                        file=directory)
    return found


def _is_dev(path: str, directory: str) -> bool:
    parts = os.path.relpath(path, directory).split(os.sep)[:-1]
    return DEV_FOLDER in parts


def load_benchmark(directory: str) -> list[Subject]:
    """Read and check every benchmark file under ``directory``; subjects in name order."""
    subjects: dict[str, Subject] = {}

    def add(name: str, kind: str, questions: list[Question], path: str, dev: bool) -> None:
        subject = subjects.setdefault(name, Subject(name, kind))
        if subject.kind != kind:
            raise DataError(f"subject {name!r} also comes from {(subject.test_files + subject.dev_files)[0]} in "
                            "another layout: rename one", file=path)
        for q in questions:  # ids relative to the benchmark dir, so results do not depend on where it lives
            q.id = q.id or f"{os.path.relpath(q.source.rsplit(':', 1)[0], directory)}:{q.source.rsplit(':', 1)[1]}"
        files = subject.dev_files if dev else subject.test_files
        if not dev and subject.test_files and path not in subject.test_files:
            raise DataError(f"subject {name!r} already has test questions from {subject.test_files[0]}: give one "
                            "of them another subject name", file=path)
        (subject.dev if dev else subject.test).extend(questions)
        if path not in files:
            files.append(path)

    files = find_benchmark_files(directory)
    json_files = {}
    for path in files:
        dev = _is_dev(path, directory)
        if path.endswith(".csv"):
            for name, questions in read_csv(path).items():
                add(name, "mc", questions, path, dev)
        elif path.endswith(".jsonl"):
            for name, questions in read_mc_jsonl(path).items():
                add(name, "mc", questions, path, dev)
        else:
            text, data = _load_json_object(path)
            if isinstance(data, list):
                records = []
                for record in iter_json_records(path):
                    records.append(record)
                for name, questions in read_mc_jsonl(path, records).items():
                    add(name, "mc", questions, path, dev)
            elif _is_pqal(data) or _is_ground_truth(data):
                json_files[path] = (text, data)
            else:
                raise DataError("unknown layout: expected a PubMedQA PQA-L dict (PMID -> {QUESTION, CONTEXTS, "
                                "final_decision}), a PubMedQA ground-truth dict (PMID -> yes/no/maybe) or a JSON "
                                "array of multiple-choice questions", file=path)
    # PubMedQA: ground-truth files select the test PMIDs of the PQA-L files in the same folder
    for path, (text, data) in json_files.items():
        if not _is_pqal(data):
            continue
        folder = os.path.dirname(path)
        truths = {p: d for p, (t, d) in json_files.items() if os.path.dirname(p) == folder and _is_ground_truth(d)}
        name = "pubmedqa"
        if truths:
            labels: dict[str, str] = {}
            for truth in truths.values():
                labels.update(truth)
            truth_path = next(iter(truths))
            missing = [pmid for pmid in labels if pmid not in data]
            if missing:
                raise DataError(f"PMID {missing[0]} (and {len(missing) - 1} more) not in {path}", file=truth_path,
                                line=_line_of(json_files[truth_path][0], json_files[truth_path][0].find(missing[0])))
            # PQA-L file order, not the ground-truth file's: the published one is sorted by label (276 yes, then
            # the no, then the maybe), so --limit N would score N "yes" questions
            test = [_pubmedqa_question(path, text, pmid, item, labels[pmid]) for pmid, item in data.items()
                    if pmid in labels]
            dev = [_pubmedqa_question(path, text, pmid, item) for pmid, item in data.items() if pmid not in labels]
            add(name, "pubmedqa", test, path, False)
            if dev:
                add(name, "pubmedqa", dev, path, True)
        else:
            questions = [_pubmedqa_question(path, text, pmid, item) for pmid, item in data.items()]
            add(name, "pubmedqa", questions, path, _is_dev(path, directory))
    lonely_truth = [p for p, (t, d) in json_files.items() if _is_ground_truth(d)
                    and not any(_is_pqal(d2) and os.path.dirname(p2) == os.path.dirname(p)
                                for p2, (t2, d2) in json_files.items())]
    if lonely_truth:
        raise DataError("a PubMedQA ground-truth file needs the PQA-L file (pubmedqa_pqal_1k.json) in the same "
                        "folder", file=lonely_truth[0])
    for subject in subjects.values():
        if not subject.test:
            raise DataError(f"subject {subject.name!r} has dev questions but no test file", file=subject.dev_files[0])
    tasks: dict[str, str] = {}
    for subject in subjects.values():
        if subject.task in tasks:
            raise DataError(f"subjects {tasks[subject.task]!r} and {subject.name!r} map to the same task name "
                            f"{subject.task}: rename one", file=subject.test_files[0])
        tasks[subject.task] = subject.name
    return [subjects[name] for name in sorted(subjects)]


def load_benchmarks(directories: str) -> list[Subject]:
    """``--benchmark_dir``: one folder, or several separated by commas (a subject name may occur in only one)."""
    subjects: dict[str, Subject] = {}
    for directory in [d.strip() for d in directories.split(",") if d.strip()]:
        for subject in load_benchmark(directory):
            if subject.task in subjects:
                other = subjects[subject.task].test_files[0]
                raise DataError(f"subject {subject.name!r} is also in {other}: a subject may come from one benchmark "
                                "dir only", file=subject.test_files[0])
            subjects[subject.task] = subject
    if not subjects:
        raise ConfigError("--benchmark_dir is empty")
    return sorted(subjects.values(), key=lambda s: s.name)


def select_subjects(subjects: list[Subject], tasks: str | None) -> list[Subject]:
    """``--tasks``: comma-separated subject or task names (shell-style wildcards allowed); None = all."""
    if not tasks:
        return subjects
    from fnmatch import fnmatchcase

    chosen, unknown = [], []
    for pattern in [t.strip() for t in tasks.split(",") if t.strip()]:
        hits = [s for s in subjects if fnmatchcase(s.name, pattern) or fnmatchcase(s.task, pattern)]
        if not hits:
            unknown.append(pattern)
        chosen.extend(s for s in hits if s not in chosen)
    if unknown:
        raise ConfigError(f"--tasks: no subject matches {', '.join(unknown)}; the benchmark dir has "
                          f"{', '.join(s.name for s in subjects)}")
    return chosen


def check_fewshot(subjects: list[Subject], num_fewshot: int) -> None:
    """Every subject needs ``num_fewshot`` worked examples in its dev split."""
    if num_fewshot <= 0:
        return
    for subject in subjects:
        if len(subject.dev) < num_fewshot:
            where = subject.dev[-1].source.rsplit(":", 1) if subject.dev else (subject.test_files[0], None)
            raise DataError(
                f"subject {subject.name!r} has {len(subject.dev)} dev question(s), --num_fewshot {num_fewshot} "
                f"needs {num_fewshot}: add worked examples under {DEV_FOLDER}/ (or lower --num_fewshot)",
                file=where[0], line=int(where[1]) if where[1] else None,
            )


# --------------------------------------------------------------------------------------------------------------
# lm-eval task configs


def _mc_prompt(subject: Subject) -> tuple[str, str]:
    """(description, doc_to_text) of a lettered multiple-choice subject: CMMLU's prompt in Chinese, else MMLU's."""
    options = "{% for c in choices %}{{ letters[loop.index0] }}. {{ c }}\n{% endfor %}"
    context = "{% if context %}{{ context }}\n{% endif %}"
    if subject.chinese:
        zh = SUBJECTS_ZH.get(subject.name)
        topic = f"关于{zh}的" if zh else ""
        description = f"以下是{topic}单项选择题，请直接给出正确答案的选项。\n\n"
        return description, context + "{{ question }}\n" + options + "答案："
    topic = subject.name.replace("_", " ")
    return (f"The following are multiple choice questions (with answers) about {topic}.\n\n",
            context + "{{ question }}\n" + options + "Answer:")


def task_config(subject: Subject, data_files: dict[str, str]) -> dict:
    """The lm-eval task YAML (as a dict) of one subject; ``data_files`` maps split -> absolute JSONL path."""
    config: dict[str, Any] = {
        "task": subject.task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "subject": subject.name},
    }
    if "dev" in data_files:
        # the first k dev questions, in file order, for every test question (CMMLU's and MMLU's k-shot rule)
        config.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"})
    if subject.kind == "pubmedqa":
        # lm-eval's own pubmedqa prompt; the choices are the words yes/no/maybe
        config.update(doc_to_text="Abstract: {{ context }}\nQuestion: {{ question }}\nAnswer:", doc_to_choice="choices")
    else:
        description, text = _mc_prompt(subject)
        config.update(description=description, doc_to_text=text, doc_to_choice="letters")
    return config


def write_tasks(subjects: list[Subject], output_dir: str) -> dict[str, str]:
    """Write ``output_dir/data/<task>.<split>.jsonl`` and ``output_dir/tasks/<task>.yaml``; returns task -> yaml."""
    import yaml

    data_dir, task_dir = os.path.join(output_dir, "data"), os.path.join(output_dir, "tasks")
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(task_dir, exist_ok=True)
    written = {}
    for subject in subjects:
        data_files = {}
        for split, questions in (("test", subject.test), ("dev", subject.dev)):
            if not questions:
                continue
            path = os.path.abspath(os.path.join(data_dir, f"{subject.task}.{split}.jsonl"))
            with open(path, "w", encoding="utf-8") as fh:
                for q in questions:
                    fh.write(json.dumps(q.to_json(letters=subject.kind == "mc"), ensure_ascii=False) + "\n")
            data_files[split] = path
        yaml_path = os.path.join(task_dir, f"{subject.task}.yaml")
        with open(yaml_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(task_config(subject, data_files), fh, allow_unicode=True, sort_keys=False, width=1000)
        written[subject.task] = yaml_path
    return written
