"""Reasoning templates that rewrite history (Qwen3, DeepSeek-R1): each reply is trained in the context inference
gives it, checked against the real Qwen3 tokenizer's own ``apply_chat_template`` text.
"""

from __future__ import annotations

import functools
import json

import pytest

from conftest import requires_shared, shared_path
from medtrain.chat_format import TemplateChatFormat, TokenizerChatFormat, get_chat_format, prompt_pieces
from medtrain.formats import load_conversations, load_preferences
from medtrain.templates import get_conv_template
from medtrain.tokenization import IGNORE_INDEX, encode_dialog

SYS = "You are a doctor."
TURNS = [  # (question, reasoning, answer)
    ("I have a fever.", "Fever is common; advise rest.", "Rest and drink water."),
    ("For how long?", "Usual guidance: three days.", "Three days."),
    ("Then?", "Escalate if it persists.", "See a doctor."),
]
MESSAGES = [{"role": "system", "content": SYS}]
for q, r, a in TURNS:
    MESSAGES += [{"role": "user", "content": q}, {"role": "assistant", "content": a, "reasoning_content": r}]


@functools.lru_cache(maxsize=1)
def qwen3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))


@requires_shared
def test_qwen3_three_turn_layout_matches_apply_chat_template():
    tok = qwen3()
    fmt = get_chat_format(tok, None)  # the tokenizer's own template: no error, no --template_name needed
    assert isinstance(fmt, TokenizerChatFormat)
    samples = fmt.samples(MESSAGES)
    assert len(samples) == 3  # every turn starts a sample: history drops reasoning, the last turn keeps it
    for k, pieces in enumerate(samples, start=1):
        history = MESSAGES[: 2 * k + 1]  # system + k user turns + k answers
        encoded = encode_dialog(tok, pieces, 4096)
        # The sample is, token for token, the template's own render of the conversation up to answer k
        official = tok.apply_chat_template(history, tokenize=False)
        assert official.endswith("<|im_end|>\n")
        assert encoded.input_ids == tok.encode(official[: -len("\n")], add_special_tokens=False)
        # Masked: everything up to the generation prompt ("<|im_start|>assistant\n<think>\n")
        prompt = tok.apply_chat_template(history[:-1], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok.encode(prompt, add_special_tokens=False))
        assert encoded.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        # Trained: this turn's reasoning, the closing think tag, the answer and <|im_end|>; nothing else
        q, r, a = TURNS[k - 1]
        trained = encoded.labels[n_prompt:]
        assert trained == encoded.input_ids[n_prompt:]
        assert tok.decode(trained) == f"{r}\n</think>\n\n{a}<|im_end|>"
        assert trained[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
        # Earlier answers appear as history, without their reasoning, and are not trained
        for q_, r_, a_ in TURNS[: k - 1]:
            assert f"<|im_start|>assistant\n{a_}<|im_end|>" in prompt and r_ not in prompt
    # Exact first sample, written out: the ids of the masked prompt and the trained reply
    first = encode_dialog(tok, samples[0], 4096)
    prompt_text = (f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\nI have a fever.<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\n")
    reply_text = "Fever is common; advise rest.\n</think>\n\nRest and drink water.<|im_end|>"
    prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
    reply_ids = tok.encode(reply_text, add_special_tokens=False)
    assert first.input_ids == prompt_ids + reply_ids
    assert first.labels == [IGNORE_INDEX] * len(prompt_ids) + reply_ids
    assert tok.convert_tokens_to_ids("</think>") in reply_ids and tok.convert_tokens_to_ids("<think>") in prompt_ids


@requires_shared
@pytest.mark.parametrize("messages", [
    MESSAGES,
    MESSAGES[1:],  # no system
    [{**m, "reasoning_content": ""} if m["role"] == "assistant" else m for m in MESSAGES],  # no reasoning
    MESSAGES[:3],  # one turn
])
def test_registered_qwen3_equals_the_tokenizer_template(messages):
    tok = qwen3()
    assert TemplateChatFormat(get_conv_template("qwen3")).samples(messages) == TokenizerChatFormat(tok).samples(messages)
    assert get_conv_template("qwen3").get_prompt(messages[:-1]) == tok.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True)


def test_qwen3_nothink_trains_answers_after_an_empty_think_block():
    samples = TemplateChatFormat(get_conv_template("qwen3-nothink")).samples(MESSAGES)
    assert [pieces[-1][1] for pieces in samples] == [f"{a}<|im_end|>" for _, _, a in TURNS]
    assert all(pieces[-1][0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for pieces in samples)
    assert not any(r in p + a for pieces in samples for p, a in pieces for _, r, _ in TURNS)


def test_deepseek_r1_drops_history_reasoning_and_supervises_the_last():
    samples = TemplateChatFormat(get_conv_template("deepseek-r1")).samples(MESSAGES[:5])
    assert samples == [
        [("<｜begin▁of▁sentence｜>You are a doctor.<｜User｜>I have a fever.<｜Assistant｜><think>\n",
          "Fever is common; advise rest.\n</think>\n\nRest and drink water.<｜end▁of▁sentence｜>")],
        [("<｜begin▁of▁sentence｜>You are a doctor.<｜User｜>I have a fever.<｜Assistant｜>Rest and drink water."
          "<｜end▁of▁sentence｜><｜User｜>For how long?<｜Assistant｜><think>\n",
          "Usual guidance: three days.\n</think>\n\nThree days.<｜end▁of▁sentence｜>")],
    ]


def test_formats_that_keep_history_give_one_sample_with_reasoning_inline():
    fmt = TemplateChatFormat(get_conv_template("chatml"))
    samples = fmt.samples(MESSAGES[:5])
    assert len(samples) == 1 and [a for _, a in samples[0]] == [
        "<think>\nFever is common; advise rest.\n</think>\n\nRest and drink water.<|im_end|>",
        "<think>\nUsual guidance: three days.\n</think>\n\nThree days.<|im_end|>",
    ]


def test_reasoning_field_and_inline_think_load_alike(tmp_path):
    openai = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "reasoning_content": "r"}]}
    inline = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<think>\nr\n</think>\n\na"}]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(openai) + "\n", encoding="utf-8")
    other = tmp_path / "s.jsonl"
    other.write_text(json.dumps(inline) + "\n", encoding="utf-8")
    expected = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert load_conversations([str(path)])[0]["messages"] == expected
    assert load_conversations([str(other)])[0]["messages"] == expected
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "<think>\nr\n</think>\n\na", "rejected": "b"}) + "\n")
    assert load_preferences([str(pairs)])[0]["chosen"] == expected[1]


@requires_shared
def test_sft_tokenisation_expands_turns_and_generation_prompt_matches():
    from medtrain.data import tokenize_conversations

    tok = qwen3()
    fmt = get_chat_format(tok, None)
    dataset = tokenize_conversations([{"messages": MESSAGES, "source": "x:1"}], tok, fmt, 4096, False)
    assert len(dataset) == 3
    ids = encode_dialog(tok, prompt_pieces(fmt, MESSAGES[:-1]), 4096).input_ids
    assert ids == tok.encode(tok.apply_chat_template(MESSAGES[:-1], tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)
    assert dataset[2]["input_ids"][: len(ids)] == ids
