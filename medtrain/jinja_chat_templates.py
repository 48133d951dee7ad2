"""A chat format as a Jinja chat template, for engines that render prompts from the tokenizer files (vLLM, SGLang,
TGI, ``tokenizer.apply_chat_template``).

:func:`jinja_chat_template` returns a template that renders, byte for byte, what the chat format renders: for a
conversation ending with a user message, ``apply_chat_template(..., add_generation_prompt=True)`` equals
``chat_format.generation_prompt(messages)``; for one ending with an assistant message, the training rendering
(``"".join`` of ``chat_format.dialog``). merge_peft_adapter.py writes it into the merged model's tokenizer files, so
``vllm serve merged-dir`` prompts the model as training did.

Registered templates put the assistant header at the end of each user turn, so their Jinja form writes it after
every user message whatever ``add_generation_prompt`` says (a conversation ending with a user turn is always a
prompt for an answer). A recorded system prompt becomes the default system message; a request's own system message
wins, as in training.
"""

from __future__ import annotations

import json
import string
from typing import Any

from .chat_format import TemplateChatFormat, TokenizerChatFormat


def _literal(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON escapes are valid Jinja/Python escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _format_expr(fmt: str, **variables: str) -> str:
    """A ``str.format`` pattern (``"USER: {content} ASSISTANT:"``) as a Jinja expression over ``variables``."""
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(fmt):
        if literal:
            parts.append(_literal(literal))
        if name is not None:
            parts.append(f"({variables[name]})")
    return " ~ ".join(parts) if parts else '""'


def _template_jinja(template: Any, system_prompt: str | None) -> str:
    default_system = template.system_prompt if system_prompt is None else system_prompt

    def text(role: str, var: str) -> str:
        return f"({var} | trim)" if role in template.strip_roles else var

    system_block = _format_expr(template.system_format, content=text("system", "system"))
    user = _format_expr(template.user_format, content="user_text", idx="(loop.index0 // 2 + 1)")
    answer = _format_expr(template.assistant_format, content="answer_text")
    # Reasoning (templates.ConversationTemplate._answer_piece): a think block when the turn has reasoning (kept in
    # history only with history_reasoning) and always on the final turn of a family whose generation prompt opens
    # it. (A prompt ends with the generation prefix instead: it opens the block the model completes.)
    think = _format_expr(template.think_format, reasoning="(reasoning | trim('\n'))")
    prefix = _literal(template.generation_prefix)
    reasoning_block = "".join([
        f"{{%- set reasoning = (message['reasoning_content'] or '') if {'true' if template.thinking else 'false'} "
        "else '' -%}",
        f"{{%- set answer_text = {text('assistant', 'message[' + repr('content') + ']')} -%}}",
        f"{{%- if (reasoning and (loop.last or {'true' if template.history_reasoning else 'false'})) or "
        f"(loop.last and {prefix}) -%}}",
        f"{{%- set think = {think} -%}}{{%- set answer_text = answer_text.lstrip('\n') -%}}",
        "{%- else -%}{%- set think = '' -%}{%- endif -%}",
    ])
    has_block = "true" if template.always_system else "(system | length > 0)"
    user_content = text("user", "message['content']")
    if template.system_in_first_user:
        first_head, first_user = _literal(template.bos), f"block ~ {user_content}"
    else:
        first_head, first_user = f"{_literal(template.bos)} ~ block", user_content
    return "".join([
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {_literal(default_system)} -%}}{{%- set turns = messages -%}}",
        "{%- endif -%}",
        f"{{%- set block = ({system_block}) if {has_block} else '' -%}}",
        "{%- for message in turns -%}",
        "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}",
        "{{- raise_exception('after an optional system message, roles must alternate user/assistant from user') -}}",
        "{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if loop.first -%}",
        f"{{%- set user_text = {first_user} -%}}{{{{- {first_head} -}}}}",
        "{%- else -%}",
        f"{{%- set user_text = {user_content} -%}}{{{{- {_literal(template.sep)} -}}}}",
        "{%- endif -%}",
        f"{{{{- {user} -}}}}",
        f"{{%- if loop.last -%}}{{{{- {prefix} -}}}}{{%- endif -%}}",
        "{%- else -%}",
        reasoning_block,
        f"{{{{- think ~ {answer} ~ {_literal(template.stop_str)} -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ])


def jinja_chat_template(chat_format: Any) -> str | None:
    """The Jinja chat template that renders like ``chat_format`` (None: the tokenizer's own template, unchanged)."""
    if isinstance(chat_format, TemplateChatFormat):
        return _template_jinja(chat_format.template, chat_format.system_prompt)
    if isinstance(chat_format, TokenizerChatFormat):
        original = chat_format.tokenizer.chat_template
        if chat_format.system_prompt is None or not isinstance(original, str):
            return original if isinstance(original, str) else None
        # the recorded system prompt is the default system message, as TokenizerChatFormat inserts it
        return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                f"{{%- set messages = [{{'role': 'system', 'content': {_literal(chat_format.system_prompt)}}}] "
                "+ messages -%}{%- endif -%}" + original)
    raise TypeError(f"unknown chat format {type(chat_format).__name__}")
