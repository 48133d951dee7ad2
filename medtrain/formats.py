"""Reading data files and normalising every supported record format to messages.

A *message* is ``{"role": "system"|"user"|"assistant", "content": str}``. Supported inputs:

- SFT: ShareGPT ``{"conversations": [{"from", "value"}]}`` (roles system/human/gpt, or user/assistant),
  OpenAI ``{"messages": [{"role", "content"}]}``, alpaca ``{"instruction", "input", "output", "history"?, "system"?}``.
- Preference: ``{"conversations", "chosen": str, "rejected": str}`` (MedicalGPT),
  ``{"question", "response_chosen", "response_rejected"}`` (older MedicalGPT),
  ``{"conversations", "chosen": {"from","value"}, "rejected": {...}}`` (LLaMA-Factory),
  ``{"prompt", "chosen", "rejected"}`` with strings or message lists (TRL); optional numeric ``margin``.

The format is detected from the first record of a file; every later record must match it. Each error names
``file:line: field``. Files are read as UTF-8 (a BOM is accepted); JSON arrays report the line where each element
starts; duplicated keys in an object are an error (silently keeping the last one hides data bugs).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import DataError

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = (".json", ".jsonl")

ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # ShareGPT (LLaMA-Factory, MedicalGPT): an assistant turn that calls tools
    "observation": "tool",  # ShareGPT: the tool's result
    "tool": "tool",  # OpenAI
    "function": "tool",  # OpenAI's older name for a tool result
}
ROLE_HELP = "system, human/user, gpt/assistant, function_call, observation/tool"


@dataclass
class Record:
    """One raw JSON object and where it came from."""

    data: Any
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, line=self.line, field=field)


# --------------------------------------------------------------------------------------------------------------
# Files


def find_data_files(directory: str, extensions: tuple[str, ...] = DATA_EXTENSIONS) -> list[str]:
    """All files under ``directory`` (recursively) with one of ``extensions``, sorted for a stable order."""
    if not os.path.exists(directory):
        raise DataError(f"data directory does not exist (check --train_file_dir / --validation_file_dir)", file=directory)
    if os.path.isfile(directory):
        return [directory]
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(extensions) and not f.startswith("."))
    if not found:
        raise DataError(f"no {'/'.join('*' + e for e in extensions)} files found (searched recursively)", file=directory)
    return found


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicated key {key!r} in one object")
        obj[key] = value
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def read_text(path: str) -> str:
    """Read a UTF-8 file (BOM accepted); non-UTF-8 bytes are an error naming the line."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); re-save the file as UTF-8",
            file=path,
            line=line,
        ) from None


def iter_json_records(path: str) -> Iterator[Record]:
    """Yield the objects of a JSON array file or a JSON Lines file, each with its line number."""
    for item in iter_json_items(path):
        if isinstance(item, DataError):
            raise item
        yield item


