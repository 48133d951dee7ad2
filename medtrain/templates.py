"""Conversation templates: each model family's published chat format, split into supervised turns.

A template turns ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
leading system message, then user/assistant alternating from user) into one ``(prompt_piece, answer_piece)`` pair
per turn. Training tokenises each piece and labels only answer pieces, so where a piece ends decides masking:

* ``answer_piece`` is the assistant text plus the end-of-turn marker (``stop_str``) and nothing after it: the text
  the model must generate. Whatever the format puts between that marker and the next user turn (ChatML's "\\n")
  is ``sep`` and opens the next prompt piece.
* the first prompt piece carries any BOS literal the official template writes (``<s>``, ``<|begin_of_text|>``)
  and the system block.
* ``get_prompt`` (conversation ending with a user turn) is the completed pairs plus the last prompt piece, which
  ends with the assistant header: byte for byte what the family's template gives with
  ``add_generation_prompt=True``.
* ``render`` is the pairs joined. It stops at the last ``stop_str``: a separator the official format puts after the
  final answer (ChatML's "\\n", Phi-3's "\\n<|endoftext|>") is not part of any turn, so it is left out.

System text precedence: a system message in ``messages`` > the ``system_prompt`` argument > the template default.
A custom system prompt replaces only that text, never the wrapper. An empty system text renders no system block,
except in families whose official template always has one (qwen, smollm2: ``always_system``). Families with no
system slot (mistral, gemma, chatglm2, orion) put "system text + blank line" at the start of the first user message,
which is what Mistral's and Gemma 3's own templates do.

Every template below names its reference. Deviations from it are documented on the template; the common one:
baichuan, baichuan2, chatglm2 and chatglm3 have no end-of-turn text in their inference format (their own training
code teaches the stop with a label shifted onto the next user token, which text pieces cannot express), so their
answers end with the tokenizer's EOS text ``</s>``, as MedicalGPT does; history in ``get_prompt`` carries it too,
so generation sees what training saw.

Markers such as ``</s>`` are literal text: they become the special token only with a tokenizer that defines them.
For a base model whose EOS differs, use ``dataclasses.replace(template, stop_str=tokenizer.eos_token)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, DataError

__all__ = [
    "DEFAULT_TEMPLATE",
    "ConversationTemplate",
    "get_conv_template",
    "list_templates",
    "register_conv_template",
]

DEFAULT_TEMPLATE = "vicuna"  # for base models without a chat template (as in FastChat and MedicalGPT)

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ConversationTemplate:
    """One family's chat format. Format strings take ``{content}`` (and ``{idx}``, the 1-based round, in users)."""

    name: str
    system_prompt: str  # default system text ("" when the family has none)
    stop_str: str  # end-of-turn text closing every answer piece
    user_format: str  # one user turn, ending with the assistant header
    assistant_format: str = "{content}"  # the answer before stop_str (" {content}" where a space follows "ASSISTANT:")
    system_format: str = "{content}"  # the system block wrapper
    bos: str = ""  # literal the official template writes once at the start
    sep: str = ""  # text after stop_str and before the next user turn
    system_in_first_user: bool = False  # no system slot: the system block goes inside the first user message
    always_system: bool = False  # render the system block even when its text is empty
    strip_roles: tuple[str, ...] = ()  # roles whose content the official template strips of outer whitespace
    reference: str = ""  # where the format is published
    # Reasoning (``reasoning_content`` of an assistant message). ``think_format`` wraps it before the answer text;
    # ``generation_prefix`` is what a generation prompt writes after the assistant header (Qwen3: "<think>\n"):
    # the reply the model generates is the rest of the think block, so it must be a prefix of that block.
    think_format: str = "<think>\n{reasoning}\n</think>\n\n"
    generation_prefix: str = ""
    history_reasoning: bool = True  # False: earlier turns are rendered without their reasoning (Qwen3, DeepSeek-R1)
    thinking: bool = True  # False (no-think variants): reasoning is never rendered, the think block stays empty
    # Tool calling (medtrain.tools): the family's text format for tool schemas, calls and results, and the prompt
    # piece for a turn of tool results where the family has a role for them ("" = a user turn).
    tool_format: str = "default"
    observation_format: str = ""
    call_format: str = ""  # an assistant turn that only calls tools, where it differs from assistant_format

    def __post_init__(self) -> None:
        if self.generation_prefix and not self.think_format.format(reasoning="").startswith(self.generation_prefix):
            raise ValueError(f"{self.name}: generation_prefix must start the rendered think_format")

    @property
    def rewrites_history(self) -> bool:
        """True when a turn renders differently once it is history (so one sequence cannot train every turn)."""
        return bool(self.generation_prefix) or not self.history_reasoning

    # ---- building blocks -------------------------------------------------------------------------------------

    def _split(self, messages: list[dict], system_prompt: str | None) -> tuple[str, list[dict], list[dict]]:
        """Validate ``messages``; return the system text, the user messages and the assistant messages."""
        if not isinstance(messages, list) or not messages:
            raise DataError("expected a non-empty list of {'role', 'content'} messages", field="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                got = message.get("role") if isinstance(message, dict) else type(message).__name__
                raise DataError(f"expected a role in {list(_ROLES)}, got {got!r}", field=f"messages[{i}].role")
            if not isinstance(message.get("content"), str):
                raise DataError("expected a string", field=f"messages[{i}].content")
            if not isinstance(message.get("reasoning_content", ""), str):
                raise DataError("expected a string", field=f"messages[{i}].reasoning_content")

        system = self.system_prompt if system_prompt is None else system_prompt
        start = 0
        if messages[0]["role"] == "system":
            system, start = messages[0]["content"], 1
        users: list[dict] = []
        answers: list[dict] = []
        for i, message in enumerate(messages[start:], start):
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise DataError(
                    f"expected {expected!r}, got {message['role']!r} (after an optional leading system message, "
                    "roles alternate user/assistant starting with user)",
                    field=f"messages[{i}].role",
                )
            if expected == "user":
                users.append(message)
            else:
                answers.append(message)
        if not users:
            raise DataError("the conversation has no user message", field="messages")
        return system, users, answers

    def _text(self, role: str, content: str) -> str:
        return content.strip() if role in self.strip_roles else content

    def _prompt_piece(self, turn: int, message: dict, system: str) -> str:
        """Prompt piece of turn ``turn`` (0-based): sep or BOS + system block, then the user turn (or tool results,
        in ``observation_format`` where the family has a role for them)."""
        user = self._text("user", message["content"])
        head = self.sep
        if message.get("observation") and self.observation_format and turn > 0:
            return head + self.observation_format.format(content=user)
        if turn == 0:
            block = ""
            if system or self.always_system:
                block = self.system_format.format(content=self._text("system", system))
            head = self.bos
            if self.system_in_first_user:
                user = block + user
            else:
                head += block
        return head + self.user_format.format(content=user, idx=turn + 1)

    def _answer_piece(self, answer: dict, last: bool = False) -> str:
        """The assistant text + stop_str. ``last``: as the final turn (after a generation prompt), else as history.

        A think block is written when the turn has reasoning (kept in history only with ``history_reasoning``), and
        always on the final turn of a family whose generation prompt opens it; the generation prefix is then cut,
        since the prompt already holds it.
        """
        content = self._text("assistant", answer["content"])
        reasoning = answer.get("reasoning_content") or "" if self.thinking else ""
        think = ""
        if (reasoning and (last or self.history_reasoning)) or (last and self.generation_prefix):
            think = self.think_format.format(reasoning=reasoning.strip("\n"))
            content = content.lstrip("\n")
        if last:
            think = think[len(self.generation_prefix):]
        wrapper = self.call_format if answer.get("tool_call_only") and self.call_format else self.assistant_format
        return think + wrapper.format(content=content) + self.stop_str

    # ---- public API ------------------------------------------------------------------------------------------

    def get_dialog(self, messages: list[dict], system_prompt: str | None = None) -> list[tuple[str, str]]:
        """One ``(prompt_piece, answer_piece)`` per user/assistant pair; ``messages`` must end with an answer."""
        system, users, answers = self._split(messages, system_prompt)
        if len(answers) != len(users):
            raise DataError("the conversation must end with an assistant message", field="messages")
        pairs = enumerate(zip(users, answers))
        return [(self._prompt_piece(t, user, system), self._answer_piece(answer)) for t, (user, answer) in pairs]

    def get_prompt(self, messages: list[dict], system_prompt: str | None = None) -> str:
        """The generation prompt: completed pairs, then the last user turn up to the assistant header."""
        system, users, answers = self._split(messages, system_prompt)
        if len(answers) == len(users):
            raise DataError("the conversation must end with a user message to prompt for an answer", field="messages")
        done = "".join(self._prompt_piece(t, u, system) + self._answer_piece(a)
                       for t, (u, a) in enumerate(zip(users, answers)))
        return done + self._prompt_piece(len(answers), users[-1], system) + self.generation_prefix

    def get_samples(self, messages: list[dict], system_prompt: str | None = None) -> list[list[tuple[str, str]]]:
        """Training samples: each assistant turn in the context :meth:`get_prompt` gives it when it is the last turn.

        For families that render a turn the same way as history and as the last turn this is one sample (equal to
        :meth:`get_dialog`); for those that rewrite history (reasoning dropped from earlier turns) a turn starts a
        new sample whenever its prompt no longer continues the previous sample (see :func:`split_samples`).
        """
        if not self.rewrites_history:
            return [self.get_dialog(messages, system_prompt)]
        self._split(messages, system_prompt)  # validate once, with the whole conversation's field names
        return split_samples(
            messages,
            lambda history: self.get_prompt(history, system_prompt),
            lambda history, prompt: self._answer_piece(history[-1], last=True),
        )

    def render(self, messages: list[dict], system_prompt: str | None = None) -> str:
        """The whole conversation as the last training sample holds it (for most families, ``get_dialog`` joined;
        for those that rewrite history, earlier turns as history and the last one with its reasoning).

        Ends with the last ``stop_str``; a separator the official format writes after the final answer (ChatML's
        "\\n") is omitted because no turn owns it.
        """
        return "".join(p + a for p, a in self.get_samples(messages, system_prompt)[-1])


def split_samples(messages: list[dict], prompt_text, answer_text) -> list[list[tuple[str, str]]]:
    """Split a conversation into training samples, each a list of ``(prompt_piece, answer_piece)``.

    For every assistant message ``i``: ``prompt_text(messages[:i])`` is the generation prompt a model sees before
    it, ``answer_text(messages[:i + 1], prompt)`` the reply it must generate (up to its end-of-turn). The turn
    joins the current sample when its prompt continues that sample's text exactly; otherwise (the format rewrote
    history, e.g. dropped earlier reasoning) it starts a new sample holding its own full prompt. So every supervised
    reply sits in exactly the context inference renders for it, and a format that never rewrites history gives one
    sample: no token is duplicated where it need not be.
    """
    samples: list[list[tuple[str, str]]] = []
    pieces: list[tuple[str, str]] = []
    done = ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = prompt_text(messages[:i])
        answer = answer_text(messages[: i + 1], prompt)
        if pieces and prompt.startswith(done):
            pieces.append((prompt[len(done):], answer))
        else:
            if pieces:
                samples.append(pieces)
            pieces = [(prompt, answer)]
        done = prompt + answer
    if not pieces:
        raise DataError("the conversation has no assistant message to train on", field="messages")
    samples.append(pieces)
    return samples


# A global registry of conversation templates, by name.
_TEMPLATES: dict[str, ConversationTemplate] = {}


def register_conv_template(template: ConversationTemplate, override: bool = False) -> None:
    """Add ``template`` to the registry; a name already taken raises ValueError unless ``override``."""
    if template.name in _TEMPLATES and not override:
        raise ValueError(f"conversation template {template.name!r} is already registered (pass override=True)")
    _TEMPLATES[template.name] = template


def get_conv_template(name: str) -> ConversationTemplate:
    """The registered template ``name``; an unknown name raises ConfigError listing the known ones."""
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown conversation template {name!r}; choose one of: {', '.join(list_templates())}"
        ) from None


