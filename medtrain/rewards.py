"""Reward functions for GRPO: rule-based (accuracy, format, length) and the trained reward model, combinable.

Every function has TRL's reward-function signature, ``f(prompts, completions, completion_ids, **columns)`` returning
one float per completion (``None`` where it does not apply), and a ``__name__`` that names its logged metrics
(``rewards/<name>/mean``). GRPO sums them weighted by ``--reward_weights``.

The completion layout the format reward asks for (and the accuracy reward reads)::

    <think>
    reasoning, any length
    </think>
    the final answer

``format`` is 1.0 when a completion is exactly one non-empty ``<think>...</think>`` block followed by a non-empty
answer, else 0.0. A prompt that already ends with ``<think>`` (Qwen3's generation prompt opens the block) counts as
the block's opening. ``accuracy`` compares the answer part (the text after the last ``</think>``; the whole completion
when there is none) with the row's reference ``answer`` according to its ``answer_type``:

- ``choice``: the option letter the answer states ("B", "(B)", "B. ...", "Answer: B", "答案是B", "选B") equals the
  reference letter;
- ``math``: ``math-verify`` judges the answer equivalent to the reference (``1/2`` = ``0.5`` = ``\\frac{1}{2}``);
  non-ASCII text is blanked first, since ``math-verify`` cannot read a number glued to Chinese ("共46个");
- ``text``: equal after normalisation (Unicode NFKC, case folded, whitespace and punctuation removed).

``length`` rewards concise completions: 1.0 up to ``target`` tokens, falling linearly to 0.0 at the completion
limit; a completion cut off at the limit (no end-of-turn token) scores 0.0.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable

ANSWER_TYPES = ["choice", "math", "text"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

RewardFunc = Callable[..., list]


# ------------------------------------------------------------------------------------------------------------------
# Parsing a completion


def answer_part(completion: str) -> str:
    """The text after the last ``</think>``, stripped (the whole completion when there is no ``</think>``)."""
    return completion.rsplit(THINK_CLOSE, 1)[-1].strip()


_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<answer>.*)", re.DOTALL)


def follows_format(completion: str, prompt: str = "") -> bool:
    """True for exactly one non-empty ``<think>...</think>`` block, then a non-empty answer, nothing before it."""
    if prompt.rstrip().endswith(THINK_OPEN) and not completion.lstrip().startswith(THINK_OPEN):
        completion = THINK_OPEN + completion
    match = _FORMAT.fullmatch(completion)
    if not match or completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return False
    return bool(match["think"].strip()) and bool(match["answer"].strip())


_LETTER = r"[A-Za-z]"
# Explicit statements first ("答案是 B", "Answer: (B)", "选B", "the correct option is B"), then an answer that starts
# with the letter ("B", "B.", "(B) ...", "B、...") -- never a capital letter inside a sentence ("A patient ...").
_CHOICE_PATTERNS = [
    re.compile(r"(?:答案|正确答案|正确选项|选项)\s*(?:是|为|应为|应该是)?\s*[:：]?\s*[(（]?\s*(" + _LETTER + r")(?![A-Za-z])"),
    re.compile(r"选\s*[(（]?\s*(" + _LETTER + r")(?![A-Za-z])"),
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*[:：]?\s*[(（]?\s*(" + _LETTER + r")(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^[(（]?\s*(" + _LETTER + r")\s*(?:[)）.．、:：,，]|$|\s*$)"),
]


def extract_choice(answer: str, letters: str = "ABCD") -> str | None:
    """The option letter an answer states (upper case), or None. Only letters in ``letters`` count."""
    text = answer.strip()
    for pattern in _CHOICE_PATTERNS:
        for match in pattern.finditer(text):
            letter = match.group(1).upper()
            if letter in letters.upper():
                return letter
    return None


_PUNCT_CATEGORIES = ("P", "S", "Z", "C")  # punctuation, symbols, separators, control characters


def normalize_text(text: str) -> str:
    """NFKC, case folded, every whitespace/punctuation/symbol character removed ("Ｃ. 肺炎。" -> "c肺炎")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith(_PUNCT_CATEGORIES))


