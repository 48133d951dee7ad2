"""Tool (function) calling: how each family writes tool schemas, calls and results as text, and parsing calls back.

Messages carry tool use the OpenAI way: an assistant message may hold ``tool_calls`` (``[{"type": "function",
"function": {"name", "arguments": dict}}]``), a ``{"role": "tool", "content"}`` message holds a result, and a
conversation may come with ``tools`` (``[{"type": "function", "function": <JSON schema>}]``); see
:mod:`medtrain.formats`.

A tokenizer whose own chat template handles tools (Qwen2.5, Qwen3, Llama 3.1+, ...) renders them itself
(``apply_chat_template(..., tools=...)``). Otherwise :func:`flatten_tools` rewrites the conversation into plain
system/user/assistant messages with one family's :class:`ToolFormat`: the schemas appended to the system text, the
calls written into the assistant text (so they are supervised, like any reply), the results as a user-side turn
(never supervised; templates with a dedicated role for it use their ``observation_format``).

:func:`parse_tool_calls` turns generated text back into ``(content, calls)`` for inference and servers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["TOOL_FORMATS", "ToolFormat", "flatten_tools", "get_tool_format", "parse_tool_calls", "tool_format_of"]


def _dumps(value: Any, **kwargs) -> str:
    # As the Jinja ``tojson`` filter of transformers' chat templates: ", " and ": " separators, UTF-8 kept.
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _schema(tool: dict) -> dict:
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def _call(call: dict) -> tuple[str, Any]:
    function = call["function"] if isinstance(call.get("function"), dict) else call
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return function["name"], arguments


@dataclass(frozen=True)
class ToolFormat:
    """One family's text for tools. ``parse`` returns ``(content, [{"name", "arguments"}])``."""

    name: str
    tools_text: Callable[[list[dict]], str]  # the block appended to the system text
    calls_text: Callable[[list[dict]], str]  # an assistant turn's calls
    results_text: Callable[[list[str]], str]  # consecutive tool results, as one turn's text
    parse: Callable[[str], tuple[str, list[dict]]]
    reference: str = ""
    # Texts a call can start with: a streaming server sends the answer as content up to the first of them and holds
    # the rest until the answer ends and ``parse`` has split it ("" = a call may be the whole reply: hold it all).
    call_starts: tuple[str, ...] = ("",)


def _json_objects(text: str) -> list[tuple[int, int, Any]]:
    """``(start, end, value)`` of every top-level JSON object or array in ``text``."""
    decoder = json.JSONDecoder()
    found, pos = [], 0
    while True:
        match = re.compile(r"[\[{]").search(text, pos)
        if not match:
            return found
        try:
            value, end = decoder.raw_decode(text, match.start())
        except ValueError:
            pos = match.start() + 1
            continue
        found.append((match.start(), end, value))
        pos = end


def _as_call(value: Any, arguments_key: str = "arguments") -> dict | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if isinstance(arguments, dict):
            return {"name": value["name"], "arguments": arguments}
    return None


# ---- default: a plain text format for models without one of their own ----------------------------------------------

def _default_tools(tools: list[dict]) -> str:
    lines = "\n".join(_dumps(_schema(t)) for t in tools)
    return ("# Tools\n\nYou can call the following functions (JSON schemas, one per line):\n" + lines
            + "\n\nTo call functions, answer only with one block per call:\n"
            "Action: <function name>\nAction Input: <the arguments as a JSON object>")