def list_templates() -> list[str]:
    """Names of all registered templates, sorted."""
    return sorted(_TEMPLATES)


# ---- the families ------------------------------------------------------------------------------------------------
# Strings are copied from each reference's text; "\n" and spaces are significant.

_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"


def _chatml(name: str, system_prompt: str = "", reference: str = "", **kwargs) -> ConversationTemplate:
    return ConversationTemplate(
        name=name, system_prompt=system_prompt, stop_str="<|im_end|>", user_format=_CHATML_USER,
        system_format=_CHATML_SYSTEM, sep="\n", reference=reference, **kwargs,
    )


# FastChat vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>"): "SYS USER: q ASSISTANT: a</s>USER: ...".
# The model writes " a" after "ASSISTANT:", so the space belongs to the answer. FastChat keeps a leading " " when
# the system text is empty; we render nothing then.
register_conv_template(ConversationTemplate(
    name="vicuna",
    system_prompt="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    stop_str="</s>",
    system_format="{content} ",
    user_format="USER: {content} ASSISTANT:",
    assistant_format=" {content}",
    reference="lm-sys/FastChat fastchat/conversation.py, vicuna_v1.1",
))

# Stanford Alpaca train.py PROMPT_DICT["prompt_no_input"] + target "{output}{eos}": the answer follows
# "### Response:" directly. Alpaca is single-turn; later turns follow the EOS after a blank line.
register_conv_template(ConversationTemplate(
    name="alpaca",
    system_prompt="Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    stop_str="</s>",
    system_format="{content}\n\n",
    user_format="### Instruction:\n{content}\n\n### Response:",
    sep="\n\n",
    reference="tatsu-lab/stanford_alpaca train.py PROMPT_DICT",
))

