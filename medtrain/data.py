"""Train/validation splits from data directories (or a Hub dataset), and the tokenised SFT dataset."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable

from .arguments import DataArguments
from .errors import DataError
from .formats import Record, find_data_files
from .tokenization import describe_sample, encode_dialog, has_supervised_tokens

logger = logging.getLogger(__name__)

Loader = Callable[[list[str], list[str] | None], list[dict]]


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
    data_args: DataArguments, loader: Loader, seed: int = 42, report_dir: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Load train and eval examples with ``loader`` (e.g. :func:`formats.load_conversations`).

    Eval comes from ``--validation_file_dir``, else a ``--validation_split_percentage`` hold-out of train. With
    ``--skip_invalid_samples`` bad records are counted, logged and listed in ``report_dir/invalid_samples.txt``.
    """
    skipped: list[str] | None = [] if data_args.skip_invalid_samples else None
    if data_args.train_file_dir:
        train = loader(find_data_files(data_args.train_file_dir), skipped)
    else:
        train = _loader_over_records(loader, _hub_records(data_args, "train"), skipped)
    if data_args.validation_file_dir:
        eval_ = loader(find_data_files(data_args.validation_file_dir), skipped)
    else:
        eval_ = []
    if skipped:
        logger.warning("skipped %d invalid record(s); first: %s", len(skipped), skipped[0])
        if report_dir:
            os.makedirs(report_dir, exist_ok=True)
            with open(os.path.join(report_dir, "invalid_samples.txt"), "w", encoding="utf-8") as fh:
                fh.write("\n".join(skipped) + "\n")
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


def _loader_over_records(loader: Loader, records: list[Record], skipped: list[str] | None) -> list[dict]:
    """Run a file loader over in-memory records by writing nothing: parse via a temporary JSON Lines file."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.data, ensure_ascii=False) + "\n")
        path = fh.name
    try:
        return loader([path], skipped)
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

    def encode(example: dict) -> dict:
        encoded = encode_dialog(tokenizer, chat_format.dialog(example["messages"]), max_length, train_on_inputs)
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "truncated": encoded.truncated}

    dataset = datasets.Dataset.from_list([{"messages": e["messages"], "source": e["source"]} for e in examples])
    dataset = dataset.map(encode, num_proc=num_proc, desc=f"Tokenizing {name}", remove_columns=["messages"])
    truncated = sum(dataset["truncated"])
    keep = [i for i, labels in enumerate(dataset["labels"]) if has_supervised_tokens(labels)]
    dropped = len(dataset) - len(keep)
    if truncated or dropped:
        logger.warning(
            "%s: %d of %d conversations truncated to %d tokens (cut at turn boundaries); %d dropped with no "
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
