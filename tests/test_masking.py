"""Exact (token, label) layouts: only assistant turns and their end-of-turn token are trained on."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import requires_shared, shared_path
from medtrain.chat_format import TemplateChatFormat, TokenizerChatFormat, get_chat_format
from medtrain.templates import get_conv_template
from medtrain.tokenization import IGNORE_INDEX, describe_sample, encode_dialog

THREE_TURNS = [
    {"role": "system", "content": "You are a doctor."},
    {"role": "user", "content": "Fever?"},
    {"role": "assistant", "content": "Rest."},
    {"role": "user", "content": "Cough?"},
    {"role": "assistant", "content": "Drink tea."},
    {"role": "user", "content": "发烧怎么办？"},
    {"role": "assistant", "content": "多喝水。"},
]


def layout(tokenizer, encoded):
    """(token, trained?) per position, checking labels equal ids where trained."""
    for token_id, label in zip(encoded.input_ids, encoded.labels):
        assert label in (IGNORE_INDEX, token_id)
    return list(zip(tokenizer.convert_ids_to_tokens(encoded.input_ids), [l != IGNORE_INDEX for l in encoded.labels]))


def spans(tokenizer, encoded):
    """Decoded runs of (text, trained?)."""
    out, start = [], 0
    ids, labels = encoded.input_ids, encoded.labels
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            out.append((tokenizer.decode(ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return out


def test_tokenizer_chat_template_layout_tiny(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    fmt = get_chat_format(tok, None)
    assert isinstance(fmt, TokenizerChatFormat)
    encoded = encode_dialog(tok, fmt.dialog(THREE_TURNS), 512)
    assert spans(tok, encoded) == [
        ("<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nFever?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Rest.<|im_end|>", True),
        ("\n<|im_start|>user\nCough?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Drink tea.<|im_end|>", True),
        ("\n<|im_start|>user\n发烧怎么办？<|im_end|>\n<|im_start|>assistant\n", False),
        ("多喝水。<|im_end|>", True),
    ]


def test_registered_template_layout_vicuna(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = get_chat_format(tok, None)  # no chat template -> vicuna, the base-model default
    assert isinstance(fmt, TemplateChatFormat) and fmt.name == "vicuna"
    encoded = encode_dialog(tok, fmt.dialog(THREE_TURNS), 512)
    assert spans(tok, encoded) == [
        ("You are a doctor. USER: Fever? ASSISTANT:", False),
        (" Rest.</s>", True),
        ("USER: Cough? ASSISTANT:", False),
        (" Drink tea.</s>", True),
        ("USER: 发烧怎么办？ ASSISTANT:", False),
        (" 多喝水。</s>", True),
    ]
    assert encoded.labels.count(tok.convert_tokens_to_ids("</s>")) == 3  # every turn's end-of-turn token is trained


def test_train_on_inputs_labels_everything(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    encoded = encode_dialog(tok, get_chat_format(tok, None).dialog(THREE_TURNS), 512, train_on_inputs=True)
    assert encoded.labels == encoded.input_ids


def test_truncation_cuts_at_turn_boundaries(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    pieces = get_chat_format(tok, None).dialog(THREE_TURNS)
    full = encode_dialog(tok, pieces, 10_000)
    first_two = len(tok.encode("".join(p + a for p, a in pieces[:2]), add_special_tokens=False))
    cut = encode_dialog(tok, pieces, first_two + 3)  # room for two whole turns, not the third
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:first_two]
    assert tok.decode(cut.input_ids).endswith("Drink tea.<|im_end|>")
    tiny = encode_dialog(tok, pieces, 12)  # the first turn alone does not fit: shortened, answer keeps tokens
    assert len(tiny.input_ids) == 12 and any(l != IGNORE_INDEX for l in tiny.labels)


def test_custom_system_prompt_replaces_only_the_text(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    fmt = get_chat_format(tok, "chatml", system_prompt="Be brief.")
    prompt = fmt.generation_prompt([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_describe_sample_shows_masked_and_trained_runs(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    encoded = encode_dialog(tok, get_chat_format(tok, None).dialog(THREE_TURNS[:3]), 512)
    text = describe_sample(tok, encoded.input_ids, encoded.labels)
    lines = text.splitlines()
    assert lines[0].startswith(f"sample layout: {len(encoded.input_ids)} tokens, ")
    assert lines[1].startswith("  [masked]") and lines[2].startswith("  [TRAIN ]") and "'Rest.<|im_end|>'" in lines[2]


QWEN_LAYOUT = [
    ("<|im_start|>", False), ("system", False), ("Ċ", False), ("You", False), ("Ġare", False), ("Ġa", False),
    ("Ġdoctor", False), (".", False), ("<|im_end|>", False), ("Ċ", False), ("<|im_start|>", False), ("user", False),
    ("Ċ", False), ("F", False), ("ever", False), ("?", False), ("<|im_end|>", False), ("Ċ", False),
    ("<|im_start|>", False), ("assistant", False), ("Ċ", False), ("Rest", True), (".", True), ("<|im_end|>", True),
    ("Ċ", False), ("<|im_start|>", False), ("user", False), ("Ċ", False), ("C", False), ("ough", False), ("?", False),
    ("<|im_end|>", False), ("Ċ", False), ("<|im_start|>", False), ("assistant", False), ("Ċ", False), ("Drink", True),
    ("Ġtea", True), (".", True), ("<|im_end|>", True), ("Ċ", False), ("<|im_start|>", False), ("user", False),
    ("Ċ", False), ("åıĳçĥ§", False), ("æĢİä¹ĪåĬŀ", False), ("ï¼Ł", False), ("<|im_end|>", False), ("Ċ", False),
    ("<|im_start|>", False), ("assistant", False), ("Ċ", False), ("å¤ļ", True), ("åĸĿæ°´", True), ("ãĢĤ", True),
    ("<|im_end|>", True),
]
SMOLLM2_LAYOUT = [
    ("<|im_start|>", False), ("system", False), ("Ċ", False), ("You", False), ("Ġare", False), ("Ġa", False),
    ("Ġdoctor", False), (".", False), ("<|im_end|>", False), ("Ċ", False), ("<|im_start|>", False), ("user", False),
    ("Ċ", False), ("F", False), ("ever", False), ("?", False), ("<|im_end|>", False), ("Ċ", False),
    ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False), ("Rest", True), (".", True),
    ("<|im_end|>", True), ("Ċ", False), ("<|im_start|>", False), ("user", False), ("Ċ", False), ("C", False),
    ("ough", False), ("?", False), ("<|im_end|>", False), ("Ċ", False), ("<|im_start|>", False), ("ass", False),
    ("istant", False), ("Ċ", False), ("Dr", True), ("ink", True), ("Ġtea", True), (".", True), ("<|im_end|>", True),
    ("Ċ", False), ("<|im_start|>", False), ("user", False), ("Ċ", False), ("åı", False), ("ĳ", False), ("ç", False),
    ("ĥ", False), ("§", False), ("æĢ", False), ("İ", False), ("ä¹", False), ("Ī", False), ("åĬ", False),
    ("ŀ", False), ("ï¼", False), ("Ł", False), ("<|im_end|>", False), ("Ċ", False), ("<|im_start|>", False),
    ("ass", False), ("istant", False), ("Ċ", False), ("å¤", True), ("ļ", True), ("å", True), ("ĸ", True),
    ("Ŀ", True), ("æ", True), ("°", True), ("´", True), ("ãĢĤ", True), ("<|im_end|>", True),
]


@requires_shared
@pytest.mark.parametrize("name, expected", [("qwen2.5", QWEN_LAYOUT), ("smollm2", SMOLLM2_LAYOUT)])
def test_real_tokenizer_chat_template_layout(name, expected):
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", name))
    fmt = get_chat_format(tok, None)
    encoded = encode_dialog(tok, fmt.dialog(THREE_TURNS), 512)
    assert layout(tok, encoded) == expected
    # the ids equal tokenising the tokenizer's own rendering (minus its trailing newline) in one go
    full = tok.apply_chat_template(THREE_TURNS, tokenize=False)
    assert encoded.input_ids == tok(full.rstrip("\n"), add_special_tokens=False)["input_ids"]


@requires_shared
def test_qwen_template_and_qwen_tokenizer_give_the_same_ids():
    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen2.5"))
    by_template = encode_dialog(tok, TemplateChatFormat(get_conv_template("qwen")).dialog(THREE_TURNS), 512)
    by_tokenizer = encode_dialog(tok, TokenizerChatFormat(tok).dialog(THREE_TURNS), 512)
    assert by_template.input_ids == by_tokenizer.input_ids and by_template.labels == by_tokenizer.labels


def reference_encode(tokenizer, pieces, max_length):
    """The per-piece algorithm encode_dialogs must equal: tokenise each text alone, BOS rule, turn-boundary cuts."""
    ids, labels, truncated = [], [], False
    for turn, (prompt, answer) in enumerate(pieces):
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        a = tokenizer.encode(answer, add_special_tokens=False) if answer else []
        if turn == 0 and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id and p[:1] != [tokenizer.bos_token_id]:
            p = [tokenizer.bos_token_id] + p
        budget = max_length - len(ids)
        if len(p) + len(a) > budget:
            truncated = True
            if turn > 0:
                break
            if len(p) <= budget // 2:
                p, a = p, a[:budget - len(p)]
            elif len(a) <= budget // 2:
                p, a = p[:budget - len(a)], a
            else:
                p, a = p[:budget - budget // 2], a[:budget // 2]
        ids += p + a
        labels += [IGNORE_INDEX] * len(p) + a
    return ids, labels, truncated


@pytest.mark.parametrize("bos", [False, True])
def test_batched_encoding_equals_encoding_each_piece_alone(tmp_path, bos):
    import random

    from conftest import build_tokenizer
    from medtrain.tokenization import encode_dialogs

    tok = build_tokenizer(tmp_path / "tok")
    if bos:  # a tokenizer that prepends BOS by default (Llama-style)
        from tokenizers import processors

        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
        assert tok("a")["input_ids"][0] == tok.bos_token_id
    rng = random.Random(0)
    words = ["fever", "cough", "rest", "发烧", "多喝水。", "tea", "doctor", "?", " ", "\n"]
    dialogs = []
    for _ in range(60):
        turns = rng.randint(1, 4)
        dialogs.append([("".join(rng.choices(words, k=rng.randint(0, 12))),
                         "".join(rng.choices(words, k=rng.randint(1, 12))) + "</s>") for _ in range(turns)])
    for max_length in (4, 9, 20, 45, 1000):
        batched = encode_dialogs(tok, dialogs, max_length)
        for dialog, encoded in zip(dialogs, batched):
            ids, labels, truncated = reference_encode(tok, dialog, max_length)
            assert (encoded.input_ids, encoded.labels, encoded.truncated) == (ids, labels, truncated), (dialog, max_length)
            assert encode_dialog(tok, dialog, max_length) == encoded