register_conv_template(_chatml("chatml", reference="ChatML (openai/openai-python chatml.md); no default system"))

register_conv_template(_chatml(
    "qwen",
    system_prompt="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    tool_format="qwen",
    always_system=True,  # the Qwen2.5 template injects the default when no system message is given
    reference="Qwen/Qwen2.5-7B-Instruct tokenizer_config.json chat_template (Qwen2/2.5)",
))

register_conv_template(_chatml(
    "smollm2",
    system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face",  # no final period
    always_system=True,
    reference="HuggingFaceTB/SmolLM2-135M-Instruct chat_template",
))

register_conv_template(_chatml("yi", reference="01-ai/Yi-34B-Chat tokenizer_config.json chat_template"))

register_conv_template(_chatml(
    "intern2",
    system_prompt="You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文.",
    bos="<s>",
    reference="internlm/internlm2-chat-7b chat_template (BOS + ChatML); default system: meta_instruction, chat()",
))

# Llama-2-chat: BOS before every [INST]; the system block sits inside the first [INST]; answers are " a </s>".
# No default system: the HF template's default prompt is disabled; pass Meta's old one as system_prompt if wanted.
_LLAMA2 = dict(
    stop_str="</s>",
    system_format="<<SYS>>\n{content}\n<</SYS>>\n\n",
    user_format="<s>[INST] {content} [/INST]",
    assistant_format=" {content} ",
    system_in_first_user=True,
    strip_roles=("user", "assistant"),
)
register_conv_template(ConversationTemplate(
    name="llama2", system_prompt="", reference="meta-llama/Llama-2-7b-chat-hf chat_template", **_LLAMA2,
))
register_conv_template(ConversationTemplate(
    name="llama2-zh",
    system_prompt="You are a helpful assistant. 你是一个乐于助人的助手。",
    reference="ymcui/Chinese-LLaMA-Alpaca-2 DEFAULT_SYSTEM_PROMPT in the Llama-2-chat format",
    **_LLAMA2,
))