def iter_json_items(path: str) -> Iterator[Record | DataError]:
    """Like :func:`iter_json_records`, but a JSON Lines line that does not parse is yielded as a DataError and
    reading goes on (lines are independent). Whole-file problems (not UTF-8, empty, a broken JSON array, which
    cannot be resynchronised) are raised."""
    text = read_text(path)
    if not text.strip():
        raise DataError("file is empty", file=path)
    start = len(text) - len(text.lstrip())
    if text[start] == "[":
        yield from _iter_array(path, text, start + 1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = _DECODER.decode(line)
        except ValueError as err:
            detail = str(err).split(": line")[0]
            yield DataError(f"invalid JSON ({detail})", file=path, line=number)
            continue
        yield Record(data, path, number)


def _iter_array(path: str, text: str, pos: int) -> Iterator[Record]:
    """Decode a JSON array element by element so each one keeps its line number."""
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos < n and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            data, pos = _DECODER.raw_decode(text, pos)
        except ValueError as err:
            detail = str(err).split(": line")[0]
            raise DataError(f"invalid JSON in array ({detail})", file=path, line=line) from None
        yield Record(data, path, line)
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            return
        else:
            raise DataError("invalid JSON array: expected ',' or ']'", file=path, line=text.count("\n", 0, pos) + 1)


# --------------------------------------------------------------------------------------------------------------
# Field helpers


def _string(record: Record, value: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", field)
    if not allow_empty and not value.strip():
        raise record.error("empty text", field)
    return value


def _json_value(record: Record, value: Any, field: str) -> Any:
    """``value`` itself, or the JSON it holds when it is a string (tools and calls come both ways)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as err:
            raise record.error(f"invalid JSON ({str(err).split(': line')[0]})", field) from None
    return value


def _tool_call(record: Record, call: Any, field: str) -> dict:
    """One call as ``{"type": "function", "function": {"name", "arguments": dict}}`` (OpenAI's shape, parsed)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call, field = call["function"], f"{field}.function"
    if not isinstance(call, dict) or "name" not in call:
        raise record.error('expected a call {"name": ..., "arguments": {...}}', field)
    name = _string(record, call["name"], f"{field}.name")
    arguments = _json_value(record, call.get("arguments", {}), f"{field}.arguments")
    if not isinstance(arguments, dict):
        raise record.error(f"expected a JSON object of arguments, got {type(arguments).__name__}", f"{field}.arguments")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_calls(record: Record, value: Any, field: str) -> list[dict]:
    calls = _json_value(record, value, field)
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise record.error("empty list of tool calls", field)
    return [_tool_call(record, call, f"{field}[{i}]" if len(calls) > 1 else field) for i, call in enumerate(calls)]


def parse_tools(record: Record, value: Any, field: str = "tools") -> list[dict] | None:
    """Tool schemas (a JSON string or a list) as OpenAI ``{"type": "function", "function": {...}}`` entries."""
    if value is None or value == "" or value == []:
        return None
    tools = _json_value(record, value, field)
    if not isinstance(tools, list):
        raise record.error(f"expected a list of tool schemas, got {type(tools).__name__}", field)
    out = []
    for i, tool in enumerate(tools):
        schema = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise record.error('expected a tool schema with a "name"', f"{field}[{i}]")
        out.append({"type": "function", "function": schema})
    return out


def split_reasoning(content: str) -> tuple[str, str | None]:
    """``(answer, reasoning)`` of text that opens with an inline ``<think>...</think>`` block (else reasoning None)."""
    if content.lstrip().startswith("<think>") and "</think>" in content:
        head, _, answer = content.partition("</think>")
        return answer.lstrip("\n"), head.split("<think>", 1)[1].strip("\n")
    return content, None


def _assistant(record: Record, turn: dict, raw_role: str, content: Any, where: str, content_key: str) -> dict:
    """An assistant message: text, optional ``reasoning_content`` (field or inline <think>), optional tool calls."""
    message: dict = {"role": "assistant"}
    if raw_role == "function_call":  # ShareGPT: the value is the call(s) as JSON
        message["content"] = ""
        message["tool_calls"] = _tool_calls(record, content, f"{where}.{content_key}")
        return message
    calls = turn.get("tool_calls")
    if calls:
        message["tool_calls"] = _tool_calls(record, calls, f"{where}.tool_calls")
        content = "" if content is None else content
    text = _string(record, content, f"{where}.{content_key}", allow_empty="tool_calls" in message)
    reasoning = turn.get("reasoning_content", turn.get("reasoning"))
    if reasoning is None:
        text, reasoning = split_reasoning(text)
    elif not isinstance(reasoning, str):
        raise record.error(f"expected a string, got {type(reasoning).__name__}", f"{where}.reasoning_content")
    if not text.strip() and "tool_calls" not in message:
        raise record.error("empty answer after the reasoning", f"{where}.{content_key}")
    message["content"] = text
    if reasoning and reasoning.strip():
        message["reasoning_content"] = reasoning
    return message


def _message_list(record: Record, turns: Any, field: str, role_key: str, content_key: str) -> list[dict]:
    """Validate a list of turns and map its roles to system/user/assistant/tool."""
    if not isinstance(turns, list):
        raise record.error(f"expected a list of turns, got {type(turns).__name__}", field)
    if not turns:
        raise record.error("empty conversation", field)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise record.error(f"expected an object with {role_key!r} and {content_key!r}", where)
        if role_key not in turn:
            raise record.error(f"missing {role_key!r}", where)
        if content_key not in turn and not turn.get("tool_calls"):
            raise record.error(f"missing {content_key!r}", where)
        raw_role = turn[role_key]
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise record.error(f"unknown role {raw_role!r}; expected one of {ROLE_HELP}", f"{where}.{role_key}")
        content = turn.get(content_key)
        if role == "assistant":
            messages.append(_assistant(record, turn, raw_role, content, where, content_key))
        else:
            messages.append({"role": role, "content": _string(record, content, f"{where}.{content_key}")})
    return messages


_FOLLOWERS = {"user": ("assistant",), "tool": ("tool", "assistant")}


def _check_order(record: Record, messages: list[dict], field: str, last: str) -> None:
    """A leading system message, then user/assistant alternating from user, ending with ``last``.

    A tool-calling assistant turn is followed by one or more tool results, then the assistant again.
    """
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    body = messages[offset:]
    if not body:
        raise record.error("no user/assistant turns", field)
    previous = None
    for i, message in enumerate(body):
        if previous is None:
            allowed = ("user",)
        elif previous["role"] == "assistant":
            allowed = ("tool",) if previous.get("tool_calls") else ("user",)
        else:
            allowed = _FOLLOWERS[previous["role"]] if previous["role"] in _FOLLOWERS else ("user",)
        if message["role"] not in allowed:
            raise record.error(
                f"roles out of order: expected {' or '.join(repr(a) for a in allowed)} at this position, got "
                f"{message['role']!r} (a system turn may only come first; user and assistant must alternate, starting "
                "with user; a tool call is followed by its result(s))",
                f"{field}[{i + offset}]",
            )
        previous = message
    ends = ("user", "tool") if last == "user" else ("assistant",)
    if body[-1]["role"] not in ends:
        raise record.error(f"conversation must end with {'a user' if last == 'user' else 'an assistant'} turn", field)


# --------------------------------------------------------------------------------------------------------------
# SFT formats


def _sharegpt(record: Record) -> list[dict]:
    return _message_list(record, record.data["conversations"], "conversations", "from", "value")


def _openai(record: Record) -> list[dict]:
    return _message_list(record, record.data["messages"], "messages", "role", "content")


def _with_tools(record: Record, item: dict) -> dict:
    """Add the record's ``tools`` (when it has any) to a parsed item."""
    tools = parse_tools(record, record.data.get("tools")) if isinstance(record.data, dict) else None
    if tools:
        item["tools"] = tools
    return item


def _alpaca(record: Record) -> list[dict]:
    data = record.data
    messages = []
    if data.get("system"):
        messages.append({"role": "system", "content": _string(record, data["system"], "system")})
    history = data.get("history") or []
    if not isinstance(history, list):
        raise record.error("expected a list of [question, answer] pairs", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise record.error("expected a [question, answer] pair", f"history[{i}]")
        messages.append({"role": "user", "content": _string(record, pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _string(record, pair[1], f"history[{i}][1]")})
    instruction = _string(record, data["instruction"], "instruction")
    extra = _string(record, data.get("input") or "", "input", allow_empty=True)
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra.strip() else instruction})
    messages.append({"role": "assistant", "content": _string(record, data.get("output"), "output")})
    return messages


SFT_FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[Record], list[dict]]]] = {
    "sharegpt": (lambda d: "conversations" in d, _sharegpt),
    "openai": (lambda d: "messages" in d, _openai),
    "alpaca": (lambda d: "instruction" in d, _alpaca),
}


