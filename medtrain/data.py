"""Train/validation splits from data directories (or a Hub dataset), and the tokenised SFT dataset."""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Callable

from .arguments import DataArguments
from .errors import DataError
from .formats import DATA_EXTENSIONS, MAX_LISTED, LoadReport, Record, find_data_files
from .tokenization import describe_sample, encode_dialogs, has_supervised_tokens

logger = logging.getLogger(__name__)
ENCODE_BATCH = 1000  # conversations per tokenizer batch in tokenize_conversations

Loader = Callable[[list[str], LoadReport | None], list[dict]]


def _hub_records(data_args: DataArguments, split: str) -> list[Record]:
    """Rows of ``--dataset_name`` as records (needs the Hub or a local datasets cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=split)
    except Exception as err:  # the hub raises many kinds; all mean "could not get it"
        raise DataError(
            f"cannot load --dataset_name {data_args.dataset_name!r} ({type(err).__name__}: {str(err)[:200]}). "
            "Offline, put the data in files and pass --train_file_dir instead"
        ) from None
    return [Record(row, f"{data_args.dataset_name}[{split}]", i + 1) for i, row in enumerate(dataset)]


def load_splits(
    data_args: DataArguments, loader: Loader, seed: int = 42, report_dir: str | None = None,
    extensions: tuple[str, ...] = DATA_EXTENSIONS,
) -> tuple[list[dict], list[dict]]:
    """Load train and eval examples with ``loader`` (e.g. :func:`formats.load_conversations`).

    Eval comes from ``--validation_file_dir``, else a ``--validation_split_percentage`` hold-out of train. Every
    file is read in full before the bad-record policy (:func:`check_invalid_records`) decides whether to go on.
    ``extensions``: the file types read from the data directories (JSON and JSON Lines by default).
    """
    report = LoadReport()
    if data_args.train_file_dir:
        train = loader(find_data_files(data_args.train_file_dir, extensions), report)
    else:
        train = _loader_over_records(loader, _hub_records(data_args, "train"), report)
    if data_args.validation_file_dir:
        eval_ = loader(find_data_files(data_args.validation_file_dir, extensions), report)
    else:
        eval_ = []
    check_invalid_records(report, data_args, report_dir)
    if not train:
        raise DataError("no valid training records", file=data_args.train_file_dir or data_args.dataset_name)
    if not eval_ and data_args.validation_split_percentage > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * data_args.validation_split_percentage / 100))
        eval_ = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    if data_args.max_train_samples > 0:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples > 0:
        eval_ = eval_[: data_args.max_eval_samples]
    logger.info("loaded %d train and %d eval records", len(train), len(eval_))
    return train, eval_


INVALID_REPORT = "invalid_samples.txt"
POLICY_HELP = (
    "Fix the records, or choose the policy: by default a file may have up to --max_invalid_fraction (0.01) of bad "
    "records, skipped with a report; --max_invalid_fraction F changes that share; --skip_invalid_samples skips every "
    "bad record; --strict_data stops at any."
)


def allowed_invalid(records: int, fraction: float) -> int:
    """Bad records a file of ``records`` may have: ``floor(fraction * records)``.

    So a *tiny* file, one with fewer than ``1 / fraction`` records (100 at 1%), may have none: there a single bad
    record is already more than the tolerated share, and more likely a format mistake than noise.
    """
    return int(fraction * records + 1e-9)


def _ordered(report: LoadReport, errors: list[DataError]) -> list[DataError]:
    rank = {path: i for i, path in enumerate(report.records)}
    return sorted(errors, key=lambda e: (rank.get(e.file, len(rank)), e.line or 0))


def _listing(errors: list[DataError]) -> str:
    shown = "\n".join(f"  {e}" for e in errors[:MAX_LISTED])
    more = len(errors) - MAX_LISTED
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def check_invalid_records(report: LoadReport, data_args: DataArguments, report_dir: str | None = None) -> None:
    """Apply the bad-record policy to everything a load found; raise one DataError, or log and go on.

    Default: a file whose bad records are at most ``allowed_invalid`` of its records trains without them, with a
    loud report; more is a format problem and stops the run. ``--strict_data``: any bad record or repaired
    conversation stops it. ``--skip_invalid_samples``: nothing stops it. Whole-file problems (empty, not UTF-8, a
    broken JSON array) stop the run unless skipping. Stopping writes nothing, except the full list in
    ``report_dir/invalid_samples.txt`` when the error cannot quote every problem.
    """
    problems = _ordered(report, report.file_errors + report.problems)
    repaired = _ordered(report, report.repaired)
    stop = None
    if data_args.strict_data and (problems or repaired):
        found = _ordered(report, problems + repaired)
        stop = (f"{len(found)} bad record(s) in {len({e.file for e in found})} file(s) and --strict_data is set", found)
    elif not data_args.skip_invalid_samples:
        lines = [f"{e} (the whole file is unreadable past this point)" for e in report.file_errors]
        for path, bad in report.bad_per_file().items():
            total = report.records[path]
            allowed = allowed_invalid(total, data_args.max_invalid_fraction)
            if bad > allowed:
                lines.append(f"{path}: {bad} of {total} records are invalid; --max_invalid_fraction "
                             f"{data_args.max_invalid_fraction:g} allows {allowed} in a file of {total} records")
        if lines:
            stop = ("too many bad records, which looks like a format problem rather than noise:\n  "
                    + "\n  ".join(lines), problems)
    if stop is not None:
        headline, listed = stop
        if len(listed) == 1:  # one problem: it leads the error, as file:line: field: message
            raise DataError(f"{listed[0]}\n(stopped: {headline})\n{POLICY_HELP}")
        if len(listed) > MAX_LISTED and report_dir:
            path = _write_report(report_dir, listed, [])
            headline += f" (all {len(listed)} listed in {path})"
        raise DataError(f"{headline}\nproblems:\n{_listing(listed)}\n{POLICY_HELP}")

    if repaired:
        logger.warning("%d conversation(s) ended with an unanswered user turn: that turn was dropped, the answered "
                       "turns are kept (--strict_data refuses them):\n%s", len(repaired), _listing(repaired))
    if problems:
        logger.warning("SKIPPED %d bad record(s) (policy: %s):\n%s", len(problems),
                       "--skip_invalid_samples" if data_args.skip_invalid_samples
                       else f"--max_invalid_fraction {data_args.max_invalid_fraction:g}", _listing(problems))
    if (problems or repaired) and report_dir:
        path = _write_report(report_dir, problems, repaired)
        logger.warning("every skipped record and repaired conversation is listed in %s", path)


def _write_report(report_dir: str, problems: list[DataError], repaired: list[DataError]) -> str:
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, INVALID_REPORT)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(f"{e}\n" for e in problems)
        fh.writelines(f"{e}\n" for e in repaired)
    return path


def _loader_over_records(loader: Loader, records: list[Record], report: LoadReport) -> list[dict]:
    """Run a file loader over in-memory records by writing nothing: parse via a temporary JSON Lines file."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.data, ensure_ascii=False) + "\n")
        path = fh.name
    try:
        return loader([path], report)
    finally:
        os.unlink(path)