register_conv_template(ConversationTemplate(
    name="llama3",
    system_prompt="",
    stop_str="<|eot_id|>",
    bos="<|begin_of_text|>",
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    strip_roles=("system", "user", "assistant"),
    tool_format="llama3",
    observation_format="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    reference="meta-llama/Meta-Llama-3-8B-Instruct chat_template; tools as Llama 3.1 JSON tool calling",
))

# Mistral-7B-Instruct-v0.1 template as updated to match mistral-common's v1 tokenizer: " [INST] q [/INST] a</s>".
register_conv_template(ConversationTemplate(
    name="mistral",
    system_prompt="",
    stop_str="</s>",
    bos="<s>",
    system_format="{content}\n\n",
    user_format=" [INST] {content} [/INST]",
    assistant_format=" {content}",
    system_in_first_user=True,
    tool_format="mistral",
    call_format="{content}",  # "[/INST][TOOL_CALLS] [...]</s>": no space before the calls
    observation_format="[TOOL_RESULTS] {content}[/TOOL_RESULTS]",
    reference="mistralai/Mistral-7B-Instruct-v0.1 chat_template (mistral-common v1); tools as mistral-common v3",
))

# ChatGLM2 build_prompt: "[Round n]\n\n问：q\n\n答：a\n\n". Its tokenizer adds the [gMASK] sop prefix ids itself,
# so no literal here. No system slot. Deviation: "</s>" ends each answer (see the module docstring).
register_conv_template(ConversationTemplate(
    name="chatglm2",
    system_prompt="",
    stop_str="</s>",
    system_format="{content}\n\n",
    user_format="[Round {idx}]\n\n问：{content}\n\n答：",
    sep="\n\n",
    system_in_first_user=True,
    reference="THUDM/chatglm2-6b modeling_chatglm.py build_prompt",
))

