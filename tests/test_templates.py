"""Conversation templates: byte-exact renders per family, the turn split that decides masking, the registry, the CLI.

Every expected string below is written out by hand from the family's published format (the reference named on each
template), never produced by the code under test. ``render`` stops at the last end-of-turn marker: where the
official format writes a separator after the final answer (ChatML "\\n", zephyr "\\n", Phi-3 "\\n<|endoftext|>"),
the expected strings here leave it out, and the real-tokenizer tests add it back explicitly.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from medtrain.errors import ConfigError, DataError
from medtrain.templates import (
    ConversationTemplate,
    get_conv_template,
    list_templates,
    register_conv_template,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT.parent / "shared" / "tokenizers"

SYS = "You are a doctor."
Q1, A1, Q2, A2 = "I have a fever.", "Rest and drink water.", "For how long?", "Three days."
CHAT = [
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
WITH_SYS = [{"role": "system", "content": SYS}, *CHAT]

# Default system prompts, as published.
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYS = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
QWEN_SYS = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM2_SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
INTERN_SYS = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as "
    "English and 中文."
)
LLAMA2_ZH_SYS = "You are a helpful assistant. 你是一个乐于助人的助手。"

# name -> (render with SYS, render with the template's default system, get_prompt with SYS for the 2nd answer)
EXPECTED: dict[str, tuple[str, str, str]] = {
    "vicuna": (
        "You are a doctor. USER: I have a fever. ASSISTANT: Rest and drink water.</s>"
        "USER: For how long? ASSISTANT: Three days.</s>",
        VICUNA_SYS + " USER: I have a fever. ASSISTANT: Rest and drink water.</s>"
        "USER: For how long? ASSISTANT: Three days.</s>",
        "You are a doctor. USER: I have a fever. ASSISTANT: Rest and drink water.</s>"
        "USER: For how long? ASSISTANT:",
    ),
    "alpaca": (
        "You are a doctor.\n\n### Instruction:\nI have a fever.\n\n### Response:Rest and drink water.</s>"
        "\n\n### Instruction:\nFor how long?\n\n### Response:Three days.</s>",
        ALPACA_SYS + "\n\n### Instruction:\nI have a fever.\n\n### Response:Rest and drink water.</s>"
        "\n\n### Instruction:\nFor how long?\n\n### Response:Three days.</s>",
        "You are a doctor.\n\n### Instruction:\nI have a fever.\n\n### Response:Rest and drink water.</s>"
        "\n\n### Instruction:\nFor how long?\n\n### Response:",
    ),
    "chatml": (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "qwen": (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "smollm2": (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "yi": (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "intern2": (
        "<s><|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<s><|im_start|>system\n" + INTERN_SYS + "<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\nThree days.<|im_end|>",
        "<s><|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
        "<|im_start|>assistant\nRest and drink water.<|im_end|>\n<|im_start|>user\nFor how long?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nI have a fever. [/INST] Rest and drink water. </s>"
        "<s>[INST] For how long? [/INST] Three days. </s>",
        "<s>[INST] I have a fever. [/INST] Rest and drink water. </s><s>[INST] For how long? [/INST] Three days. </s>",
        "<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nI have a fever. [/INST] Rest and drink water. </s>"
        "<s>[INST] For how long? [/INST]",
    ),
    "llama2-zh": (
        "<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nI have a fever. [/INST] Rest and drink water. </s>"
        "<s>[INST] For how long? [/INST] Three days. </s>",
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
        "I have a fever. [/INST] Rest and drink water. </s><s>[INST] For how long? [/INST] Three days. </s>",
        "<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nI have a fever. [/INST] Rest and drink water. </s>"
        "<s>[INST] For how long? [/INST]",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a doctor.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI have a fever.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRest and drink water.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFor how long?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThree days.<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nI have a fever.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRest and drink water.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFor how long?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThree days.<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a doctor.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI have a fever.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRest and drink water.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFor how long?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "<s> [INST] You are a doctor.\n\nI have a fever. [/INST] Rest and drink water.</s>"
        " [INST] For how long? [/INST] Three days.</s>",
        "<s> [INST] I have a fever. [/INST] Rest and drink water.</s> [INST] For how long? [/INST] Three days.</s>",
        "<s> [INST] You are a doctor.\n\nI have a fever. [/INST] Rest and drink water.</s> [INST] For how long? [/INST]",
    ),
    "chatglm2": (
        "[Round 1]\n\n问：You are a doctor.\n\nI have a fever.\n\n答：Rest and drink water.</s>"
        "\n\n[Round 2]\n\n问：For how long?\n\n答：Three days.</s>",
        "[Round 1]\n\n问：I have a fever.\n\n答：Rest and drink water.</s>"
        "\n\n[Round 2]\n\n问：For how long?\n\n答：Three days.</s>",
        "[Round 1]\n\n问：You are a doctor.\n\nI have a fever.\n\n答：Rest and drink water.</s>"
        "\n\n[Round 2]\n\n问：For how long?\n\n答：",
    ),
    "chatglm3": (
        "[gMASK]sop<|system|>\n You are a doctor.<|user|>\n I have a fever.<|assistant|>\n Rest and drink water.</s>"
        "<|user|>\n For how long?<|assistant|>\n Three days.</s>",
        "[gMASK]sop<|user|>\n I have a fever.<|assistant|>\n Rest and drink water.</s>"
        "<|user|>\n For how long?<|assistant|>\n Three days.</s>",
        "[gMASK]sop<|system|>\n You are a doctor.<|user|>\n I have a fever.<|assistant|>\n Rest and drink water.</s>"
        "<|user|>\n For how long?<|assistant|>",
    ),
    "baichuan": (
        "You are a doctor.<reserved_102>I have a fever.<reserved_103>Rest and drink water.</s>"
        "<reserved_102>For how long?<reserved_103>Three days.</s>",
        "<reserved_102>I have a fever.<reserved_103>Rest and drink water.</s>"
        "<reserved_102>For how long?<reserved_103>Three days.</s>",
        "You are a doctor.<reserved_102>I have a fever.<reserved_103>Rest and drink water.</s>"
        "<reserved_102>For how long?<reserved_103>",
    ),
    "baichuan2": (
        "You are a doctor.<reserved_106>I have a fever.<reserved_107>Rest and drink water.</s>"
        "<reserved_106>For how long?<reserved_107>Three days.</s>",
        "<reserved_106>I have a fever.<reserved_107>Rest and drink water.</s>"
        "<reserved_106>For how long?<reserved_107>Three days.</s>",
        "You are a doctor.<reserved_106>I have a fever.<reserved_107>Rest and drink water.</s>"
        "<reserved_106>For how long?<reserved_107>",
    ),
    "deepseek": (
        "<｜begin▁of▁sentence｜>You are a doctor.\n\nUser: I have a fever.\n\n"
        "Assistant: Rest and drink water.<｜end▁of▁sentence｜>User: For how long?\n\n"
        "Assistant: Three days.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>User: I have a fever.\n\n"
        "Assistant: Rest and drink water.<｜end▁of▁sentence｜>User: For how long?\n\n"
        "Assistant: Three days.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>You are a doctor.\n\nUser: I have a fever.\n\n"
        "Assistant: Rest and drink water.<｜end▁of▁sentence｜>User: For how long?\n\nAssistant:",
    ),
    "deepseek3": (
        "<｜begin▁of▁sentence｜>You are a doctor.<｜User｜>I have a fever.<｜Assistant｜>Rest and drink water."
        "<｜end▁of▁sentence｜><｜User｜>For how long?<｜Assistant｜>Three days.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜><｜User｜>I have a fever.<｜Assistant｜>Rest and drink water."
        "<｜end▁of▁sentence｜><｜User｜>For how long?<｜Assistant｜>Three days.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>You are a doctor.<｜User｜>I have a fever.<｜Assistant｜>Rest and drink water."
        "<｜end▁of▁sentence｜><｜User｜>For how long?<｜Assistant｜>",
    ),
    "zephyr": (
        "<|system|>\nYou are a doctor.</s>\n<|user|>\nI have a fever.</s>\n<|assistant|>\nRest and drink water.</s>\n"
        "<|user|>\nFor how long?</s>\n<|assistant|>\nThree days.</s>",
        "<|user|>\nI have a fever.</s>\n<|assistant|>\nRest and drink water.</s>\n"
        "<|user|>\nFor how long?</s>\n<|assistant|>\nThree days.</s>",
        "<|system|>\nYou are a doctor.</s>\n<|user|>\nI have a fever.</s>\n<|assistant|>\nRest and drink water.</s>\n"
        "<|user|>\nFor how long?</s>\n<|assistant|>\n",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are a doctor.\n\nI have a fever.<end_of_turn>\n"
        "<start_of_turn>model\nRest and drink water.<end_of_turn>\n<start_of_turn>user\nFor how long?<end_of_turn>\n"
        "<start_of_turn>model\nThree days.<end_of_turn>",
        "<bos><start_of_turn>user\nI have a fever.<end_of_turn>\n"
        "<start_of_turn>model\nRest and drink water.<end_of_turn>\n<start_of_turn>user\nFor how long?<end_of_turn>\n"
        "<start_of_turn>model\nThree days.<end_of_turn>",
        "<bos><start_of_turn>user\nYou are a doctor.\n\nI have a fever.<end_of_turn>\n"
        "<start_of_turn>model\nRest and drink water.<end_of_turn>\n<start_of_turn>user\nFor how long?<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    "phi3": (
        "<|system|>\nYou are a doctor.<|end|>\n<|user|>\nI have a fever.<|end|>\n<|assistant|>\n"
        "Rest and drink water.<|end|>\n<|user|>\nFor how long?<|end|>\n<|assistant|>\nThree days.<|end|>",
        "<|user|>\nI have a fever.<|end|>\n<|assistant|>\n"
        "Rest and drink water.<|end|>\n<|user|>\nFor how long?<|end|>\n<|assistant|>\nThree days.<|end|>",
        "<|system|>\nYou are a doctor.<|end|>\n<|user|>\nI have a fever.<|end|>\n<|assistant|>\n"
        "Rest and drink water.<|end|>\n<|user|>\nFor how long?<|end|>\n<|assistant|>\n",
    ),
    "starchat": (
        "<|system|>\nYou are a doctor.<|end|>\n<|user|>\nI have a fever.<|end|>\n<|assistant|>\n"
        "Rest and drink water.<|end|>\n<|user|>\nFor how long?<|end|>\n<|assistant|>\nThree days.<|end|>",
        "<|user|>\nI have a fever.<|end|>\n<|assistant|>\n"
        "Rest and drink water.<|end|>\n<|user|>\nFor how long?<|end|>\n<|assistant|>\nThree days.<|end|>",
        "<|system|>\nYou are a doctor.<|end|>\n<|user|>\nI have a fever.<|end|>\n<|assistant|>\n"
        "Rest and drink water.<|end|>\n<|user|>\nFor how long?<|end|>\n<|assistant|>\n",
    ),
    "xverse": (
        "You are a doctor.\n\nHuman: I have a fever.\n\nAssistant: Rest and drink water.<|endoftext|>"
        "Human: For how long?\n\nAssistant: Three days.<|endoftext|>",
        "Human: I have a fever.\n\nAssistant: Rest and drink water.<|endoftext|>"
        "Human: For how long?\n\nAssistant: Three days.<|endoftext|>",
        "You are a doctor.\n\nHuman: I have a fever.\n\nAssistant: Rest and drink water.<|endoftext|>"
        "Human: For how long?\n\nAssistant: ",
    ),
    "orion": (
        "<s>Human: You are a doctor.\n\nI have a fever.\n\nAssistant: </s>Rest and drink water.</s>"
        "Human: For how long?\n\nAssistant: </s>Three days.</s>",
        "<s>Human: I have a fever.\n\nAssistant: </s>Rest and drink water.</s>"
        "Human: For how long?\n\nAssistant: </s>Three days.</s>",
        "<s>Human: You are a doctor.\n\nI have a fever.\n\nAssistant: </s>Rest and drink water.</s>"
        "Human: For how long?\n\nAssistant: </s>",
    ),
    "cohere": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a doctor.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>I have a fever.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Rest and drink water.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>For how long?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Three days.<|END_OF_TURN_TOKEN|>",
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>I have a fever.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Rest and drink water.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>For how long?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Three days.<|END_OF_TURN_TOKEN|>",
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a doctor.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>I have a fever.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Rest and drink water.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>For how long?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    ),
}

def _chat(parts: list[str]) -> str:
    return "".join(parts)


# Reasoning families and the other current ones (references on each template in medtrain/templates.py).
_QWEN3_HISTORY = ("<|im_start|>user\nI have a fever.<|im_end|>\n<|im_start|>assistant\nRest and drink water.<|im_end|>\n"
                  "<|im_start|>user\nFor how long?<|im_end|>\n<|im_start|>assistant\n")
_QWEN3_SYS = "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
_DS_HISTORY = ("<｜User｜>I have a fever.<｜Assistant｜>Rest and drink water.<｜end▁of▁sentence｜>"
               "<｜User｜>For how long?<｜Assistant｜>")
_LLAMA4_TURNS = ("<|header_start|>user<|header_end|>\n\nI have a fever.<|eot|><|header_start|>assistant<|header_end|>"
                 "\n\nRest and drink water.<|eot|><|header_start|>user<|header_end|>\n\nFor how long?<|eot|>"
                 "<|header_start|>assistant<|header_end|>\n\n")
_PHI4_TURNS = ("<|im_start|>user<|im_sep|>I have a fever.<|im_end|><|im_start|>assistant<|im_sep|>Rest and drink water."
               "<|im_end|><|im_start|>user<|im_sep|>For how long?<|im_end|><|im_start|>assistant<|im_sep|>")
_GEMMA3 = ("<start_of_turn>model\nRest and drink water.<end_of_turn>\n<start_of_turn>user\nFor how long?<end_of_turn>\n"
           "<start_of_turn>model\n")
EXPECTED.update({
    "qwen3": (
        _QWEN3_SYS + _QWEN3_HISTORY + "<think>\n\n</think>\n\nThree days.<|im_end|>",
        _QWEN3_HISTORY + "<think>\n\n</think>\n\nThree days.<|im_end|>",
        _QWEN3_SYS + _QWEN3_HISTORY + "<think>\n",
    ),
    "qwen3-nothink": (
        _QWEN3_SYS + _QWEN3_HISTORY + "<think>\n\n</think>\n\nThree days.<|im_end|>",
        _QWEN3_HISTORY + "<think>\n\n</think>\n\nThree days.<|im_end|>",
        _QWEN3_SYS + _QWEN3_HISTORY + "<think>\n\n</think>\n\n",
    ),
    "deepseek-r1": (
        "<｜begin▁of▁sentence｜>You are a doctor." + _DS_HISTORY + "<think>\n\n</think>\n\nThree days.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>" + _DS_HISTORY + "<think>\n\n</think>\n\nThree days.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>You are a doctor." + _DS_HISTORY + "<think>\n",
    ),
    "glm4": (
        "[gMASK]<sop><|system|>\nYou are a doctor.<|user|>\nI have a fever.<|assistant|>\nRest and drink water."
        "<|endoftext|><|user|>\nFor how long?<|assistant|>\nThree days.<|endoftext|>",
        "[gMASK]<sop><|user|>\nI have a fever.<|assistant|>\nRest and drink water."
        "<|endoftext|><|user|>\nFor how long?<|assistant|>\nThree days.<|endoftext|>",
        "[gMASK]<sop><|system|>\nYou are a doctor.<|user|>\nI have a fever.<|assistant|>\nRest and drink water."
        "<|endoftext|><|user|>\nFor how long?<|assistant|>",
    ),
    "gemma3": (
        "<bos><start_of_turn>user\nYou are a doctor.\n\nI have a fever.<end_of_turn>\n" + _GEMMA3
        + "Three days.<end_of_turn>",
        "<bos><start_of_turn>user\nI have a fever.<end_of_turn>\n" + _GEMMA3 + "Three days.<end_of_turn>",
        "<bos><start_of_turn>user\nYou are a doctor.\n\nI have a fever.<end_of_turn>\n" + _GEMMA3,
    ),
    "llama4": (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a doctor.<|eot|>" + _LLAMA4_TURNS
        + "Three days.<|eot|>",
        "<|begin_of_text|>" + _LLAMA4_TURNS + "Three days.<|eot|>",
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a doctor.<|eot|>" + _LLAMA4_TURNS,
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>You are a doctor.<|im_end|>" + _PHI4_TURNS + "Three days.<|im_end|>",
        _PHI4_TURNS + "Three days.<|im_end|>",
        "<|im_start|>system<|im_sep|>You are a doctor.<|im_end|>" + _PHI4_TURNS,
    ),
    "mistral-v7": (
        "<s>[SYSTEM_PROMPT]You are a doctor.[/SYSTEM_PROMPT][INST]I have a fever.[/INST]Rest and drink water.</s>"
        "[INST]For how long?[/INST]Three days.</s>",
        "<s>[INST]I have a fever.[/INST]Rest and drink water.</s>[INST]For how long?[/INST]Three days.</s>",
        "<s>[SYSTEM_PROMPT]You are a doctor.[/SYSTEM_PROMPT][INST]I have a fever.[/INST]Rest and drink water.</s>"
        "[INST]For how long?[/INST]",
    ),
})
REWRITING = {"qwen3", "qwen3-nothink", "deepseek-r1"}

REQUIRED = {
    "vicuna", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral", "chatglm2", "chatglm3", "baichuan",
    "baichuan2", "deepseek", "deepseek3", "yi", "intern2", "zephyr", "gemma", "phi3", "starchat", "xverse", "orion",
    "cohere", "llama2-zh", "smollm2", "qwen3", "qwen3-nothink", "deepseek-r1", "glm4", "gemma3", "llama4", "phi4",
    "mistral-v7",
}


# ---- byte-exact renders --------------------------------------------------------------------------------------------

def test_every_registered_template_has_expected_literals():
    # A new template must come with its published-format literals here.
    assert set(list_templates()) == set(EXPECTED)
    assert REQUIRED <= set(list_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_with_system_prompt(name):
    assert get_conv_template(name).render(WITH_SYS) == EXPECTED[name][0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_with_default_system(name):
    assert get_conv_template(name).render(CHAT) == EXPECTED[name][1]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt(name):
    assert get_conv_template(name).get_prompt(WITH_SYS[:-1]) == EXPECTED[name][2]


# ---- the turn split (decides which tokens are supervised) ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(set(EXPECTED) - REWRITING))
def test_dialog_invariants(name):
    template = get_conv_template(name)
    dialog = template.get_dialog(WITH_SYS)
    assert len(dialog) == 2
    for _, answer in dialog:
        assert answer.endswith(template.stop_str)
    assert "".join(p + a for p, a in dialog) == template.render(WITH_SYS)
    assert dialog[0][0].startswith(template.bos)
    assert dialog[1][0].startswith(template.sep)
    # the generation prompt for turn 2 is the finished turn 1 plus exactly turn 2's prompt piece
    assert template.get_prompt(WITH_SYS[:-1]) == "".join(dialog[0]) + dialog[1][0]


SPLITS = {
    "qwen": [
        ("<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
         "<|im_start|>assistant\n", "Rest and drink water.<|im_end|>"),
        ("\n<|im_start|>user\nFor how long?<|im_end|>\n<|im_start|>assistant\n", "Three days.<|im_end|>"),
    ],
    "llama2": [
        ("<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nI have a fever. [/INST]", " Rest and drink water. </s>"),
        ("<s>[INST] For how long? [/INST]", " Three days. </s>"),
    ],
    "vicuna": [
        ("You are a doctor. USER: I have a fever. ASSISTANT:", " Rest and drink water.</s>"),
        ("USER: For how long? ASSISTANT:", " Three days.</s>"),
    ],
    "mistral": [
        ("<s> [INST] You are a doctor.\n\nI have a fever. [/INST]", " Rest and drink water.</s>"),
        (" [INST] For how long? [/INST]", " Three days.</s>"),
    ],
    "chatglm2": [
        ("[Round 1]\n\n问：You are a doctor.\n\nI have a fever.\n\n答：", "Rest and drink water.</s>"),
        ("\n\n[Round 2]\n\n问：For how long?\n\n答：", "Three days.</s>"),
    ],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a doctor.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nI have a fever.<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "Rest and drink water.<|eot_id|>"),
        ("<|start_header_id|>user<|end_header_id|>\n\nFor how long?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "Three days.<|eot_id|>"),
    ],
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_dialog_pieces_exact(name):
    assert get_conv_template(name).get_dialog(WITH_SYS) == SPLITS[name]


def test_single_turn_generation_prompt_without_system():
    assert get_conv_template("llama2").get_prompt([{"role": "user", "content": Q1}]) == "<s>[INST] I have a fever. [/INST]"
    assert get_conv_template("qwen").get_prompt([{"role": "user", "content": Q1}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nI have a fever.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_strip_roles_follow_the_official_template():
    padded = [{"role": "user", "content": "  I have a fever.\n"}, {"role": "assistant", "content": " Rest. "}]
    # llama3 trims every message; chatml keeps content verbatim
    assert get_conv_template("llama3").render(padded) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nI have a fever.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRest.<|eot_id|>"
    )
    assert get_conv_template("llama2").render(padded) == "<s>[INST] I have a fever. [/INST] Rest. </s>"
    assert get_conv_template("chatml").render(padded) == (
        "<|im_start|>user\n  I have a fever.\n<|im_end|>\n<|im_start|>assistant\n Rest. <|im_end|>"
    )


# ---- system prompt handling --------------------------------------------------------------------------------------

def test_custom_system_prompt_replaces_only_the_text():
    assert get_conv_template("qwen").render(CHAT, system_prompt="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
    )
    assert get_conv_template("llama2").render(CHAT, system_prompt="Be brief.").startswith(
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nI have a fever. [/INST]"
    )
    assert get_conv_template("vicuna").get_prompt(CHAT[:1], system_prompt="Be brief.") == (
        "Be brief. USER: I have a fever. ASSISTANT:"
    )


def test_system_message_beats_argument_beats_default():
    qwen = get_conv_template("qwen")
    assert qwen.render(WITH_SYS, system_prompt="Be brief.") == EXPECTED["qwen"][0]
    assert qwen.render(CHAT, system_prompt=SYS) == EXPECTED["qwen"][0]
    assert qwen.render(CHAT) == EXPECTED["qwen"][1]


def test_empty_system_prompt():
    # vicuna has an optional system block: empty text drops it; qwen's official template always has one
    assert get_conv_template("vicuna").get_prompt(CHAT[:1], system_prompt="") == "USER: I have a fever. ASSISTANT:"
    assert get_conv_template("qwen").get_prompt(CHAT[:1], system_prompt="") == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- malformed conversations -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "messages, field, fragment",
    [
        ([], "messages", "non-empty"),
        ([{"role": "assistant", "content": "Hi"}], "messages[0].role", "expected 'user', got 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role",
         "expected 'assistant', got 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role",
         "expected 'assistant', got 'system'"),
        ([{"role": "human", "content": "a"}], "messages[0].role", "got 'human'"),
        ([{"role": "user", "content": None}], "messages[0].content", "expected a string"),
        ([{"role": "system", "content": "s"}], "messages", "no user message"),
        (CHAT[:3], "messages", "must end with an assistant message"),
    ],
)
def test_get_dialog_rejects_malformed_messages(messages, field, fragment):
    with pytest.raises(DataError) as err:
        get_conv_template("chatml").get_dialog(messages)
    assert err.value.field == field
    assert fragment in str(err.value)


def test_get_prompt_needs_a_final_user_message():
    with pytest.raises(DataError, match="must end with a user message"):
        get_conv_template("chatml").get_prompt(CHAT)


# ---- registry ----------------------------------------------------------------------------------------------------

def test_duplicate_registration_raises_and_override_replaces():
    original = get_conv_template("chatml")
    with pytest.raises(ValueError, match="'chatml' is already registered"):
        register_conv_template(replace(original, system_prompt="x"))
    try:
        register_conv_template(replace(original, system_prompt="x"), override=True)
        assert get_conv_template("chatml").system_prompt == "x"
    finally:
        register_conv_template(original, override=True)
    assert get_conv_template("chatml") is original


def test_register_new_template():
    custom = ConversationTemplate(name="test-custom", system_prompt="", stop_str="<end>", user_format="Q: {content}\nA:",
                                  assistant_format=" {content}", sep="\n")
    register_conv_template(custom)
    try:
        assert get_conv_template("test-custom").render(CHAT) == (
            "Q: I have a fever.\nA: Rest and drink water.<end>\nQ: For how long?\nA: Three days.<end>"
        )
    finally:
        from medtrain import templates

        del templates._TEMPLATES["test-custom"]


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get_conv_template("qwen9")
    message = str(err.value)
    assert message.startswith("unknown conversation template 'qwen9'; choose one of: alpaca, baichuan, ")
    for name in list_templates():
        assert name in message


def test_list_templates_is_sorted():
    names = list_templates()
    assert names == sorted(names)


# ---- real tokenizers (../shared) ---------------------------------------------------------------------------------

def _load(name: str):
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is absent (the real tokenizers live in ../shared)")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.mark.parametrize("tokenizer_name, template_name", [("qwen2.5", "qwen"), ("smollm2", "smollm2")])
def test_matches_the_tokenizers_own_chat_template(tokenizer_name, template_name):
    tok = _load(tokenizer_name)
    template = get_conv_template(template_name)
    for messages in (WITH_SYS, CHAT):
        official = tok.apply_chat_template(messages, tokenize=False)
        assert official == template.render(messages) + "\n"  # ChatML's trailing newline after the last turn
        assert tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == (
            template.get_prompt(messages[:-1])
        )


@pytest.mark.parametrize("tokenizer_name, template_name", [("qwen2.5", "qwen"), ("smollm2", "smollm2")])
def test_pieces_tokenize_like_the_whole(tokenizer_name, template_name):
    # Training tokenises each piece alone; the ids must equal those of the whole text or masks shift.
    tok = _load(tokenizer_name)
    dialog = get_conv_template(template_name).get_dialog(WITH_SYS)
    pieces = [ids for p, a in dialog for ids in (tok.encode(p, add_special_tokens=False),
                                                  tok.encode(a, add_special_tokens=False))]
    whole = tok.encode("".join(p + a for p, a in dialog), add_special_tokens=False)
    assert sum(pieces, []) == whole
    # each answer piece ends with the eos id, the token the model must learn to emit
    assert pieces[1][-1] == pieces[3][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_tokenizer_injects_its_default_system_and_chatml_matches_with_one():
    tok = _load("smollm2")
    template_text = (TOKENIZERS / "smollm2" / "chat_template.jinja").read_text()
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>" in template_text
    assert get_conv_template("smollm2").system_prompt == SMOLLM2_SYS
    # with an explicit system message the SmolLM2 template is plain ChatML
    assert tok.apply_chat_template(WITH_SYS, tokenize=False) == get_conv_template("chatml").render(WITH_SYS) + "\n"


# ---- the CLI -----------------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "template.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_list_and_name():
    listed = _cli("--list")
    assert listed.returncode == 0
    assert listed.stdout.split() == list_templates()
    shown = _cli("--name", "qwen")
    assert shown.returncode == 0
    assert f"render:         {EXPECTED['qwen'][0]!r}" in shown.stdout.splitlines()
    assert "turn 1 prompt:  '\\n<|im_start|>user\\nFor how long?<|im_end|>\\n<|im_start|>assistant\\n'" in shown.stdout


def test_cli_unknown_name_is_a_one_line_error():
    result = _cli("--name", "nope")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown conversation template 'nope'; choose one of: alpaca,")
    assert "Traceback" not in result.stderr


def test_template_module_reexports_the_api():
    import template

    assert template.get_conv_template is get_conv_template
    assert template.ConversationTemplate is ConversationTemplate
    assert template.DEFAULT_TEMPLATE == "vicuna"