def _detect(record: Record, formats: dict, kind: str) -> str:
    if not isinstance(record.data, dict):
        raise record.error(f"expected a JSON object, got {type(record.data).__name__}")
    for name, (matches, _) in formats.items():
        if matches(record.data):
            return name
    raise record.error(
        f"unknown {kind} format with keys {sorted(record.data)}; expected one of: " + "; ".join(_FORMAT_HELP[kind])
    )


_FORMAT_HELP = {
    "sft": [
        'ShareGPT {"conversations": [{"from", "value"}]}',
        'OpenAI {"messages": [{"role", "content"}]}',
        'alpaca {"instruction", "input", "output"}',
    ],
    "preference": [
        '{"conversations", "chosen", "rejected"}',
        '{"question", "response_chosen", "response_rejected"}',
        '{"prompt", "chosen", "rejected"}',
    ],
    "prompt": ['{"conversations"}', '{"messages"}', '{"prompt"}', '{"question"}', '{"instruction"}'],
}


@dataclass
class LoadReport:
    """What reading a set of files found, kept so a policy can be applied over all of them at once.

    ``problems`` are bad records (each a DataError naming file:line: field), ``file_errors`` whole-file problems
    (empty, not UTF-8, a broken JSON array), ``repaired`` conversations kept after dropping an unanswered trailing
    user turn. ``records`` counts every record seen per file, good or bad.
    """

    problems: list[DataError] = field(default_factory=list)
    file_errors: list[DataError] = field(default_factory=list)
    repaired: list[DataError] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)

    def bad_per_file(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.file] = counts.get(problem.file, 0) + 1
        return counts

    def raise_if_any(self) -> None:
        """Strict reading for library callers: one error for one problem, one error listing all for several."""
        found = self.file_errors + self.problems
        if len(found) == 1:
            raise found[0]
        if found:
            raise DataError(f"{len(found)} invalid records:\n" + "\n".join(f"  {p}" for p in found[:MAX_LISTED])
                            + (f"\n  ... and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""))


MAX_LISTED = 10  # problems quoted in an error or the log; the report file lists all


def _load(files: list[str], formats: dict, kind: str, parse: Callable[[Record, Callable], dict],
          report: LoadReport | None) -> list[dict]:
    """Parse every record of every file, collecting every problem; without ``report`` any problem raises (after
    reading everything, so one error lists them all)."""
    collect = report if report is not None else LoadReport()
    out = []
    for path in files:
        file_format = None
        collect.records.setdefault(path, 0)
        try:
            for item in iter_json_items(path):
                collect.records[path] += 1
                if isinstance(item, DataError):
                    collect.problems.append(item)
                    continue
                record = item
                try:
                    fmt = _detect(record, formats, kind)
                    if file_format is None:
                        file_format = fmt
                    elif fmt != file_format:
                        raise record.error(
                            f"record is in {fmt} format but this file started in {file_format} format; "
                            "keep one format per file"
                        )
                    parsed = parse(record, formats[fmt][1])
                    repaired = parsed.pop("repaired", None)
                    if repaired is not None:
                        collect.repaired.append(repaired)
                    parsed["source"] = record.where
                    out.append(parsed)
                except DataError as err:
                    collect.problems.append(err)
        except DataError as err:
            collect.file_errors.append(err)
    if report is None:
        collect.raise_if_any()
        if collect.repaired:
            logger.warning("%d conversation(s) ended with an unanswered user turn: that turn was dropped; first: %s",
                           len(collect.repaired), collect.repaired[0])
    return out


def load_conversations(files: list[str], report: LoadReport | None = None) -> list[dict]:
    """Load SFT files as ``{"messages": [...], "source": "file:line"}`` (ending with an assistant turn).

    A conversation ending with an unanswered user turn keeps its answered part: the trailing turn is dropped and
    noted in ``report.repaired`` (a conversation with no answered turn at all is a problem).
    """

    def parse(record: Record, to_messages: Callable[[Record], list[dict]]) -> dict:
        messages = to_messages(record)
        key = "conversations" if "conversations" in record.data else "messages"
        repaired = None
        end = len(messages)
        while end > 0 and messages[end - 1]["role"] in ("user", "tool"):
            end -= 1
        if 0 < end < len(messages) and messages[end - 1]["role"] == "assistant":
            role = messages[end]["role"]
            repaired = record.error(f"unanswered {role} turn at the end: dropped, the answered turns are kept",
                                    f"{key}[{end}]")
            messages = messages[:end]
        _check_order(record, messages, key, "assistant")
        return _with_tools(record, {"messages": messages, "repaired": repaired})

    return _load(files, SFT_FORMATS, "sft", parse, report)


# --------------------------------------------------------------------------------------------------------------
# Preference formats


def _response(record: Record, value: Any, field: str) -> str | dict:
    """A response: a string, a {"from"/"role", "value"/"content"} turn (``function_call`` / ``tool_calls`` for a tool
    call, ``reasoning_content`` or inline <think> for reasoning), or a one-turn assistant message list.

    Plain text comes back as a string; a reply with tool calls or reasoning as an assistant message dict.
    """
    if isinstance(value, dict):
        role = value.get("from", value.get("role", "gpt"))
        if ROLE_ALIASES.get(role) != "assistant":
            raise record.error(f"response role must be gpt/assistant/function_call, got {role!r}", field)
        key = "value" if "value" in value else "content"
        message = _assistant(record, value, role, value.get(key), field, key)
        if set(message) == {"role", "content"}:
            return message["content"]
        return message
    if isinstance(value, list):
        if len(value) != 1:
            raise record.error("expected exactly one assistant message", field)
        return _response(record, value[0], f"{field}[0]")
    text, reasoning = split_reasoning(_string(record, value, field))
    return {"role": "assistant", "content": text, "reasoning_content": reasoning} if reasoning else text


def _reply_key(reply: str | dict) -> str:
    return reply.strip() if isinstance(reply, str) else json.dumps(reply, sort_keys=True, ensure_ascii=False)


def _pref_conversations(record: Record) -> tuple[list[dict], Any, Any]:
    data = record.data
    messages = _message_list(record, data["conversations"], "conversations", "from", "value")
    return messages, data.get("chosen"), data.get("rejected")


def _pref_question(record: Record) -> tuple[list[dict], Any, Any]:
    data = record.data
    messages = [{"role": "user", "content": _string(record, data["question"], "question")}]
    if data.get("system"):
        messages.insert(0, {"role": "system", "content": _string(record, data["system"], "system")})
    return messages, data.get("response_chosen"), data.get("response_rejected")


def _pref_prompt(record: Record) -> tuple[list[dict], Any, Any]:
    data = record.data
    prompt = data["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _string(record, prompt, "prompt")}]
    else:
        messages = _message_list(record, prompt, "prompt", "role", "content")
    return messages, data.get("chosen"), data.get("rejected")


PREFERENCE_FORMATS = {
    "conversations": (lambda d: "conversations" in d, _pref_conversations),
    "question": (lambda d: "question" in d and "response_chosen" in d, _pref_question),
    "prompt": (lambda d: "prompt" in d, _pref_prompt),
}
_FIELD_NAMES = {
    "conversations": ("chosen", "rejected"),
    "question": ("response_chosen", "response_rejected"),
    "prompt": ("chosen", "rejected"),
}


def load_preferences(files: list[str], report: LoadReport | None = None) -> list[dict]:
    """Load preference files as ``{"messages", "chosen", "rejected", "margin", "source"}``.

    ``messages`` is the prompt (optional system, history, ending with a user turn); chosen/rejected are the
    assistant replies to it.
    """

    def parse(record: Record, split: Callable[[Record], tuple[list[dict], Any, Any]]) -> dict:
        fmt = next(name for name, (_, fn) in PREFERENCE_FORMATS.items() if fn is split)
        chosen_key, rejected_key = _FIELD_NAMES[fmt]
        messages, chosen, rejected = split(record)
        for key, value in ((chosen_key, chosen), (rejected_key, rejected)):
            if value is None:
                raise record.error(f"missing {key!r}", key)
        _check_order(record, messages, "prompt" if fmt == "prompt" else fmt, "user")
        chosen = _response(record, chosen, chosen_key)
        rejected = _response(record, rejected, rejected_key)
        if _reply_key(chosen) == _reply_key(rejected):
            raise record.error("chosen and rejected are identical: the pair carries no preference", rejected_key)
        margin = record.data.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise record.error(f"expected a number, got {type(margin).__name__}", "margin")
        item = {"messages": messages, "chosen": chosen, "rejected": rejected, "margin": float(margin)}
        return _with_tools(record, item)

    return _load(files, PREFERENCE_FORMATS, "preference", parse, report)


# --------------------------------------------------------------------------------------------------------------
# Prompts (PPO / inference): any SFT or preference record, or {"prompt"}/{"question"}/{"instruction"}


def load_prompts(files: list[str], report: LoadReport | None = None) -> list[dict]:
    """Load prompts as ``{"messages": [... ending with a user turn], "source"}``.

    From an SFT conversation the prompt is everything before its last assistant turn; a preference record gives
    its prompt; ``{"prompt": str}`` / ``{"question": str}`` / ``{"instruction", "input"}`` give one user turn.
    """

    def prompt_messages(record: Record) -> list[dict]:
        data = record.data
        if "conversations" in data or "messages" in data:
            key, role_key, content_key = (
                ("conversations", "from", "value") if "conversations" in data else ("messages", "role", "content")
            )
            messages = _message_list(record, data[key], key, role_key, content_key)
            if messages[-1]["role"] == "assistant" and "chosen" not in data:
                messages = messages[:-1]
                while messages and messages[-1]["role"] == "assistant":  # never: roles alternate
                    messages = messages[:-1]
            _check_order(record, messages, key, "user")
            return messages
        if "instruction" in data:
            # The answer is not needed; a placeholder keeps the alpaca parser's checks in one place.
            return _alpaca(Record({**data, "output": "-"}, record.file, record.line))[:-1]
        for key in ("prompt", "question", "query"):
            if key in data:
                if isinstance(data[key], list):
                    messages = _message_list(record, data[key], key, "role", "content")
                    _check_order(record, messages, key, "user")
                    return messages
                return [{"role": "user", "content": _string(record, data[key], key)}]
        raise record.error(
            f"no prompt found in keys {sorted(data)}; expected conversations/messages, prompt, question or instruction"
        )

    formats = {"prompt": (lambda d: True, prompt_messages)}

    def parse(record: Record, fn: Callable[[Record], list[dict]]) -> dict:
        return _with_tools(record, {"messages": fn(record)})

    return _load(files, formats, "prompt", parse, report)
