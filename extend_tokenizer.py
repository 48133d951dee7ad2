"""Add domain vocabulary to a tokenizer: terms from a word list and/or BPE merges learned on a domain corpus.

    python extend_tokenizer.py --tokenizer_name_or_path models/SmolLM2-135M-Instruct \
        --word_file medical_terms.txt --output_dir outputs-tokenizer
    python extend_tokenizer.py --tokenizer_name_or_path models/SmolLM2-135M-Instruct \
        --corpus data/pretrain --num_new_merges 500 --output_dir outputs-tokenizer

Then continue pretraining with ``--tokenizer_name_or_path outputs-tokenizer``: the embeddings grow to the new
vocabulary (new rows start at the mean of the old ones) and, with LoRA, are trained via --modules_to_save.

- Word list: one term per line (blank lines ignored). Each term not already a single token becomes an added token,
  matched wherever it occurs in the text; this suits CJK terms best (in English the preceding space stays a
  separate token).
- Corpus (.txt/.json/.jsonl as in pretraining): BPE training *continued* from the tokenizer's own segmentation.
  The corpus is pre-tokenised and segmented exactly as the tokenizer does it, and the most frequent adjacent
  pairs are merged, one at a time. The merges are appended after the existing ones (lowest priority), so every
  existing token keeps its id and text the corpus did not touch is segmented as before. Needs a BPE tokenizer
  with a pre-tokenizer (GPT-2, Qwen, SmolLM2, Llama-3 style tokenizer.json).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from medtrain.arguments import parse_args
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError, DataError, UserError
from medtrain.formats import find_data_files, read_text
from medtrain.pretrain_data import SEPARATORS, TEXT_EXTENSIONS, iter_documents

logger = logging.getLogger("medtrain.extend_tokenizer")

_SAMPLE_DOCUMENTS = 1000  # documents used for the before/after token count and the round-trip check


@dataclass
class ExtendTokenizerArguments:
    """Which tokenizer to extend, with what, and where to save it."""

    tokenizer_name_or_path: str = field(metadata={"help": "The tokenizer (or model directory) to extend."})
    output_dir: str = field(metadata={"help": "Where the extended tokenizer is saved."})
    word_file: str | None = field(default=None, metadata={"help": "Domain terms to add, one per line (UTF-8)."})
    corpus: str | None = field(
        default=None, metadata={"help": "Directory or file of domain text (*.txt, *.json, *.jsonl) to learn merges on."}
    )
    num_new_merges: int = field(default=1000, metadata={"help": "At most this many BPE merges (new tokens) to learn."})
    min_frequency: int = field(default=2, metadata={"help": "Stop learning when the best pair occurs fewer times."})
    document_separator: str = field(
        default="line", metadata={"help": "How corpus .txt files split into documents.", "choices": SEPARATORS}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow tokenizer code from the checkpoint to run."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into a non-empty output_dir."})

    def __post_init__(self) -> None:
        problems = []
        if not self.word_file and not self.corpus:
            problems.append("nothing to add: pass --word_file FILE and/or --corpus DIR.")
        if self.num_new_merges < 0:
            problems.append(f"--num_new_merges must be >= 0, got {self.num_new_merges}.")
        if self.min_frequency < 1:
            problems.append(f"--min_frequency must be >= 1, got {self.min_frequency}.")
        if problems:
            raise ConfigError(problems)


# --------------------------------------------------------------------------------------------------------------
# Word list


def read_terms(path: str) -> list[str]:
    """Terms of a word list file: stripped, blank lines skipped, duplicates dropped (first kept)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--word_file {path}: no such file.")
    terms = list(dict.fromkeys(line.strip() for line in read_text(path).splitlines() if line.strip()))
    if not terms:
        raise DataError("word list is empty (one term per line)", file=path)
    return terms


def add_terms(tokenizer: Any, terms: Iterable[str]) -> list[str]:
    """Add each term that is not already a single token; returns the terms added, in order."""
    new = [t for t in terms if len(tokenizer.encode(t, add_special_tokens=False)) > 1]
    tokenizer.add_tokens(new)
    return new


# --------------------------------------------------------------------------------------------------------------
# Learned merges