# ChatGLM3 chat_template writes "[gMASK]sop" and "<|role|>\n content" (the space is SentencePiece's prefix).
# Deviation: "</s>" ends each answer; the official format ends a reply with the next role token.
register_conv_template(ConversationTemplate(
    name="chatglm3",
    system_prompt="",
    stop_str="</s>",
    bos="[gMASK]sop",
    system_format="<|system|>\n {content}",
    user_format="<|user|>\n {content}<|assistant|>",
    assistant_format="\n {content}",
    reference="THUDM/chatglm3-6b tokenizer_config.json chat_template",
))

# Baichuan(2) build_chat_input: system text, then user_token_id (195) + q + assistant_token_id (196) + a.
# Deviation: "</s>" ends each answer (see the module docstring).
register_conv_template(ConversationTemplate(
    name="baichuan",
    system_prompt="",
    stop_str="</s>",
    user_format="<reserved_102>{content}<reserved_103>",
    reference="baichuan-inc/Baichuan-13B-Chat generation_utils.py build_chat_input",
))
register_conv_template(ConversationTemplate(
    name="baichuan2",
    system_prompt="",
    stop_str="</s>",
    user_format="<reserved_106>{content}<reserved_107>",
    reference="baichuan-inc/Baichuan2-7B-Chat generation_utils.py build_chat_input",
))

# DeepSeek LLM chat: "User: q\n\nAssistant: a<eos>"; the generation prompt ends "Assistant:" (no space).
register_conv_template(ConversationTemplate(
    name="deepseek",
    system_prompt="",
    stop_str="<｜end▁of▁sentence｜>",
    bos="<｜begin▁of▁sentence｜>",
    system_format="{content}\n\n",
    user_format="User: {content}\n\nAssistant:",
    assistant_format=" {content}",
    reference="deepseek-ai/deepseek-llm-7b-chat chat_template",
))

