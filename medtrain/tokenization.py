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


def _add_turn(encoded: Encoded, turn: int, prompt_ids: list[int], answer_ids: list[int], max_length: int,
              train_on_inputs: bool) -> bool:
    """Append one turn's ids/labels to ``encoded`` (the truncation rule of :func:`encode_dialog`); False = stop here."""
    budget = max_length - len(encoded.input_ids)
    if len(prompt_ids) + len(answer_ids) > budget:
        encoded.truncated = True
        if turn > 0:
            return False
        keep_prompt, keep_answer = _fit(len(prompt_ids), len(answer_ids), budget)
        prompt_ids, answer_ids = prompt_ids[:keep_prompt], answer_ids[:keep_answer]
    encoded.input_ids += prompt_ids + answer_ids
    encoded.labels += (prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)) + answer_ids
    return True


def encode_dialog(
    tokenizer: Any, pieces: list[tuple[str, str]], max_length: int, train_on_inputs: bool = False
) -> Encoded:
    """Tokenise ``(prompt, answer)`` pieces into ids and labels, cutting at turn boundaries to fit ``max_length``.

    Whole turns are kept while they fit. Only when the first turn alone is too long is it shortened (the longer of
    prompt/answer is cut at its end); later turns that do not fit are dropped whole.
    """
    return encode_dialogs(tokenizer, [pieces], max_length, train_on_inputs)[0]


def encode_dialogs(
    tokenizer: Any, dialogs: list[list[tuple[str, str]]], max_length: int, train_on_inputs: bool = False
) -> list[Encoded]:
    """:func:`encode_dialog` for many dialogs at once: the same ids and labels, tokenised turn by turn across the
    dialogs in one tokenizer call per turn index (a fast tokenizer encodes a batch on all cores), and no turn is
    tokenised once its dialog is full."""
    results = [Encoded([], [], False) for _ in dialogs]
    bos = tokenizer.bos_token_id
    bos_default = None  # whether the tokenizer prepends BOS by default (asked once)
    active = [i for i, dialog in enumerate(dialogs) if dialog]
    turn = 0
    while active:
        texts = [text for i in active for text in dialogs[i][turn]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        still = []
        for k, i in enumerate(active):
            prompt_ids, answer_ids = ids[2 * k], ids[2 * k + 1]
            if turn == 0 and bos is not None and not (prompt_ids and prompt_ids[0] == bos):
                if bos_default is None:
                    bos_default = _needs_bos(tokenizer, [])
                if bos_default:
                    prompt_ids = [bos] + prompt_ids
            if not _add_turn(results[i], turn, prompt_ids, answer_ids, max_length, train_on_inputs):
                continue
            if turn + 1 < len(dialogs[i]):
                if len(results[i].input_ids) < max_length:
                    still.append(i)
                elif any(dialogs[i][turn + 1]):  # full: the next turn (non-empty text) cannot fit, nor later ones
                    results[i].truncated = True
        active = still
        turn += 1
    return results


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