def _default_calls(calls: list[dict]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {_dumps(args)}" for name, args in map(_call, calls))


_ACTION = re.compile(r"Action:\s*([^\n]+?)\s*\nAction Input:\s*")


def _default_parse(text: str) -> tuple[str, list[dict]]:
    calls, content_end = [], None
    for match in _ACTION.finditer(text):
        found = _json_objects(text[match.end():])
        if not found or found[0][0] != 0 or not isinstance(found[0][2], dict):
            continue
        calls.append({"name": match.group(1), "arguments": found[0][2]})
        content_end = match.start() if content_end is None else content_end
    return (text if content_end is None else text[:content_end]).strip(), calls


# ---- qwen: <tool_call> blocks (Qwen2.5 / Qwen3 / QwQ chat templates) ------------------------------------------------

def _qwen_tools(tools: list[dict]) -> str:
    schemas = "".join("\n" + _dumps(t) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + schemas
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def _qwen_calls(calls: list[dict]) -> str:
    return "\n".join(f'<tool_call>\n{{"name": "{name}", "arguments": {_dumps(args)}}}\n</tool_call>'
                     for name, args in map(_call, calls))


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _qwen_parse(text: str) -> tuple[str, list[dict]]:
    # Well-formed blocks become calls and leave the content; a malformed block stays in it, as vLLM's hermes parser
    # does, so the client sees what the model wrote.
    calls, content, end = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        found = _json_objects(match.group(1))
        call = _as_call(found[0][2]) if found else None
        if call:
            calls.append(call)
            content.append(text[end:match.start()])
            end = match.end()
    content.append(text[end:])
    return "".join(content).strip(), calls


# ---- llama3: JSON {"name", "parameters"} (Llama 3.1/3.2 JSON tool calling), results in an ipython turn --------------

def _llama3_tools(tools: list[dict]) -> str:
    return ("You have access to the following functions. To call a function, please respond with JSON for a function "
            "call. Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and "
            "its value}. Do not use variables.\n\n" + "\n\n".join(_dumps(t, indent=4) for t in tools))


def _llama3_calls(calls: list[dict]) -> str:
    return "\n".join(_dumps({"name": name, "parameters": args}) for name, args in map(_call, calls))


def _json_calls_parse(text: str, arguments_key: str) -> tuple[str, list[dict]]:
    calls, start = [], None
    for begin, _, value in _json_objects(text):
        values = value if isinstance(value, list) else [value]
        parsed = [_as_call(v, arguments_key) for v in values]
        if parsed and all(parsed):
            calls.extend(parsed)
            start = begin if start is None else start
    return (text if start is None else text[:start]).strip(), calls


# ---- mistral: [TOOL_CALLS] [{"name", "arguments"}] (mistral-common v3+) -------------------------------------------

def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps(tools) + "[/AVAILABLE_TOOLS]"


def _mistral_calls(calls: list[dict]) -> str:
    return "[TOOL_CALLS] " + _dumps([{"name": name, "arguments": args} for name, args in map(_call, calls)])


def _mistral_parse(text: str) -> tuple[str, list[dict]]:
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        return text.strip(), []
    _, calls = _json_calls_parse(text[at + len("[TOOL_CALLS]"):], "arguments")
    return (text[:at] if calls else text).strip(), calls  # no well-formed call: the text stays the content


# ---- glm4: "name\n{arguments}" replies, tools listed in the system turn (GLM-4-9B-chat) ------------------------------

def _glm4_tools(tools: list[dict]) -> str:
    return "# 可用工具" + "".join(
        f"\n\n## {_schema(t)['name']}\n\n{_dumps(_schema(t), indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        for t in tools)


def _glm4_calls(calls: list[dict]) -> str:
    return "\n".join(f"{name}\n{_dumps(args)}" for name, args in map(_call, calls))


def _glm4_parse(text: str) -> tuple[str, list[dict]]:
    name, _, rest = text.strip().partition("\n")
    found = _json_objects(rest)
    if name and re.fullmatch(r"[\w.\-]+", name) and found and found[0][0] == len(rest) - len(rest.lstrip()) \
            and isinstance(found[0][2], dict):
        return "", [{"name": name, "arguments": found[0][2]}]
    return text.strip(), []


def _joined(wrap: str) -> Callable[[list[str]], str]:
    return lambda results: "\n".join(wrap.format(content=r) for r in results)


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": ToolFormat("default", _default_tools, _default_calls, _joined("Observation: {content}"), _default_parse,
                          "medtrain's own (for models without a tool format): Action / Action Input blocks",
                          call_starts=("Action:",)),
    "qwen": ToolFormat("qwen", _qwen_tools, _qwen_calls, _joined("<tool_response>\n{content}\n</tool_response>"),
                       _qwen_parse, "Qwen/Qwen2.5-7B-Instruct chat_template", call_starts=("<tool_call>",)),
    "llama3": ToolFormat("llama3", _llama3_tools, _llama3_calls, _joined("{content}"),
                         lambda text: _json_calls_parse(text, "parameters"),
                         "meta-llama/Llama-3.1-8B-Instruct chat_template (JSON tool calling); LLaMA-Factory llama3",
                         call_starts=("{", "[")),
    "mistral": ToolFormat("mistral", _mistral_tools, _mistral_calls, _joined('{{"content": {content}}}'),
                          _mistral_parse, "mistral-common v3 tokenizer; LLaMA-Factory mistral",
                          call_starts=("[TOOL_CALLS]",)),
    "glm4": ToolFormat("glm4", _glm4_tools, _glm4_calls, _joined("{content}"), _glm4_parse,
                       "THUDM/glm-4-9b-chat chat_template; LLaMA-Factory glm4"),
}


def get_tool_format(name: str) -> ToolFormat:
    from .errors import ConfigError

    if name not in TOOL_FORMATS:
        raise ConfigError(f"unknown tool format {name!r}; choose one of: {', '.join(sorted(TOOL_FORMATS))}")
    return TOOL_FORMATS[name]


def has_tool_use(messages: list[dict], tools: list | None) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def flatten_tools(messages: list[dict], tools: list | None, tool_format: ToolFormat,
                  default_system: str = "") -> list[dict]:
    """``messages`` with tool use written as text in ``tool_format``: only system/user/assistant remain.

    Tool schemas follow the system text (the conversation's, else ``default_system``) after a blank line; an
    assistant's calls follow its text on a new line; consecutive tool results become one user-side message marked
    ``"observation": True`` (templates with a dedicated results role render it with their ``observation_format``).
    """
    out: list[dict] = []
    rest = list(messages)
    if tools:
        system = default_system
        if rest and rest[0]["role"] == "system":
            system = rest.pop(0)["content"]
        block = tool_format.tools_text(tools)
        out.append({"role": "system", "content": f"{system}\n\n{block}" if system else block})
    results: list[str] = []
    for message in rest:
        if message["role"] == "tool":
            results.append(message["content"])
            continue
        if results:
            out.append({"role": "user", "content": tool_format.results_text(results), "observation": True})
            results = []
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = tool_format.calls_text(message["tool_calls"])
            text = message.get("content") or ""
            message = {**{k: v for k, v in message.items() if k != "tool_calls"},
                       "content": f"{text}\n{calls}" if text else calls}
            if not text:
                message["tool_call_only"] = True
        out.append(message)
    if results:
        out.append({"role": "user", "content": tool_format.results_text(results), "observation": True})
    return out


def tool_format_of(chat_format: Any) -> ToolFormat:
    """The tool format a chat format generates calls in: a registered template's own, or for a tokenizer's template
    the family its text shows (``<tool_call>``: qwen, ``[TOOL_CALLS]``: mistral, ``ipython``: llama3,
    ``<|observation|>``: glm4), else the default."""
    if isinstance(chat_format, str):
        return get_tool_format(chat_format)
    template = getattr(chat_format, "template", None)
    if template is not None:
        return get_tool_format(template.tool_format)
    source = getattr(getattr(chat_format, "tokenizer", None), "chat_template", None) or ""
    source = source if isinstance(source, str) else json.dumps(source)
    for marker, name in (("<tool_call>", "qwen"), ("[TOOL_CALLS]", "mistral"), ("ipython", "llama3"),
                         ("<|observation|>", "glm4")):
        if marker in source:
            return TOOL_FORMATS[name]
    return TOOL_FORMATS["default"]


def parse_tool_calls(text: str, chat_format: Any = "default") -> tuple[str, list[dict]]:
    """Split generated text into ``(content, calls)``; each call is ``{"name": str, "arguments": dict}``.

    ``chat_format`` is the chat format the model was trained with (or a tool format name). Text with no
    well-formed call gives ``(text, [])``: a malformed call is left in the content, never guessed at.
    """
    return tool_format_of(chat_format).parse(text)