register_conv_template(ConversationTemplate(
    name="deepseek3",
    system_prompt="",
    stop_str="<｜end▁of▁sentence｜>",
    bos="<｜begin▁of▁sentence｜>",
    user_format="<｜User｜>{content}<｜Assistant｜>",
    reference="deepseek-ai/DeepSeek-V3 chat_template (no tools)",
))

register_conv_template(ConversationTemplate(
    name="zephyr",
    system_prompt="",
    stop_str="</s>",
    system_format="<|system|>\n{content}</s>\n",
    user_format="<|user|>\n{content}</s>\n<|assistant|>\n",
    sep="\n",
    reference="HuggingFaceH4/zephyr-7b-beta chat_template",
))

# Gemma's template has no system role; the system text opens the first user turn, as Gemma 3's template does.
register_conv_template(ConversationTemplate(
    name="gemma",
    system_prompt="",
    stop_str="<end_of_turn>",
    bos="<bos>",
    system_format="{content}\n\n",
    user_format="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    sep="\n",
    system_in_first_user=True,
    strip_roles=("user", "assistant"),
    reference="google/gemma-7b-it chat_template; system as in google/gemma-3-*-it",
))

# The official render ends with "<|end|>\n<|endoftext|>" (eos when no generation prompt); render stops at <|end|>.
register_conv_template(ConversationTemplate(
    name="phi3",
    system_prompt="",
    stop_str="<|end|>",
    system_format="<|system|>\n{content}<|end|>\n",
    user_format="<|user|>\n{content}<|end|>\n<|assistant|>\n",
    sep="\n",
    reference="microsoft/Phi-3-mini-4k-instruct chat_template",
))

register_conv_template(ConversationTemplate(
    name="starchat",
    system_prompt="",
    stop_str="<|end|>",
    system_format="<|system|>\n{content}<|end|>\n",
    user_format="<|user|>\n{content}<|end|>\n<|assistant|>\n",
    sep="\n",
    reference="HuggingFaceH4/starchat-beta chat_template",
))

# XVERSE chat(): "SYS\n\n" + "Human: q\n\nAssistant: " + a + eos (id 3, "<|endoftext|>").
register_conv_template(ConversationTemplate(
    name="xverse",
    system_prompt="",
    stop_str="<|endoftext|>",
    system_format="{content}\n\n",
    user_format="Human: {content}\n\nAssistant: ",
    reference="xverse/XVERSE-13B-Chat modeling_xverse.py chat()",
))

# Orion build_chat_input: "<s>Human: q\n\nAssistant: </s>a</s>"; no system slot.
register_conv_template(ConversationTemplate(
    name="orion",
    system_prompt="",
    stop_str="</s>",
    bos="<s>",
    system_format="{content}\n\n",
    user_format="Human: {content}\n\nAssistant: </s>",
    system_in_first_user=True,
    reference="OrionStarAI/Orion-14B-Chat generation_utils.py build_chat_input",
))

register_conv_template(ConversationTemplate(
    name="cohere",
    system_prompt="",
    stop_str="<|END_OF_TURN_TOKEN|>",
    bos="<BOS_TOKEN>",
    system_format="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
    user_format="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    strip_roles=("user", "assistant"),
    reference="CohereForAI/c4ai-command-r-v01 chat_template (default)",
))

# ---- reasoning families: history rendered without reasoning, so a conversation trains as one sample per turn -----

# Qwen3 (thinking): the generation prompt opens "<think>\n"; the final turn always carries a think block (empty when
# the data has no reasoning), earlier turns keep only their answer. Checked byte for byte against the Qwen3 tokenizer's
# own template (tests/test_reasoning_templates.py). Tools: see medtrain.tools.
register_conv_template(_chatml(
    "qwen3",
    tool_format="qwen",
    generation_prefix="<think>\n",
    history_reasoning=False,
    reference="Qwen/Qwen3-4B-Thinking-2507 tokenizer_config.json chat_template (Qwen3 family)",
))

