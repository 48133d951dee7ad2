"""Convert alpaca and question/answer datasets to ShareGPT JSON Lines, the format the SFT stage reads.

    python convert_dataset.py --in_file data/alpaca/medical_alpaca_zh_en.json --out_file data/converted.jsonl
    python convert_dataset.py --in_file qa.csv --out_file qa.jsonl --data_type qa --skip_invalid

Input records (a JSON array, JSON Lines, or CSV/TSV with a header row):
  alpaca  {"instruction", "input"?, "output", "history"?: [[question, answer], ...], "system"?}
  qa      {"question", "answer"}, {"query", "response"} or {"prompt", "response"}, plus "system"?/"history"?
Output, one record per line:
  {"conversations": [{"from": "system", ...}?, {"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
History pairs come first, as human/gpt turns. A non-blank alpaca "input" is appended to the instruction after
a newline, exactly as the SFT stage does when it reads alpaca itself. A null optional field counts as absent,
and so does an empty CSV/TSV cell (whose `history` cell holds JSON text); other keys are ignored.

Errors name the place as ``file:line: field: problem``, the line being where the record starts: its JSON Lines
line, the CSV/TSV line of the row's first character, or, in a JSON array, the line of the element's opening
brace. A bad record stops the run (exit 2) unless ``--skip_invalid`` is given: then it is left out, counted and
listed in a report file. A file that cannot be read as a whole (not UTF-8, a broken JSON array, an unclosed
CSV quote) always stops the run. The output goes to a temporary file renamed at the end, so a failed run
writes nothing, and an existing output file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError, DataError
from medtrain.formats import Record, iter_json_records, read_text

FORMATS_BY_SUFFIX = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
# Question/answer key spellings in priority order: {question, answer}, {query, response}, {prompt, response}.
QA_PROMPT_KEYS = ("question", "query", "prompt")
QA_ANSWER_KEYS = ("answer", "response")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in_file", required=True, help="input dataset (.json, .jsonl, .csv, .tsv)")
    parser.add_argument("--out_file", required=True, help="output ShareGPT JSON Lines file")
    parser.add_argument(
        "--in_format",
        choices=("json", "jsonl", "csv", "tsv"),
        help="input format; default: from the file extension. json is a JSON array, or JSON Lines when the "
        "file does not start with '['",
    )
    parser.add_argument(
        "--data_type",
        choices=("auto", "alpaca", "qa"),
        default="auto",
        help="record layout; auto decides per record: alpaca if it has 'instruction', else qa (default: auto)",
    )
    parser.add_argument(
        "--skip_invalid",
        action="store_true",
        help="leave bad records out instead of stopping; they are counted and listed in --report_file",
    )
    parser.add_argument(
        "--report_file", help="where --skip_invalid lists the records left out (default: <out_file>.skipped.txt)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out_file if it exists")
    return parser.parse_args(argv)


# --- reading ----------------------------------------------------------------------------------------------
# Each reader yields a Record per record, or a DataError for one that does not parse, so --skip_invalid can
# skip it and go on. Errors that leave the rest of the file unreadable are raised instead.


def read_json_lines(text: str, name: str) -> Iterator[Record | DataError]:
    """One record per non-blank line."""
    # split("\n"), not splitlines(): that also splits at U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield Record(json.loads(line), name, number)
        except json.JSONDecodeError as err:
            yield DataError(f"invalid JSON ({err.msg} at column {err.colno})", name, number)


def read_table(text: str, name: str, delimiter: str) -> Iterator[Record | DataError]:
    """Rows of a CSV/TSV file with a header row, as dicts of strings, each with the line it starts on."""
    # csv.reader, not DictReader: DictReader hides blank lines (so line numbers) and pads short rows.
    # strict: an unclosed quote is an error instead of swallowing the rest of the file into one cell.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1  # the line the next row starts on; a quoted cell may span several lines
    try:
        header = next(reader)
        if len(set(header)) != len(header):
            raise DataError(f"duplicate column names in the header: {', '.join(header)}", name, 1)
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) == len(header):
                    yield Record(dict(zip(header, row, strict=True)), name, start)
                else:
                    yield DataError(f"expected {len(header)} columns like the header, got {len(row)}", name, start)
            start = reader.line_num + 1
    except csv.Error as err:  # e.g. a quote left open: the rest of the file cannot be split into rows
        raise DataError(f"invalid {'CSV' if delimiter == ',' else 'TSV'} ({err})", name, start) from None


def read_records(path: Path, name: str, in_format: str | None) -> tuple[str, Iterator[Record | DataError]]:
    """The input format (the one given, else told by the extension) and the file's records."""
    in_format = in_format or FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if in_format is None:
        raise ConfigError(
            f"cannot tell the format of {name} from its extension (known: {', '.join(FORMATS_BY_SUFFIX)}); "
            "pass --in_format json|jsonl|csv|tsv"
        )
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "not a file", name)
    text = read_text(name)  # the SFT stage's reader: UTF-8 or BOM, else an error with line and byte offset
    if not text.strip():
        raise DataError("empty file, no records", name)
    if in_format in ("csv", "tsv"):
        return in_format, read_table(text, name, "," if in_format == "csv" else "\t")
    if in_format == "json" and text.lstrip().startswith("["):
        # The SFT stage's array reader: each element keeps the line of its first character; a syntax error
        # stops the run even with --skip_invalid, since the rest of the array cannot be resynchronised.
        return in_format, iter_json_records(name)
    # Many ".json" datasets are JSON Lines in fact (datasets.load_dataset("json") reads both).
    return in_format, read_json_lines(text, name)


