"""Turning conversations into ``input_ids`` and ``labels`` (-100 = not trained on), and showing the result.

Each turn's prompt piece and answer piece are tokenised separately and concatenated, so the boundary between
masked and supervised tokens is exact. Labels cover every assistant answer plus its end-of-turn token; all system,
user and template tokens are -100 unless ``train_on_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # a turn was shortened or later turns were dropped to fit max_length


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _needs_bos(tokenizer: Any, first_ids: list[int]) -> bool:
    """True when the tokenizer normally prepends BOS and the rendered text does not already start with it."""
    bos = tokenizer.bos_token_id
    if bos is None or (first_ids and first_ids[0] == bos):
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def _fit(prompt_len: int, answer_len: int, budget: int) -> tuple[int, int]:
    """Split ``budget`` tokens between a prompt and its answer (LLaMA-Factory's rule: the shorter keeps its length)."""
    if prompt_len + answer_len <= budget:
        return prompt_len, answer_len
    if prompt_len <= budget // 2:
        return prompt_len, budget - prompt_len
    if answer_len <= budget // 2:
        return budget - answer_len, answer_len
    return budget - budget // 2, budget // 2


def encode_dialog(
    tokenizer: Any, pieces: list[tuple[str, str]], max_length: int, train_on_inputs: bool = False
) -> Encoded:
    """Tokenise ``(prompt, answer)`` pieces into ids and labels, cutting at turn boundaries to fit ``max_length``.

    Whole turns are kept while they fit. Only when the first turn alone is too long is it shortened (the longer of
    prompt/answer is cut at its end); later turns that do not fit are dropped whole.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for turn, (prompt, answer) in enumerate(pieces):
        prompt_ids, answer_ids = _encode(tokenizer, prompt), _encode(tokenizer, answer)
        if turn == 0 and _needs_bos(tokenizer, prompt_ids):
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
        budget = max_length - len(input_ids)
        if len(prompt_ids) + len(answer_ids) > budget:
            truncated = True
            if turn > 0:
                break
            keep_prompt, keep_answer = _fit(len(prompt_ids), len(answer_ids), budget)
            prompt_ids, answer_ids = prompt_ids[:keep_prompt], answer_ids[:keep_answer]
        input_ids += prompt_ids + answer_ids
        prompt_labels = prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
        labels += prompt_labels + answer_ids
    return Encoded(input_ids, labels, truncated)


def has_supervised_tokens(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def describe_sample(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """A decoded view of which tokens are trained: runs of ``[masked]`` / ``[TRAIN ]`` text with token counts."""
    lines = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            tag = "masked" if labels[start] == IGNORE_INDEX else "TRAIN "
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            lines.append(f"  [{tag}] {i - start:4d} tok  {text!r}")
            start = i
    trained = sum(label != IGNORE_INDEX for label in labels)
    header = f"sample layout: {len(input_ids)} tokens, {trained} supervised (labels != -100)"
    return "\n".join([header] + lines)