# Qwen3 with enable_thinking=False: the hybrid Qwen3 template then writes an empty think block into the generation
# prompt ("<think>\n\n</think>\n\n"), so the model answers directly; reasoning in the data is not trained.
register_conv_template(_chatml(
    "qwen3-nothink",
    tool_format="qwen",
    generation_prefix="<think>\n\n</think>\n\n",
    history_reasoning=False,
    thinking=False,
    reference="Qwen/Qwen3-8B tokenizer_config.json chat_template with enable_thinking=False",
))

# DeepSeek-R1: BOS + system text, "<｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>"; history drops everything up
# to "</think>"; the generation prompt opens "<think>\n". (Its template renders no reasoning even for the final turn;
# the reply we supervise is what the model generates after that prompt: "reasoning\n</think>\n\nanswer<eos>".)
register_conv_template(ConversationTemplate(
    name="deepseek-r1",
    system_prompt="",
    stop_str="<｜end▁of▁sentence｜>",
    bos="<｜begin▁of▁sentence｜>",
    user_format="<｜User｜>{content}<｜Assistant｜>",
    generation_prefix="<think>\n",
    history_reasoning=False,
    reference="deepseek-ai/DeepSeek-R1 tokenizer_config.json chat_template (revision with '<think>\\n' prompt)",
))

# ---- other current families -------------------------------------------------------------------------------------

# GLM-4: "[gMASK]<sop><|system|>\nS<|user|>\nQ<|assistant|>\nA". The official format ends a reply with the next role
# token (<|user|> / <|observation|> are eos ids); as LLaMA-Factory does, each answer ends with the eos text
# "<|endoftext|>" (a deviation: the official history has none).
register_conv_template(ConversationTemplate(
    name="glm4",
    system_prompt="",
    stop_str="<|endoftext|>",
    bos="[gMASK]<sop>",
    system_format="<|system|>\n{content}",
    user_format="<|user|>\n{content}<|assistant|>",
    assistant_format="\n{content}",
    tool_format="glm4",
    call_format="{content}",  # "<|assistant|>name\n{arguments}": no newline after the role token
    observation_format="<|observation|>\n{content}<|assistant|>",
    reference="THUDM/glm-4-9b-chat chat_template; LLaMA-Factory template glm4",
))

# Gemma 3: as gemma (system text opens the first user turn, contents trimmed).
register_conv_template(ConversationTemplate(
    name="gemma3",
    system_prompt="",
    stop_str="<end_of_turn>",
    bos="<bos>",
    system_format="{content}\n\n",
    user_format="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    sep="\n",
    system_in_first_user=True,
    strip_roles=("system", "user", "assistant"),
    reference="google/gemma-3-4b-it chat_template (text only)",
))

register_conv_template(ConversationTemplate(
    name="llama4",
    system_prompt="",
    stop_str="<|eot|>",
    bos="<|begin_of_text|>",
    system_format="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
    user_format="<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
    tool_format="llama3",
    observation_format="<|header_start|>ipython<|header_end|>\n\n{content}<|eot|>"
    "<|header_start|>assistant<|header_end|>\n\n",
    reference="meta-llama/Llama-4-Scout-17B-16E-Instruct chat_template (text only); LLaMA-Factory template llama4",
))

register_conv_template(ConversationTemplate(
    name="phi4",
    system_prompt="",
    stop_str="<|im_end|>",
    system_format="<|im_start|>system<|im_sep|>{content}<|im_end|>",
    user_format="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
    reference="microsoft/phi-4 tokenizer_config.json chat_template",
))

# Mistral tokenizer v7 (Mistral-Small-24B-Instruct-2501 and later): a real system slot, no spaces around [INST].
register_conv_template(ConversationTemplate(
    name="mistral-v7",
    system_prompt="",
    stop_str="</s>",
    bos="<s>",
    system_format="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
    user_format="[INST]{content}[/INST]",
    tool_format="mistral",
    observation_format="[TOOL_RESULTS]{content}[/TOOL_RESULTS]",
    reference="mistralai/Mistral-Small-24B-Instruct-2501 chat_template (v7 tekken); LLaMA-Factory mistral_small",
))
