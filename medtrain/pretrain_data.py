"""Continued-pretraining data: plain text corpora -> token blocks (packed or one per document), cached.

Inputs (mixed freely in one directory, searched recursively):

- ``.txt``: one document per line, or with ``--document_separator blank_line`` paragraphs separated by blank lines;
- ``.jsonl``: one ``{"text": "..."}`` object per line (read line by line, so it can be streamed);
- ``.json``: a JSON array (or JSON Lines) of ``{"text": "..."}`` objects (read whole).

Every document gets EOS appended (and BOS prepended when the tokenizer normally adds one). With ``--packing``
the documents are concatenated and cut into ``block_size`` blocks; without it each document is truncated to
``block_size``. Labels are the input ids themselves; only batch padding is masked (-100), by
:class:`PretrainCollator`.

Map-style datasets are tokenised once and saved under ``--cache_dir_data`` in a directory named by a fingerprint
of the files (path, size, mtime), the tokenizer and the block settings; a later run with the same inputs loads it
instead of tokenising again. ``--streaming`` reads, tokenises and packs lazily (an ``IterableDataset``), so
corpora larger than memory never get loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .errors import ConfigError, DataError
from .formats import find_data_files, iter_json_records
from .tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl")
SEPARATORS = ["line", "blank_line"]
CACHE_VERSION = 1  # bump when the cached layout or the preprocessing changes
_TOKENIZE_BATCH = 256  # documents per tokenizer call (fast tokenizers batch in Rust)


@dataclass
class PretrainDataArguments:
    """Where the pretraining text is and how it becomes blocks of tokens."""

    train_file_dir: str | None = field(
        default=None,
        metadata={"help": "Directory (or one file) searched recursively for *.txt, *.json and *.jsonl training text."},
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Directory (or one file) of held-out text, same formats as the training text."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets name or local dataset path with a 'text' column (train split)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name for --dataset_name."})
    document_separator: str = field(
        default="line",
        metadata={
            "help": "How .txt files split into documents: 'line' = one document per line, 'blank_line' = "
            "paragraphs separated by blank lines.",
            "choices": SEPARATORS,
        },
    )
    block_size: int = field(
        default=1024,
        metadata={"help": "Tokens per training sequence; capped (with a warning) at the model's maximum length."},
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Concatenate documents (each ending with EOS) and cut them into block_size blocks. False: one "
            "sequence per document, truncated to block_size and padded per batch."
        },
    )
    keep_remainder: bool = field(
        default=False,
        metadata={"help": "With packing: keep the last, shorter block (padding is not trained on) instead of dropping it."},
    )
    max_train_samples: int = field(default=-1, metadata={"help": "Use at most this many training blocks (-1 = all)."})
    max_eval_samples: int = field(default=-1, metadata={"help": "Use at most this many eval blocks (-1 = all)."})
    validation_split_percentage: float = field(
        default=0.0,
        metadata={"help": "Percent of the training documents held out for evaluation when there is no validation dir."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read, tokenise and pack the corpus lazily while training (for corpora larger than memory). "
            "Needs --max_steps; nothing is cached."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "With --streaming: blocks kept in the shuffle buffer (0 = corpus order)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenisation (datasets.map num_proc)."}
    )
    cache_dir_data: str = field(
        default=".cache/medtrain",
        metadata={"help": "Where tokenised blocks are cached, keyed by a fingerprint of files, tokenizer and settings."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenise again even when a cached copy exists."})
    skip_invalid_samples: bool = field(
        default=False,
        metadata={"help": "Skip bad records (empty files, .jsonl lines without text) with a warning instead of stopping."},
    )

    def __post_init__(self) -> None:
        problems = []
        if self.train_file_dir is None and self.dataset_name is None:
            problems.append("no training data: pass --train_file_dir DIR (or --dataset_name NAME).")
        if self.block_size < 2:
            problems.append(f"--block_size must be at least 2 (one token and its successor), got {self.block_size}.")
        if not 0.0 <= self.validation_split_percentage < 100.0:
            problems.append(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")
        if self.streaming and self.validation_split_percentage > 0:
            problems.append(
                "--validation_split_percentage needs the whole corpus up front; with --streaming pass "
                "--validation_file_dir instead."
            )
        if problems:
            raise ConfigError(problems)


def check_pretrain_arguments(data_args: PretrainDataArguments, training_args: Any) -> None:
    """Cross-checks with the training arguments, before anything is loaded."""
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ConfigError(
            "--streaming needs --max_steps N: a stream has no length, so the number of steps cannot be derived "
            "from epochs."
        )


def resolve_block_size(requested: int, model_max_length: int | None) -> int:
    """``requested``, capped at what the model supports (with a warning)."""
    if model_max_length and requested > model_max_length:
        logger.warning(
            "--block_size %d is larger than the model supports (%d positions); using %d",
            requested, model_max_length, model_max_length,
        )
        return model_max_length
    return requested


# --------------------------------------------------------------------------------------------------------------
# Reading documents


def _decode_line(raw: bytes, path: str, number: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8", file=path, line=number
        ) from None
    if number == 1:
        text = text.removeprefix("\ufeff")
    return text.rstrip("\r\n")


def _skip_or_raise(err: DataError, skip_invalid: bool) -> None:
    if not skip_invalid:
        raise err
    logger.warning("skipped: %s", err)


def _iter_lines(path: str, skip_invalid: bool) -> Iterator[tuple[int, str]]:
    """Lines of a UTF-8 file, one at a time (the file is never read whole)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = _decode_line(raw, path, number)
            except DataError as err:
                _skip_or_raise(err, skip_invalid)
                continue
            yield number, line