def _math_parse(text: str) -> list:
    from math_verify import parse

    # math-verify reads LaTeX and plain expressions; a number glued to CJK text ("共46个") parses as nothing
    return parse(re.sub(r"[^\x00-\x7f]+", " ", text))


def math_equal(answer: str, reference: str) -> bool:
    """``math-verify``'s equivalence of an answer and a reference (False when either does not parse)."""
    from math_verify import verify

    gold, guess = _math_parse(reference), _math_parse(answer)
    return bool(gold) and bool(guess) and bool(verify(gold, guess))


def looks_mathematical(reference: str) -> bool:
    """A reference that is a number or a formula (``answer_type`` auto -> math), not prose."""
    text = reference.strip()
    return bool(text) and bool(re.fullmatch(r"[\s\d.,+\-*/^()=<>%$\\{}a-zA-Z_]*", text)) and \
        bool(re.search(r"\d|\\", text)) and bool(_math_parse(text))


def is_correct(answer: str, reference: str, answer_type: str, letters: str = "ABCD") -> bool:
    """Whether ``answer`` (the answer part of a completion) matches ``reference`` under ``answer_type``."""
    if answer_type == "choice":
        return extract_choice(answer, letters) == reference.strip().upper()
    if answer_type == "math":
        return math_equal(answer, reference)
    if answer_type == "text":
        return normalize_text(answer) == normalize_text(reference) and bool(normalize_text(reference))
    raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}")


# ------------------------------------------------------------------------------------------------------------------
# Reward functions (TRL signature)


def accuracy_reward(completions: list[str], answer: list[str], answer_type: list[str], choices: list[str] | None = None,
                    **_: Any) -> list[float]:
    """1.0 when the answer part of a completion matches the row's reference answer, else 0.0."""
    choices = choices or ["ABCD"] * len(completions)
    return [float(is_correct(answer_part(c), ref, kind, letters or "ABCD"))
            for c, ref, kind, letters in zip(completions, answer, answer_type, choices)]


accuracy_reward.__name__ = "accuracy"


def format_reward(completions: list[str], prompts: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 when a completion is ``<think>reasoning</think>`` followed by an answer, else 0.0."""
    prompts = prompts or [""] * len(completions)
    return [float(follows_format(c, p if isinstance(p, str) else "")) for c, p in zip(completions, prompts)]


format_reward.__name__ = "format"


def length_reward_score(n_tokens: int, finished: bool, target: int, limit: int) -> float:
    """1.0 up to ``target`` tokens, linear to 0.0 at ``limit``; an unfinished (cut-off) completion scores 0.0."""
    if not finished:
        return 0.0
    if n_tokens <= target:
        return 1.0
    return max(0.0, 1.0 - (n_tokens - target) / max(1, limit - target))


def make_length_reward(target: int, limit: int, stop_ids: list[int]) -> RewardFunc:
    """The ``length`` reward for completions of at most ``limit`` tokens.

    GRPOTrainer's ``completion_ids`` of a finished completion end with its stop token (one of ``stop_ids``, which the
    stage makes the generation's end-of-sequence ids); the stop token itself is not counted.
    """
    if not 0 < target < limit:
        raise ValueError(f"length target {target} must be between 1 and the completion limit {limit} - 1")
    stops = set(stop_ids)

    def length(completion_ids: list[list[int]], **_: Any) -> list[float]:
        out = []
        for ids in completion_ids:
            finished = len(ids) > 0 and ids[-1] in stops
            out.append(length_reward_score(len(ids) - finished, finished, target, limit))
        return out

    return length


def make_reward_model_reward(scorer: Any, tokenizer: Any) -> RewardFunc:
    """The trained reward model (:class:`medtrain.reward.RewardScorer`) scoring prompt + completion token ids.

    Prompts are tokenised the way GRPOTrainer tokenises text prompts (``tokenizer(text=...)``), so the reward model
    reads exactly the ids the policy was given.
    """

    def reward_model(prompts: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        queries = tokenizer(text=list(prompts))["input_ids"]
        return scorer.score_ids([list(q) + list(c) for q, c in zip(queries, completion_ids)]).tolist()

    return reward_model


REWARD_NAMES = ["accuracy", "format", "length", "reward_model"]