def _bpe_state(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("learning merges needs a fast tokenizer (tokenizer.json); use --word_file instead.")
    state = json.loads(backend.to_str())
    model = state["model"]
    if model["type"] != "BPE":
        raise ConfigError(f"learning merges needs a BPE tokenizer; this one is {model['type']}: use --word_file instead.")
    if state.get("pre_tokenizer") is None:
        raise ConfigError("learning merges needs a tokenizer with a pre-tokenizer (words); use --word_file instead.")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ConfigError("learning merges does not support BPE with subword prefixes/suffixes; use --word_file.")
    return state


def _merge_pairs(state: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]


def learn_merges(tokenizer: Any, texts: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Continue BPE training on ``texts`` from the tokenizer's own segmentation; returns new merges in order.

    Words are the tokenizer's pre-tokenised pieces, segmented by its BPE model (so base merges are already
    applied). The most frequent adjacent pair is merged, repeatedly (ties: the smaller pair). Pairs whose merge is
    an existing token or an existing merge are never learned: a new merge must make a new token that no old merge
    refers to, so applying old merges first and new ones after reproduces this segmentation exactly.
    """
    state = _bpe_state(tokenizer)
    backend = tokenizer.backend_tokenizer
    vocab = state["model"]["vocab"]
    unk = state["model"].get("unk_token")
    reserved = set(vocab) | {t["content"] for t in state["added_tokens"]}
    old_merges = set(_merge_pairs(state))

    counts: Counter = Counter()
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    words, freqs = [], []
    for word, freq in counts.items():
        symbols = [t.value for t in backend.model.tokenize(word)]
        if len(symbols) > 1 and (unk is None or unk not in symbols):
            words.append(symbols)
            freqs.append(freq)

    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += freqs[i]
            where[pair].add(i)
    # Max-heap by count via negation; entries go stale when counts change and are skipped when popped.
    heap = [(-count, pair) for pair, count in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        negative, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -negative:
            continue
        if -negative < min_frequency:
            break
        del pairs[pair]
        if pair[0] + pair[1] in reserved or pair in old_merges:
            continue
        merges.append(pair)
        reserved.add(pair[0] + pair[1])
        touched = set()
        for i in where.pop(pair):
            old = words[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(old[j] + old[j + 1])
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue  # stale index: the pair left this word through an earlier merge
            for p in zip(old, old[1:]):
                if p != pair:
                    pairs[p] -= freqs[i]
                    touched.add(p)
            for p in zip(new, new[1:]):
                pairs[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
            words[i] = new
        for p in touched:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                pairs.pop(p, None)
    return merges


def append_merges(state: dict, merges: list[tuple[str, str]]) -> list[str]:
    """Add ``merges`` (lowest priority) and their tokens to a tokenizer.json state; returns the new tokens.

    The tokenizers library numbers an added token that is not in the model vocabulary as (model vocabulary size +
    its position), ignoring the id stored in the file: growing the model vocabulary would shift tokens such as
    Qwen's <|im_end|>. So added tokens are first written into the model vocabulary under their own ids (as SmolLM2
    already has them), and new tokens take the ids after everything.
    """
    model = state["model"]
    vocab = model["vocab"]
    for token in state["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError("the tokenizer's ids are not contiguous; learning merges cannot place new tokens safely.")
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    new_tokens = []
    for a, b in merges:
        vocab[a + b] = len(vocab)
        model["merges"].append(f"{a} {b}" if as_strings else [a, b])
        new_tokens.append(a + b)
    return new_tokens


# --------------------------------------------------------------------------------------------------------------


def _load(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None


def _token_count(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def extend_tokenizer(args: ExtendTokenizerArguments) -> dict:
    """Learn merges and/or add terms, save to ``args.output_dir``; returns a summary."""
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        raise ConfigError(f"output_dir {args.output_dir} exists and is not empty: choose another or pass --overwrite_output_dir.")
    base = _load(args.tokenizer_name_or_path, args.trust_remote_code)
    terms = read_terms(args.word_file) if args.word_file else []
    files = find_data_files(args.corpus, TEXT_EXTENSIONS) if args.corpus else []
    sample = list(itertools.islice(iter_documents(files, args.document_separator), _SAMPLE_DOCUMENTS))

    merges = []
    if files and args.num_new_merges:
        # A second pass over the corpus: learning reads it again rather than holding it in memory.
        merges = learn_merges(base, iter_documents(files, args.document_separator), args.num_new_merges,
                              args.min_frequency)
    base.save_pretrained(args.output_dir)
    new_tokens = []
    if merges:
        path = os.path.join(args.output_dir, "tokenizer.json")
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        new_tokens = append_merges(state, merges)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(state, fh, ensure_ascii=False, indent=2)
    extended = _load(args.output_dir, args.trust_remote_code)
    added_terms = add_terms(extended, terms)
    extended.save_pretrained(args.output_dir)

    summary = {
        "base_vocab_size": len(base),
        "vocab_size": len(extended),
        "new_merges": len(merges),
        "new_terms": len(added_terms),
        "terms_already_single_tokens": len(terms) - len(added_terms),
        "examples": [extended.convert_tokens_to_string([t]) for t in new_tokens[:5]] + added_terms[:5],
    }
    if sample:
        summary["sample_tokens_before"] = _token_count(base, sample)
        summary["sample_tokens_after"] = _token_count(extended, sample)
        bad = [t for t in sample if extended.decode(extended.encode(t, add_special_tokens=False)) != t
               and base.decode(base.encode(t, add_special_tokens=False)) == t]
        if bad:  # decoding is not part of training, but a changed round trip deserves a look
            logger.warning("decode(encode(text)) differs from the text for %d sample document(s); first: %r",
                           len(bad), bad[0][:80])
    with open(os.path.join(args.output_dir, "extension_summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, ensure_ascii=False, indent=2)
    return summary


def main() -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = parse_args([ExtendTokenizerArguments])
    summary = extend_tokenizer(args)
    print(
        f"vocabulary {summary['base_vocab_size']} -> {summary['vocab_size']}: {summary['new_merges']} learned merges, "
        f"{summary['new_terms']} added terms ({summary['terms_already_single_tokens']} already single tokens)"
    )
    if "sample_tokens_before" in summary:
        print(f"corpus sample: {summary['sample_tokens_before']} -> {summary['sample_tokens_after']} tokens")
    print(f"examples: {summary['examples']}")
    print(f"saved to {args.output_dir}; pretrain with --tokenizer_name_or_path {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