def _record_text(data: Any, path: str, line: int) -> str:
    if not isinstance(data, dict):
        raise DataError(f'expected a JSON object with a "text" field, got {type(data).__name__}', file=path, line=line)
    if "text" not in data:
        raise DataError(
            f'no "text" field (pretraining records look like {{"text": "..."}}; keys here: {sorted(data)})',
            file=path, line=line,
        )
    text = data["text"]
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", file=path, line=line, field="text")
    if not text.strip():
        raise DataError("empty text", file=path, line=line, field="text")
    return text


def _json_records(path: str, skip_invalid: bool) -> Iterator[tuple[Any, int]]:
    """(object, line) pairs: JSON Lines are decoded line by line; a JSON array is parsed whole (a syntax error in
    it ends the file, see iter_documents)."""
    if not path.endswith(".jsonl"):
        yield from ((record.data, record.line) for record in iter_json_records(path))
        return
    for number, line in _iter_lines(path, skip_invalid):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as err:
            detail = str(err).split(": line")[0]
            _skip_or_raise(DataError(f"invalid JSON ({detail})", file=path, line=number), skip_invalid)
            continue
        yield data, number


def _json_texts(path: str, skip_invalid: bool) -> Iterator[str]:
    for data, number in _json_records(path, skip_invalid):
        try:
            text = _record_text(data, path, number)
        except DataError as err:
            _skip_or_raise(err, skip_invalid)
            continue
        yield text


def _file_documents(path: str, separator: str, skip_invalid: bool) -> Iterator[str]:
    """Documents of one file; a bad line or record is skipped (with a warning) or raised."""
    if path.endswith((".jsonl", ".json")):
        yield from _json_texts(path, skip_invalid)
    elif separator == "blank_line":
        paragraph: list[str] = []
        for _, line in _iter_lines(path, skip_invalid):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)
    else:
        for _, line in _iter_lines(path, skip_invalid):
            if line.strip():
                yield line


def iter_documents(files: list[str], separator: str = "line", skip_invalid: bool = False) -> Iterator[str]:
    """The documents of ``files`` in order, read lazily.

    A bad line or record, or a file without any text, raises :class:`DataError` naming the file and line; with
    ``skip_invalid`` each is skipped with a warning instead.
    """
    for path in files:
        count = 0
        try:
            for text in _file_documents(path, separator, skip_invalid):
                count += 1
                yield text
        except DataError as err:  # only whole-file problems get here when skipping (a broken JSON array)
            if not skip_invalid:
                raise
            logger.warning("skipped the rest of %s after %d document(s): %s", path, count, err)
            continue
        if count == 0:
            _skip_or_raise(DataError("file is empty (no text to train on)", file=path), skip_invalid)


def _document_rows(files: list[str], separator: str, skip_invalid: bool) -> Iterator[dict]:
    for text in iter_documents(files, separator, skip_invalid):
        yield {"text": text}


# --------------------------------------------------------------------------------------------------------------
# Token ids and blocks


