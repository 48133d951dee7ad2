"""Preference pairs (prompt, chosen, rejected) as token ids, rendered exactly as SFT renders the same turn.

The prompt is the conversation up to the last user turn plus the assistant header; chosen/rejected are the
assistant reply including its end-of-turn token. Both come from ``chat_format.dialog`` on the conversation with the
reply appended, so the ids equal the ones SFT would produce for that conversation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .tokenization import _needs_bos

logger = logging.getLogger(__name__)

TRUNCATION_CHOICES = ["left", "drop"]  # reward models read the score at the reply's end: never cut a reply
DPO_TRUNCATION_CHOICES = ["left", "reply", "drop"]


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def render_pair(chat_format: Any, record: dict) -> tuple[list[tuple[str, str]], str, str]:
    """``(prompt_pieces, chosen_text, rejected_text)``: the dialog pieces up to the last prompt, then the replies.

    ``prompt_pieces`` are ``(prompt, answer)`` pairs for the history turns followed by ``(last_prompt, "")``.
    """
    messages, tools = record["messages"], record.get("tools")
    chosen = chat_format.samples(messages + [reply_message(record["chosen"])], tools)[-1]
    rejected = chat_format.samples(messages + [reply_message(record["rejected"])], tools)[-1]
    if chosen[:-1] != rejected[:-1] or chosen[-1][0] != rejected[-1][0]:
        raise UserError("the chat format renders the shared prompt differently for chosen and rejected")
    return chosen[:-1] + [(chosen[-1][0], "")], chosen[-1][1], rejected[-1][1]


def reply_message(reply: str | dict) -> dict:
    """A reply (text, or an assistant message with reasoning / tool calls) as an assistant message."""
    return {"role": "assistant", "content": reply} if isinstance(reply, str) else reply


def prompt_text(chat_format: Any, record: dict) -> str:
    pieces, _, _ = render_pair(chat_format, record)
    return "".join(p + a for p, a in pieces)


def encode_pair(
    tokenizer: Any, chat_format: Any, record: dict, max_length: int, truncation: str = "left"
) -> EncodedPair | None:
    """Token ids of one pair fitted to ``max_length``.

    ``left``: the prompt loses tokens from the left so both replies keep their ends; a pair whose reply alone needs
    ``max_length`` tokens cannot fit. ``reply`` (DPO): the prompt keeps at least ``max_length // 2`` of its last tokens
    (all of them if the replies leave room) and both replies are cut at the end to the rest; every pair fits.
    ``drop``: nothing is cut. Returns None when the pair cannot fit.
    """
    pieces, chosen_text, rejected_text = render_pair(chat_format, record)
    prompt_ids: list[int] = []
    for prompt, answer in pieces:
        prompt_ids += _ids(tokenizer, prompt) + _ids(tokenizer, answer)
    if _needs_bos(tokenizer, prompt_ids):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    chosen_ids, rejected_ids = _ids(tokenizer, chosen_text), _ids(tokenizer, rejected_text)
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= max_length:
        return EncodedPair(prompt_ids, chosen_ids, rejected_ids)
    if truncation == "reply":
        keep = min(len(prompt_ids), max(max_length - longest, max_length // 2))
        budget = max_length - keep
        return EncodedPair(prompt_ids[len(prompt_ids) - keep:], chosen_ids[:budget], rejected_ids[:budget], True)
    if truncation == "drop" or longest >= max_length:
        return None
    keep = max_length - longest
    return EncodedPair(prompt_ids[-keep:], chosen_ids, rejected_ids, truncated=True)


def keep_hint(stage: str) -> str:
    """The flag that keeps pairs too long for ``--model_max_length``."""
    if stage == "rm":
        return "raise --model_max_length (a reward model reads its score at the reply's end, so replies are never cut)"
    return "pass --truncation reply (cut the replies at their end instead) or raise --model_max_length"


def encode_pairs(
    records: list[dict], tokenizer: Any, chat_format: Any, max_length: int, truncation: str = "left", name: str = "train",
    stage: str = "dpo",
) -> list[dict]:
    """Encode many pairs; the numbers truncated and dropped are logged (never silent)."""
    out, truncated, dropped = [], 0, 0
    for record in records:
        pair = encode_pair(tokenizer, chat_format, record, max_length, truncation)
        if pair is None:
            dropped += 1
            continue
        truncated += pair.truncated
        out.append({"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids,
                    "margin": record.get("margin", 0.0), "source": record.get("source", "")})
    if truncated and truncation == "reply":
        logger.warning(
            "%s: %d of %d preference pairs longer than %d tokens: cut to fit (prompt from the left, replies at the end)",
            name, truncated, len(records), max_length,
        )
    elif truncated or dropped:
        logger.warning(
            "%s: %d of %d preference pairs longer than %d tokens: %d prompt(s) truncated from the left, %d pair(s) dropped",
            name, truncated + dropped, len(records), max_length, truncated, dropped,
        )
        if dropped:
            logger.warning("%s: to keep the %d dropped pair(s): %s", name, dropped, keep_hint(stage))
    if not out:
        raise UserError(f"{name}: every preference pair is longer than {max_length} tokens; {keep_hint(stage)}")
    return out
