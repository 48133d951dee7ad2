"""One interface over our conversation templates and a tokenizer's own chat template.

Both produce, for a conversation, the per-turn ``(prompt_text, answer_text)`` pieces training tokenises (only
answer pieces are supervised) and, for generation, the prompt string. Choosing one is :func:`get_chat_format`:
``--template_name`` if given, else the tokenizer's chat template if it has one, else ``vicuna``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UserError
from .templates import get_conv_template
from .tools import flatten_tools, get_tool_format, has_tool_use, tool_format_of

DEFAULT_TEMPLATE = "vicuna"
RECORD_FILE = "medtrain_chat_format.json"


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Insert ``system_prompt`` as a system message unless the conversation brings its own."""
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


@dataclass
class TemplateChatFormat:
    """A registered conversation template (``template.py``)."""

    template: Any
    system_prompt: str | None = None

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def stop_str(self) -> str:
        return self.template.stop_str

    def _plain(self, messages: list[dict], tools: list | None) -> list[dict]:
        """Tool use written as text in the template's tool format (see medtrain.tools)."""
        if not has_tool_use(messages, tools):
            return messages
        default = self.system_prompt if self.system_prompt is not None else self.template.system_prompt
        return flatten_tools(messages, tools, get_tool_format(self.template.tool_format), default)

    def samples(self, messages: list[dict], tools: list | None = None) -> list[list[tuple[str, str]]]:
        return self.template.get_samples(self._plain(messages, tools), self.system_prompt)

    def generation_prompt(self, messages: list[dict], tools: list | None = None) -> str:
        return self.template.get_prompt(self._plain(messages, tools), self.system_prompt)

    def dialog(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, str]]:
        return dialog(self, messages, tools)

    def record(self) -> dict:
        return {"kind": "template", "template_name": self.name, "system_prompt": self.system_prompt}


@dataclass
class TokenizerChatFormat:
    """The tokenizer's own Jinja chat template, split into supervised turns by rendering prefixes of the conversation.

    For every assistant message, its prompt is the template's generation prompt for the conversation before it,
    and its answer is what rendering the conversation through that message adds, up to and including the
    end-of-turn token (``stop_str``, the tokenizer's eos): exactly what the model must generate at inference.
    Templates that render every turn the same way later (ChatML, Llama 3) give one sample per conversation. Templates
    that rewrite history (Qwen3 drops the reasoning of earlier turns) give a new sample wherever a turn's prompt
    no longer continues the previous one (see :func:`medtrain.templates.split_samples`).
    """

    tokenizer: Any
    system_prompt: str | None = None

    name = "tokenizer"

    @property
    def stop_str(self) -> str:
        return self.tokenizer.eos_token or ""

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders tools and tool calls itself (it reads ``tools`` and ``tool_calls``)."""
        source = self.tokenizer.chat_template or ""
        return isinstance(source, str) and "tools" in source and "tool_calls" in source

    def _render(self, messages: list[dict], generation: bool, tools: list | None = None) -> str:
        if has_tool_use(messages, tools) and not self.supports_tools:
            messages, tools = flatten_tools(messages, tools, tool_format_of(self)), None
        kwargs = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)

    def _answer(self, history: list[dict], prompt: str, tools: list | None) -> str:
        full = self._render(history, generation=False, tools=tools)
        if not full.startswith(prompt):
            raise UserError(
                "the tokenizer's chat template renders a reply that does not continue its own generation prompt, "
                "so the supervised text cannot be derived from it; pass --template_name instead"
            )
        answer = full[len(prompt):]
        stop = self.stop_str
        cut = answer.rfind(stop) + len(stop) if stop and stop in answer else len(answer.rstrip())
        return answer[:cut]

    def samples(self, messages: list[dict], tools: list | None = None) -> list[list[tuple[str, str]]]:
        from .templates import split_samples

        return split_samples(
            _with_system(messages, self.system_prompt),
            lambda history: self._render(history, generation=True, tools=tools),
            lambda history, prompt: self._answer(history, prompt, tools),
        )

    def generation_prompt(self, messages: list[dict], tools: list | None = None) -> str:
        return self._render(_with_system(messages, self.system_prompt), generation=True, tools=tools)

    def dialog(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, str]]:
        return dialog(self, messages, tools)

    def record(self) -> dict:
        return {"kind": "tokenizer", "template_name": None, "system_prompt": self.system_prompt}


def prompt_pieces(chat_format: Any, messages: list[dict], tools: list | None = None) -> list[tuple[str, str]]:
    """The pieces of the sample that ends with a reply to ``messages`` (ending with a user or tool turn), with the
    reply left out: tokenised like training tokenises them, they are the ids of the generation prompt."""
    pieces = chat_format.samples(list(messages) + [{"role": "assistant", "content": ""}], tools)[-1]
    return pieces[:-1] + [(pieces[-1][0], "")]


def dialog(chat_format: Any, messages: list[dict], tools: list | None = None) -> list[tuple[str, str]]:
    """The one sample of a conversation whose format does not rewrite history (an error otherwise)."""
    samples = chat_format.samples(messages, tools)
    if len(samples) != 1:
        raise UserError("this chat format rewrites earlier turns: a conversation gives several samples")
    return samples[0]


ChatFormat = TemplateChatFormat | TokenizerChatFormat


def get_chat_format(tokenizer: Any, template_name: str | None, system_prompt: str | None = None) -> ChatFormat:
    """``--template_name`` if given; else the tokenizer's chat template; else vicuna (the seed's base-model default)."""
    if not template_name and getattr(tokenizer, "chat_template", None):
        return TokenizerChatFormat(tokenizer, system_prompt)

    return TemplateChatFormat(get_conv_template(template_name or DEFAULT_TEMPLATE), system_prompt)


def save_chat_format(chat_format: ChatFormat, output_dir: str) -> str:
    """Record the format used for training so inference (and the next stage) renders the same way."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RECORD_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(chat_format.record(), fh, ensure_ascii=False, indent=2)
    return path


def load_recorded_chat_format(model_dir: str) -> dict | None:
    """The format recorded by a training run in ``model_dir`` (None when there is none)."""
    path = os.path.join(model_dir, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def resolve_chat_format(
    tokenizer: Any, model_dirs: list[str], template_name: str | None, system_prompt: str | None
) -> ChatFormat:
    """For inference/next stages: an explicit template wins, else what training recorded, else the defaults."""
    if template_name:
        return get_chat_format(tokenizer, template_name, system_prompt)
    for model_dir in model_dirs:
        if model_dir and os.path.isdir(model_dir):
            recorded = load_recorded_chat_format(model_dir)
            if recorded:
                prompt = system_prompt if system_prompt is not None else recorded.get("system_prompt")
                if recorded["kind"] == "template":
                    return get_chat_format(tokenizer, recorded["template_name"], prompt)
                if not getattr(tokenizer, "chat_template", None):
                    raise ConfigError(
                        f"{model_dir}: training used the tokenizer's chat template but this tokenizer has none; "
                        "pass the training tokenizer (--tokenizer_name_or_path) or --template_name"
                    )
                return TokenizerChatFormat(tokenizer, prompt)
    return get_chat_format(tokenizer, None, system_prompt)