class DocumentEncoder:
    """Tokenise batches of documents into ``input_ids`` (BOS if the tokenizer adds one, text, EOS).

    ``max_length`` truncates each document (unpacked mode); packing leaves documents whole.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token: documents cannot be separated. Set eos_token in it.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos = [tokenizer.eos_token_id]
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and probe and probe[0] == bos else []

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Full documents with BOS/EOS, untruncated."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [self.prefix + doc + self.eos for doc in ids]

    def __call__(self, batch: dict) -> dict:
        """``datasets.map`` function: ``text`` -> ``input_ids`` (truncated to max_length) and ``truncated``."""
        docs = self.encode(batch["text"])
        if self.max_length is None:
            return {"input_ids": docs, "truncated": [False] * len(docs)}
        return {"input_ids": [d[: self.max_length] for d in docs], "truncated": [len(d) > self.max_length for d in docs]}


def pack_documents(documents: Iterable[list[int]], block_size: int, keep_remainder: bool = False) -> Iterator[list[int]]:
    """Concatenate ``documents`` (already ending with EOS) and cut the stream into ``block_size`` blocks.

    The final partial block is yielded only with ``keep_remainder``.
    """
    buffer: list[int] = []
    for doc in documents:
        buffer.extend(doc)
        if len(buffer) >= block_size:
            whole = len(buffer) - len(buffer) % block_size
            for start in range(0, whole, block_size):
                yield buffer[start : start + block_size]
            buffer = buffer[whole:]
    if buffer and keep_remainder:
        yield buffer


def _packed_rows(tokens: Any, block_size: int, keep_remainder: bool) -> Iterator[dict]:
    docs = (ids for batch in tokens.iter(batch_size=1000) for ids in batch["input_ids"])
    for block in pack_documents(docs, block_size, keep_remainder):
        yield {"input_ids": block}


def _stream_rows(files: list[str] | None, hub: Any, separator: str, skip_invalid: bool, encoder: DocumentEncoder,
                 block_size: int, packing: bool, keep_remainder: bool) -> Iterator[dict]:
    """Read -> tokenise -> pack lazily: only one tokenizer batch and one partial block are ever in memory."""
    texts = iter_documents(files, separator, skip_invalid) if files is not None else (row["text"] for row in hub)

    def docs() -> Iterator[list[int]]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == _TOKENIZE_BATCH:
                yield from encoder.encode(batch)
                batch = []
        if batch:
            yield from encoder.encode(batch)

    if packing:
        blocks = pack_documents(docs(), block_size, keep_remainder)
    else:
        blocks = (doc[:block_size] for doc in docs())
    for block in blocks:
        yield {"input_ids": block}


class PretrainCollator:
    """Right-pad ``input_ids``; labels are the inputs with -100 exactly at the padding.

    Padding is located by length, never by comparing with the pad id: many tokenizers pad with EOS (SmolLM2 does),
    and masking by id would stop the model from learning to end documents.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, n) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, :n] = ids
            labels[row, :n] = ids
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------------
# Cache key


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # runtime settings, not vocabulary
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, state, tokenizer.bos_token_id, tokenizer.eos_token_id],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def files_fingerprint(files: list[str]) -> list[list]:
    """(path, size, mtime) of each file: a changed, added or removed file changes the cache key."""
    out = []
    for path in files:
        stat = os.stat(path)
        out.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return out


def _cache_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------------------
# Building the datasets


def _source_files(directory: str | None) -> list[str] | None:
    return find_data_files(directory, TEXT_EXTENSIONS) if directory else None


def _hub_dataset(args: PretrainDataArguments, streaming: bool) -> Any:
    import datasets

    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train", streaming=streaming)
    except Exception as err:  # the hub and loaders raise many kinds; all mean "could not get it"
        raise DataError(
            f"cannot load --dataset_name {args.dataset_name!r} ({type(err).__name__}: {str(err)[:200]}). "
            "Offline, put the text in files and pass --train_file_dir instead"
        ) from None
    if "text" not in (dataset.column_names or []):
        raise DataError(f"--dataset_name {args.dataset_name}: no 'text' column (columns: {dataset.column_names})")
    return dataset.select_columns(["text"])


def _check_stream_files(files: list[str], args: PretrainDataArguments) -> None:
    """Cheap up-front checks for streaming: each file has a valid first document (later lines are read lazily)."""
    for path in files:
        next(iter_documents([path], args.document_separator, args.skip_invalid_samples), None)