def tokenize_conversations(
    examples: list[dict], tokenizer: Any, chat_format: Any, max_length: int, train_on_inputs: bool,
    num_proc: int | None = None, name: str = "train",
):
    """Tokenise SFT examples into a ``datasets.Dataset`` of ``input_ids``/``labels``.

    Samples left with no supervised token (e.g. a prompt filling ``max_length``) are dropped; the numbers of
    truncated and dropped samples are logged, never silent.
    """
    import datasets

    def encode(batch: dict) -> dict:
        # A conversation may give several samples (formats that rewrite history, see ChatFormat.samples).
        # Tokenised together: one tokenizer call per turn index for the whole batch (the fast tokenizer uses every core).
        dialogs, sources = [], []
        for messages, tools, source in zip(batch["messages"], batch["tools"], batch["source"]):
            for pieces in chat_format.samples(json.loads(messages), json.loads(tools)):
                dialogs.append(pieces)
                sources.append(source)
        encoded = encode_dialogs(tokenizer, dialogs, max_length, train_on_inputs)
        return {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
                "truncated": [e.truncated for e in encoded], "source": sources}

    # Messages and tools travel as JSON text: their optional keys (reasoning, tool calls) vary between records.
    rows = [{"messages": json.dumps(e["messages"], ensure_ascii=False),
             "tools": json.dumps(e.get("tools"), ensure_ascii=False), "source": e["source"]} for e in examples]
    dataset = datasets.Dataset.from_list(rows)
    dataset = dataset.map(encode, batched=True, batch_size=ENCODE_BATCH, num_proc=num_proc,
                          desc=f"Tokenizing {name}", remove_columns=["messages", "tools"])
    if len(dataset) > len(rows):
        logger.info("%s: %d conversations gave %d samples (the chat format rewrites earlier turns, so each reply is "
                    "trained in the context inference gives it)", name, len(rows), len(dataset))
    truncated = sum(dataset["truncated"])
    keep = [i for i, labels in enumerate(dataset["labels"]) if has_supervised_tokens(labels)]
    dropped = len(dataset) - len(keep)
    if truncated or dropped:
        logger.warning(
            "%s: %d of %d samples truncated to %d tokens (cut at turn boundaries); %d dropped with no "
            "supervised token left", name, truncated, len(dataset), max_length, dropped,
        )
    dataset = dataset.select(keep).remove_columns(["truncated", "source"])
    if len(dataset) == 0:
        raise DataError(f"{name}: no sample has a supervised token left after truncation to {max_length} tokens")
    return dataset


def log_first_sample(dataset: Any, tokenizer: Any, name: str = "train") -> str:
    """Print the decoded (token, label) layout of the first sample so users see what is trained."""
    text = describe_sample(tokenizer, dataset[0]["input_ids"], dataset[0]["labels"])
    logger.info("first %s sample\n%s", name, text)
    return text