# --- converting -------------------------------------------------------------------------------------------


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages."""
    if value is None:
        return "null"
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def get_text(record: Record, key: str, required: bool) -> str:
    """``record.data[key]`` as a string; "" for an absent optional field (null counts as absent)."""
    if key not in record.data:
        if required:
            raise record.error("missing", key)
        return ""
    value = record.data[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type_name(value)}", key)
    if required and not value.strip():
        raise record.error("empty", key)
    return value


def get_history(record: Record, from_table: bool) -> list[tuple[str, str]]:
    """The earlier turns, ``[[question, answer], ...]``; a CSV/TSV cell holds them as JSON text."""
    value = record.data.get("history")
    if from_table and isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise record.error(f"the cell is not JSON ({err.msg} at column {err.colno})", "history") from None
    if value is None or value == "" or value == []:
        return []
    if not isinstance(value, list):
        raise record.error(f"expected a list of [question, answer] pairs, got {type_name(value)}", "history")
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {len(pair)}" if isinstance(pair, list) else type_name(pair)
            raise record.error(f"expected a [question, answer] pair, got {got}", f"history[{i}]")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise record.error(f"expected a string, got {type_name(text)}", f"history[{i}][{j}]")
            if not text.strip():
                raise record.error("empty", f"history[{i}][{j}]")
        pairs.append((pair[0], pair[1]))
    return pairs


def record_type(record: Record, data_type: str) -> str:
    """``alpaca`` or ``qa``: the flag's choice, or told by the record's keys for ``auto``."""
    if data_type != "auto":
        return data_type
    if "instruction" in record.data:
        return "alpaca"
    if any(key in record.data for key in QA_PROMPT_KEYS):
        return "qa"
    if "conversations" in record.data:
        raise record.error("already ShareGPT ('conversations'); the SFT stage reads it as it is")
    keys = ", ".join(sorted(record.data)) or "none"
    raise record.error(
        f"cannot tell the record type from its keys ({keys}): expected alpaca (instruction, input, output) "
        "or qa (question/answer, query/response, prompt/response)"
    )


def prompt_and_answer(record: Record, kind: str) -> tuple[str, str]:
    """The current human turn and the gpt answer of an alpaca or qa record."""
    if kind == "alpaca":
        # Same rule as the SFT stage's alpaca reader (medtrain.formats), so converting first changes nothing.
        instruction = get_text(record, "instruction", required=True)
        extra = get_text(record, "input", required=False)
        prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
        return prompt, get_text(record, "output", required=True)
    prompt_key = next((key for key in QA_PROMPT_KEYS if key in record.data), None)
    answer_key = next((key for key in QA_ANSWER_KEYS if key in record.data), None)
    if prompt_key is None:
        raise record.error(f"missing (expected one of {', '.join(QA_PROMPT_KEYS)})", "question")
    if answer_key is None:
        raise record.error(f"missing (expected one of {', '.join(QA_ANSWER_KEYS)})", "answer")
    return get_text(record, prompt_key, required=True), get_text(record, answer_key, required=True)


def to_sharegpt(record: Record, data_type: str, from_table: bool) -> tuple[str, dict[str, list[dict[str, str]]]]:
    """The record's type (alpaca or qa) and its ShareGPT form; a bad record raises a :class:`DataError`."""
    if not isinstance(record.data, dict):
        raise record.error(f"expected a JSON object, got {type_name(record.data)}")
    kind = record_type(record, data_type)
    # Read the fields in the order they appear in the output, so the first problem reported is the first one.
    system = get_text(record, "system", required=False)
    history = get_history(record, from_table)
    prompt, answer = prompt_and_answer(record, kind)
    turns = [{"from": "system", "value": system}] if system.strip() else []
    for question, reply in [*history, (prompt, answer)]:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
    return kind, {"conversations": turns}


# --- writing ----------------------------------------------------------------------------------------------


def to_json_line(record: dict) -> str:
    """``record`` as one line of JSON, non-ASCII text kept readable."""
    text = json.dumps(record, ensure_ascii=False)
    # json leaves these three raw, but str.splitlines() breaks lines at them: escape them so every line reader
    # sees one record per line.
    for char in ("\x85", "\u2028", "\u2029"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text + "\n"


def write_atomically(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to a hidden temporary file next to ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(lines)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_path = Path(args.out_file)
    report_path = Path(args.report_file or f"{args.out_file}.skipped.txt")
    if out_path.is_dir():
        raise ConfigError(f"--out_file {args.out_file} is a directory; name a file")
    if out_path.exists() and not args.overwrite:
        raise ConfigError(f"{args.out_file} already exists; pass --overwrite to replace it")

    # Read and convert everything first: nothing is written unless the whole input is usable.
    lines, skipped, counts = [], [], {"alpaca": 0, "qa": 0}
    in_format, records = read_records(Path(args.in_file), args.in_file, args.in_format)
    for record in records:
        try:
            if isinstance(record, DataError):
                raise record
            kind, conversation = to_sharegpt(record, args.data_type, from_table=in_format in ("csv", "tsv"))
        except DataError as error:
            if not args.skip_invalid:
                raise
            skipped.append(f"{error}\n")
            continue
        counts[kind] += 1
        lines.append(to_json_line(conversation))

    if args.skip_invalid:
        write_atomically(report_path, skipped)  # written even when empty, so an old report never lingers
    if not lines:
        detail = f"{len(skipped)} invalid, listed in {report_path}" if skipped else "no records"
        raise DataError(f"nothing to convert ({detail})", args.in_file)
    write_atomically(out_path, lines)
    print(f"wrote {len(lines)} conversations to {args.out_file} (alpaca: {counts['alpaca']}, qa: {counts['qa']})")
    if args.skip_invalid:
        print(f"skipped {len(skipped)} invalid records; reasons in {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