def _streaming_datasets(args: PretrainDataArguments, encoder: DocumentEncoder, block_size: int, seed: int):
    import datasets

    settings = dict(separator=args.document_separator, skip_invalid=args.skip_invalid_samples, encoder=encoder,
                    block_size=block_size, packing=args.packing, keep_remainder=args.keep_remainder)

    def stream(files: list[str] | None, hub: Any = None) -> Any:
        if files is not None:
            _check_stream_files(files, args)
        # Lists in gen_kwargs are split between dataloader workers: one shard per file.
        return datasets.IterableDataset.from_generator(_stream_rows, gen_kwargs=dict(files=files, hub=hub, **settings))

    if args.train_file_dir:
        train = stream(_source_files(args.train_file_dir))
    else:
        train = stream(None, _hub_dataset(args, streaming=True))
    eval_files = _source_files(args.validation_file_dir)
    eval_ = stream(eval_files) if eval_files else None
    if args.shuffle_buffer_size > 0:
        train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
    if args.max_train_samples > 0:
        train = train.take(args.max_train_samples)
    if eval_ is not None and args.max_eval_samples > 0:
        eval_ = eval_.take(args.max_eval_samples)
    logger.info("streaming: documents are read, tokenised and packed while training (no cache)")
    return train, eval_


def _unwrap_generation_error(err: Exception) -> Exception:
    """datasets wraps exceptions raised while generating; a DataError inside is the user's problem, not ours."""
    cause = err.__cause__ or err.__context__
    return cause if isinstance(cause, DataError) else err


def _tokenize(raw: Any, encoder: DocumentEncoder, args: PretrainDataArguments, block_size: int, workdir: str,
              name: str, fingerprint: str) -> Any:
    """Documents -> blocks (packed) or truncated documents (unpacked)."""
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "truncated": datasets.Value("bool")})
    tokens = raw.map(
        encoder, batched=True, batch_size=_TOKENIZE_BATCH, num_proc=args.preprocessing_num_workers,
        remove_columns=raw.column_names, features=features, desc=f"Tokenizing {name}",
        cache_file_name=os.path.join(workdir, f"{name}-tokens.arrow"), new_fingerprint=f"{fingerprint}-{name}-tok",
    )
    if not args.packing:
        truncated = sum(tokens["truncated"])
        if truncated:
            logger.warning("%s: %d of %d documents truncated to %d tokens", name, truncated, len(tokens), block_size)
        return tokens.remove_columns(["truncated"])
    try:
        return datasets.Dataset.from_generator(
            _packed_rows,
            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
            gen_kwargs=dict(tokens=tokens, block_size=block_size, keep_remainder=args.keep_remainder),
            cache_dir=os.path.join(workdir, f"{name}-blocks"), fingerprint=f"{fingerprint}-{name}-blocks",
        )
    except datasets.exceptions.DatasetGenerationError as err:
        raise _unwrap_generation_error(err) from None


def _raw_documents(files: list[str], args: PretrainDataArguments, workdir: str, name: str, fingerprint: str) -> Any:
    import datasets

    try:
        return datasets.Dataset.from_generator(
            _document_rows,
            features=datasets.Features({"text": datasets.Value("string")}),
            gen_kwargs=dict(files=files, separator=args.document_separator, skip_invalid=args.skip_invalid_samples),
            cache_dir=os.path.join(workdir, f"{name}-raw"), fingerprint=f"{fingerprint}-{name}-raw",
        )
    except datasets.exceptions.DatasetGenerationError as err:
        raise _unwrap_generation_error(err) from None


def _build(args: PretrainDataArguments, encoder: DocumentEncoder, block_size: int, seed: int,
           train_files: list[str] | None, hub: Any, eval_files: list[str] | None, workdir: str, key: str) -> dict:
    """Tokenise and pack train (and eval) into datasets living under ``workdir``."""
    train_raw = _raw_documents(train_files, args, workdir, "train", key) if train_files is not None else hub
    if len(train_raw) == 0:
        raise DataError("no training documents", file=args.train_file_dir or args.dataset_name)
    eval_raw = _raw_documents(eval_files, args, workdir, "eval", key) if eval_files else None
    if eval_raw is None and args.validation_split_percentage > 0:
        n_eval = max(1, int(len(train_raw) * args.validation_split_percentage / 100))
        if n_eval >= len(train_raw):
            raise DataError(
                f"{len(train_raw)} document(s) cannot be split into train and a {args.validation_split_percentage}% "
                "hold-out: add text or pass --validation_file_dir", file=args.train_file_dir or args.dataset_name)
        split = train_raw.train_test_split(
            test_size=n_eval, seed=seed,
            train_indices_cache_file_name=os.path.join(workdir, "split-train.arrow"),
            test_indices_cache_file_name=os.path.join(workdir, "split-eval.arrow"),
        )
        train_raw, eval_raw = split["train"], split["test"]
    out = {"train": _tokenize(train_raw, encoder, args, block_size, workdir, "train", key)}
    out["train_documents"] = len(train_raw)
    if eval_raw is not None:
        out["eval"] = _tokenize(eval_raw, encoder, args, block_size, workdir, "eval", key)
        out["eval_documents"] = len(eval_raw)
    return out


