"""Which benchmark questions a model may have seen in training: 13-gram overlap after normalisation.

The rule of the GPT-3 and LLaMA reports: a question counts as contaminated when one of its 13-token sequences
also occurs in the training data. Normalisation (:func:`tokens`), applied to both sides alike:

1. Unicode NFKC (full-width letters, digits and punctuation become their ASCII forms: ``Ａ１，`` -> ``A1,``),
   then lower case.
2. Tokens are runs of letters/digits of non-CJK scripts (English words, numbers), and every single CJK character
   (Chinese has no spaces between words, and word segmenters disagree; 13 characters are about 7-9 Chinese words,
   as specific as 13 English words). Punctuation, whitespace and symbols are dropped, so line breaks, commas or
   full-width vs half-width punctuation never hide an overlap.

A question is checked field by field (the question text, its context, each option) so no n-gram spans two fields.
A question text shorter than 13 tokens is flagged when it occurs whole (as a token sequence) in one training text;
options shorter than 13 tokens are not checked alone ("yes", "高血压" occur everywhere).

Training files: every string inside ``*.json``/``*.jsonl`` records (any format: instructions, answers, chosen and
rejected replies) and every line of ``*.txt`` files.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Iterable, Iterator

from .errors import DataError
from .formats import iter_json_records, read_text

N = 13
TRAIN_EXTENSIONS = (".json", ".jsonl", ".txt")
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|[^\W_]+", re.UNICODE)
_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")


def tokens(text: str) -> list[str]:
    """Normalised tokens: NFKC + lower case; CJK characters one by one, other scripts as letter/digit runs."""
    text = unicodedata.normalize("NFKC", text).lower()
    out = []
    for match in _TOKEN.finditer(text):
        piece = match.group()
        if len(piece) > 1 and _CJK_CHAR.search(piece):
            # a run like "abc高血压" from [^\W_]+: split the CJK characters off
            out.extend(p for p in re.split(f"({_CJK_CHAR.pattern})", piece) if p)
        else:
            out.append(piece)
    return out


def ngrams(toks: list[str], n: int = N) -> Iterator[tuple[str, ...]]:
    for i in range(len(toks) - n + 1):
        yield tuple(toks[i:i + n])


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def training_files(paths: Iterable[str]) -> list[str]:
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
            continue
        if not os.path.isdir(path):
            raise DataError("no such file or directory (check --train_file_dir)", file=path)
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(root, f) for f in sorted(files)
                         if f.endswith(TRAIN_EXTENSIONS) and not f.startswith("."))
    return found


def training_texts(files: list[str]) -> Iterator[str]:
    """Every text of the training files (JSON strings, text lines); an unreadable JSON file is an error."""
    for path in files:
        if path.endswith(".txt"):
            yield from read_text(path).splitlines()
        else:
            for record in iter_json_records(path):
                yield from _strings(record.data)


class TrainingIndex:
    """The set of normalised 13-grams of the training texts, and the texts themselves for short questions."""

    def __init__(self, texts: Iterable[str], n: int = N):
        self.n = n
        self.grams: set[int] = set()
        self.joined: list[str] = []  # " tok tok ... " per text, to find short questions whole
        for text in texts:
            toks = tokens(text)
            if not toks:
                continue
            self.grams.update(hash(g) for g in ngrams(toks, n))
            self.joined.append(" " + " ".join(toks) + " ")

    @classmethod
    def from_paths(cls, paths: Iterable[str]) -> "TrainingIndex":
        return cls(training_texts(training_files(paths)))

    def overlaps(self, text: str, whole_if_short: bool = False) -> bool:
        toks = tokens(text)
        if len(toks) >= self.n:
            return any(hash(g) in self.grams for g in ngrams(toks, self.n))
        if whole_if_short and toks:
            needle = " " + " ".join(toks) + " "
            return any(needle in joined for joined in self.joined)
        return False

    def question_overlaps(self, question: str, context: str = "", choices: Iterable[str] = ()) -> bool:
        return (self.overlaps(question, whole_if_short=True) or self.overlaps(context)
                or any(self.overlaps(c) for c in choices))


def check_questions(index: TrainingIndex, questions: list[dict]) -> list[str]:
    """Ids of the questions (normalised benchmark dicts) that overlap the training data."""
    return [q["id"] for q in questions
            if index.question_overlaps(q["question"], q.get("context", ""), q["choices"])]
