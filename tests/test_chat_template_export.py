"""Merged models are directly servable by engines that render prompts from the tokenizer files (vLLM, SGLang):
the chat format recorded at training time is written as the tokenizer's Jinja chat template, rendering byte for
byte what training rendered (every registered template), the tokens such an engine feeds the model equal training's,
and generation_config.json stops at the format's end-of-turn token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from conftest import CHATML_TEMPLATE, build_model, build_tokenizer
from medtrain.chat_format import TemplateChatFormat, TokenizerChatFormat, get_chat_format, save_chat_format
from medtrain.generation import prompt_ids
from medtrain.jinja_chat_templates import jinja_chat_template
from medtrain.templates import get_conv_template, list_templates

import merge_peft_adapter

SYSTEM = "You are a careful doctor.\n\"Quote\" 医生"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " I have a fever. "},
     {"role": "assistant", "content": " Rest. "}, {"role": "user", "content": "How long?"},
     {"role": "assistant", "content": "Three days."}, {"role": "user", "content": "然后呢？"},
     {"role": "assistant", "content": "看医生。"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "{content} {{ raw }}"},
     {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", list_templates())
def test_every_template_renders_the_same_through_its_jinja_form(name, tokenizer):
    for system_prompt in (None, SYSTEM):
        chat_format = TemplateChatFormat(get_conv_template(name), system_prompt)
        tokenizer.chat_template = jinja_chat_template(chat_format)
        for conversation in CONVERSATIONS:
            # the whole conversation as training's last sample holds it (the one sample, for most templates)
            trained = "".join(prompt + answer for prompt, answer in chat_format.samples(conversation)[-1])
            assert tokenizer.apply_chat_template(conversation, tokenize=False) == trained
            prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
            assert prompt == chat_format.generation_prompt(conversation[:-1])
    with pytest.raises(Exception, match="roles must alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_a_recorded_system_prompt_becomes_the_default_of_the_tokenizer_template(tmp_path):
    tok = build_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE)
    assert jinja_chat_template(TokenizerChatFormat(tok, None)) == CHATML_TEMPLATE  # nothing to add: unchanged
    chat_format = TokenizerChatFormat(tok, SYSTEM)
    tok.chat_template = jinja_chat_template(chat_format)
    for conversation in CONVERSATIONS:
        got = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        assert got == TokenizerChatFormat(build_tokenizer(tmp_path / "again", chat_template=CHATML_TEMPLATE),
                                          SYSTEM).generation_prompt(conversation[:-1])
    assert tok.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False).startswith(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi")


def make_adapter(base: Path, out: Path, chat_format_of) -> Path:
    """A LoRA adapter with non-zero weights, saved as SFT saves it, recording ``chat_format_of(tokenizer)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                      init_lora_weights=False))
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(out)
    save_chat_format(chat_format_of(tokenizer), str(out))
    return out


@pytest.mark.parametrize("case", ["template_vicuna", "tokenizer_chatml"])
def test_merged_output_prompts_like_training_when_an_engine_reads_its_files(case, tmp_path):
    chatml = case == "tokenizer_chatml"
    base = tmp_path / "base"
    build_model(base, build_tokenizer(base, chat_template=CHATML_TEMPLATE if chatml else None))
    adapter = make_adapter(base, tmp_path / "adapter",
                           lambda tok: get_chat_format(tok, None if chatml else "vicuna", SYSTEM))
    merged = tmp_path / "merged"
    report = merge_peft_adapter.main(["--base_model", str(base), "--lora_model", str(adapter),
                                      "--output_dir", str(merged)])
    assert report.notes == []

    # what vLLM / SGLang load: the tokenizer files and generation_config.json
    engine_tokenizer = AutoTokenizer.from_pretrained(merged)
    generation = GenerationConfig.from_pretrained(merged)
    training_tokenizer = AutoTokenizer.from_pretrained(adapter)
    training_format = get_chat_format(training_tokenizer, None if chatml else "vicuna", SYSTEM)
    history = CONVERSATIONS[1][1:-1]  # 3 user turns, no system message: the recorded one applies
    rendered = engine_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert rendered == training_format.generation_prompt(history)
    assert rendered.startswith("<|im_start|>system\n" + SYSTEM if chatml else SYSTEM + " USER:  I have a fever.  ASSISTANT:")
    # an engine tokenises the rendered text in one go (add_special_tokens=False); training tokenised by turn
    assert engine_tokenizer(rendered, add_special_tokens=False).input_ids == prompt_ids(
        training_tokenizer, training_format, history)
    stop_id = training_tokenizer.convert_tokens_to_ids("<|im_end|>" if chatml else "</s>")
    eos = generation.eos_token_id
    assert stop_id in (eos if isinstance(eos, list) else [eos])
    assert json.loads((merged / "medtrain_chat_format.json").read_text())["system_prompt"] == SYSTEM


def test_a_multi_token_end_of_turn_text_is_reported(tmp_path):
    base = tmp_path / "base"
    build_model(base, build_tokenizer(base))
    adapter = make_adapter(base, tmp_path / "adapter", lambda tok: get_chat_format(tok, "llama3"))
    report = merge_peft_adapter.main(["--base_model", str(base), "--lora_model", str(adapter),
                                      "--output_dir", str(tmp_path / "merged")])
    assert any("'<|eot_id|>' is several tokens" in note and '"stop"' in note for note in report.notes)
    shutil.rmtree(tmp_path / "merged")