def _require_blocks(dataset: Any, name: str, block_size: int, args: PretrainDataArguments) -> None:
    if len(dataset) == 0:
        hint = " or pass --keep_remainder" if args.packing and not args.keep_remainder else ""
        raise DataError(f"{name}: the text is shorter than one block of {block_size} tokens: lower --block_size{hint}")


def load_pretrain_datasets(args: PretrainDataArguments, tokenizer: Any, block_size: int, seed: int = 42):
    """Train and eval datasets of ``input_ids`` (eval is None without validation data).

    Map-style results are cached under ``--cache_dir_data``; ``--streaming`` returns ``IterableDataset`` s.
    """
    import datasets

    encoder = DocumentEncoder(tokenizer, max_length=None if args.packing else block_size)
    if args.streaming:
        return _streaming_datasets(args, encoder, block_size, seed)

    train_files, eval_files = _source_files(args.train_file_dir), _source_files(args.validation_file_dir)
    hub = _hub_dataset(args, streaming=False) if train_files is None else None
    source = files_fingerprint(train_files) if hub is None else [args.dataset_name, args.dataset_config_name, hub._fingerprint]
    key = _cache_key(dict(
        version=CACHE_VERSION, train=source, eval=files_fingerprint(eval_files) if eval_files else None,
        tokenizer=tokenizer_fingerprint(tokenizer), block_size=block_size, packing=args.packing,
        keep_remainder=args.keep_remainder, separator=args.document_separator, skip_invalid=args.skip_invalid_samples,
        split=args.validation_split_percentage if not eval_files else 0,
        seed=seed if args.validation_split_percentage and not eval_files else None,  # the seed only picks the split
    ))
    cache = os.path.join(args.cache_dir_data, f"pt-{key}")
    meta_path = os.path.join(cache, "meta.json")
    if os.path.isfile(meta_path) and not args.overwrite_cache:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        logger.info("loaded tokenized data from cache %s", cache)
    else:
        meta = _build_cache(args, encoder, block_size, seed, train_files, hub, eval_files, cache, key)
    train = datasets.load_from_disk(os.path.join(cache, "train"))
    eval_ = datasets.load_from_disk(os.path.join(cache, "eval")) if meta["eval_blocks"] is not None else None
    logger.info(
        "train: %d blocks from %d documents; eval: %s blocks (block_size %d, packing %s)",
        meta["train_blocks"], meta["train_documents"], meta["eval_blocks"], block_size, args.packing,
    )
    _require_blocks(train, "train", block_size, args)
    if eval_ is not None:
        _require_blocks(eval_, "eval", block_size, args)
    if args.max_train_samples > 0:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if eval_ is not None and args.max_eval_samples > 0:
        eval_ = eval_.select(range(min(args.max_eval_samples, len(eval_))))
    return train, eval_


def _build_cache(args: PretrainDataArguments, encoder: DocumentEncoder, block_size: int, seed: int,
                 train_files: list[str] | None, hub: Any, eval_files: list[str] | None, cache: str, key: str) -> dict:
    """Tokenise into a private work dir, save, then move into place: readers never see a half-written cache."""
    workdir = f"{cache}.tmp-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    try:
        built = _build(args, encoder, block_size, seed, train_files, hub, eval_files, workdir, key)
        staged = os.path.join(workdir, "final")
        built["train"].save_to_disk(os.path.join(staged, "train"))
        if "eval" in built:
            built["eval"].save_to_disk(os.path.join(staged, "eval"))
        meta = dict(
            key=key, block_size=block_size, packing=args.packing, keep_remainder=args.keep_remainder,
            train_blocks=len(built["train"]), train_documents=built["train_documents"],
            eval_blocks=len(built["eval"]) if "eval" in built else None,
            eval_documents=built.get("eval_documents"),
        )
        with open(os.path.join(staged, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        if os.path.isdir(cache):  # --overwrite_cache, or a stale half-cache
            shutil.rmtree(cache)
        os.replace(staged, cache)
        logger.info("tokenized data cached in %s", cache)
        return meta
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
