"""Tool calling end to end: data in both layouts, rendering (a tokenizer's own template with tools=, or a family's
text format), masks (calls trained, results not), parsing generated calls back, and SFT/DPO runs.
"""

from __future__ import annotations

import functools
import json
import os

import pytest

from conftest import requires_shared, shared_path
from medtrain.chat_format import TemplateChatFormat, TokenizerChatFormat, get_chat_format
from medtrain.errors import DataError
from medtrain.formats import load_conversations, load_preferences, load_prompts
from medtrain.templates import get_conv_template
from medtrain.tokenization import IGNORE_INDEX, encode_dialog
from medtrain.tools import TOOL_FORMATS, parse_tool_calls

SCHEMA = {"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": SCHEMA}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "It is 21 degrees."},
], "tools": json.dumps([SCHEMA])}
OPENAI = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
], "tools": TOOLS}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained_runs(tokenizer, encoded) -> list[str]:
    """The decoded text of each run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# ---- data ---------------------------------------------------------------------------------------------------------

def test_sharegpt_and_openai_tool_records_load_alike(tmp_path):
    share = load_conversations([write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])])[0]
    openai = load_conversations([write_jsonl(tmp_path / "o.jsonl", [OPENAI])])[0]
    assert share["messages"] == openai["messages"] == MESSAGES
    assert share["tools"] == openai["tools"] == TOOLS


@pytest.mark.parametrize("turns, tools, message", [
    ([("human", "q"), ("function_call", "{not json"), ("observation", "r"), ("gpt", "a")], None,
     "conversations[1].value: invalid JSON"),
    ([("human", "q"), ("function_call", '{"arguments": {}}'), ("observation", "r"), ("gpt", "a")], None,
     "conversations[1].value: expected a call"),
    ([("human", "q"), ("function_call", '{"name": "f", "arguments": "[1]"}'), ("observation", "r"), ("gpt", "a")],
     None, "conversations[1].value.arguments: expected a JSON object of arguments, got list"),
    ([("human", "q"), ("observation", "r"), ("gpt", "a")], None, "conversations[1]: roles out of order: expected 'assistant'"),
    ([("human", "q"), ("function_call", '{"name": "f"}'), ("gpt", "a")], None,
     "conversations[2]: roles out of order: expected 'tool'"),
    ([("human", "q"), ("gpt", "a")], "[{broken", "tools: invalid JSON"),
    ([("human", "q"), ("gpt", "a")], '[{"description": "no name"}]', "tools[0]: expected a tool schema"),
])
def test_bad_tool_records_name_the_field(tmp_path, turns, tools, message):
    row = {"conversations": [{"from": r, "value": v} for r, v in turns]}
    if tools:
        row["tools"] = tools
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_conversations([path])
    assert str(err.value).startswith(f"{path}:1: ") and message in str(err.value), str(err.value)


def test_glaive_demo_loads_whole():
    path = shared_path("data", "general", "glaive_toolcall_en_demo.json")
    if not path.is_file():
        pytest.skip("../shared is absent")
    records = load_conversations([str(path)])
    assert len(records) == 300
    calls = [m for r in records for m in r["messages"] if m.get("tool_calls")]
    assert len(calls) == 211 and sum(m["role"] == "tool" for r in records for m in r["messages"]) == 211
    assert all(r["tools"] for r in records if any(m.get("tool_calls") for m in r["messages"]))


def test_preference_pairs_whose_replies_are_tool_calls(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"}], "tools": json.dumps([SCHEMA]),
           "chosen": {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
           "rejected": {"from": "gpt", "value": "I cannot check the weather."}}
    pair = load_preferences([write_jsonl(tmp_path / "p.jsonl", [row])])[0]
    assert pair["chosen"] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert pair["rejected"] == "I cannot check the weather." and pair["tools"] == TOOLS
    prompt = load_prompts([write_jsonl(tmp_path / "q.jsonl", [{**SHAREGPT, "conversations": SHAREGPT["conversations"][:1]}])])
    assert prompt[0]["tools"] == TOOLS


# ---- rendering and masks -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def qwen25():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen2.5")))


QWEN_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function signatures "
    "within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


@requires_shared
def test_qwen25_own_template_layout():
    tok = qwen25()
    fmt = get_chat_format(tok, None)
    assert isinstance(fmt, TokenizerChatFormat) and fmt.supports_tools
    [pieces] = fmt.samples(MESSAGES, TOOLS)  # the template keeps history: one sample
    assert pieces == [
        (QWEN_SYSTEM + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", QWEN_CALL),
        ('\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
         "It is 21 degrees.<|im_end|>"),
    ]
    official = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    encoded = encode_dialog(tok, pieces, 4096)
    assert encoded.input_ids == tok.encode(official[: -len("\n")], add_special_tokens=False)
    # Trained: the call and the final answer (each with <|im_end|>); masked: system+tools, user, tool result
    assert trained_runs(tok, encoded) == [QWEN_CALL, "It is 21 degrees.<|im_end|>"]
    assert sum(label != IGNORE_INDEX for label in encoded.labels) == len(
        tok.encode(QWEN_CALL + "It is 21 degrees.<|im_end|>", add_special_tokens=False))
    # The registered qwen template writes the same bytes with its own tool format
    assert TemplateChatFormat(get_conv_template("qwen")).samples(MESSAGES, TOOLS) == [pieces]
    # Generation prompt after the tool result = the template's own
    assert fmt.generation_prompt(MESSAGES[:3], TOOLS) == tok.apply_chat_template(
        MESSAGES[:3], tools=TOOLS, tokenize=False, add_generation_prompt=True)


@requires_shared
def test_qwen3_own_template_with_tools_matches_registered_qwen3():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    ours = TemplateChatFormat(get_conv_template("qwen3")).samples(MESSAGES, TOOLS)
    assert TokenizerChatFormat(tok).samples(MESSAGES, TOOLS) == ours and len(ours) == 2


DEFAULT_SYSTEM_BLOCK = (
    "# Tools\n\nYou can call the following functions (JSON schemas, one per line):\n" + json.dumps(SCHEMA)
    + "\n\nTo call functions, answer only with one block per call:\nAction: <function name>\n"
    "Action Input: <the arguments as a JSON object>"
)


def test_default_tool_format_layout_under_a_template_without_tools(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)  # ChatML template that knows nothing of tools
    fmt = get_chat_format(tok, None)
    assert not fmt.supports_tools
    [pieces] = fmt.samples(MESSAGES, TOOLS)
    call = 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>'
    assert pieces == [
        ("<|im_start|>system\n" + DEFAULT_SYSTEM_BLOCK + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
         "<|im_start|>assistant\n", call),
        ('\n<|im_start|>user\nObservation: {"temp": 21}<|im_end|>\n<|im_start|>assistant\n',
         "It is 21 degrees.<|im_end|>"),
    ]
    encoded = encode_dialog(tok, pieces, 4096)
    assert trained_runs(tok, encoded) == [call, "It is 21 degrees.<|im_end|>"]
    # A registered template without its own tool format uses the same text (vicuna: system, USER:/ASSISTANT:)
    [vicuna] = TemplateChatFormat(get_conv_template("vicuna"), system_prompt="").samples(MESSAGES, TOOLS)
    assert vicuna == [
        (DEFAULT_SYSTEM_BLOCK + " USER: Weather in Paris? ASSISTANT:",
         ' Action: get_weather\nAction Input: {"city": "Paris"}</s>'),
        ('USER: Observation: {"temp": 21} ASSISTANT:', " It is 21 degrees.</s>"),
    ]


@pytest.mark.parametrize("name, call, result", [
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
     '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>',
     '[TOOL_RESULTS] {"content": {"temp": 21}}[/TOOL_RESULTS]'),
    ("glm4", 'get_weather\n{"city": "Paris"}<|endoftext|>', '<|observation|>\n{"temp": 21}<|assistant|>'),
])
def test_family_tool_formats(name, call, result):
    template = get_conv_template(name)
    [pieces] = TemplateChatFormat(template).samples(MESSAGES, TOOLS)
    assert pieces[0][1] == call and pieces[1][0] == result
    content, calls = parse_tool_calls(call[: -len(template.stop_str)], TemplateChatFormat(template))
    assert (content, calls) == ("", [{"name": "get_weather", "arguments": {"city": "Paris"}}])


# ---- parsing generated calls back ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TOOL_FORMATS))
def test_every_tool_format_parses_its_own_calls(name):
    fmt = TOOL_FORMATS[name]
    calls = [CALL, {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET", "n": 2}}}]
    expected = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET", "n": 2}}]
    if name == "glm4":  # GLM-4 writes one call per turn
        calls, expected = calls[:1], expected[:1]
    assert parse_tool_calls(fmt.calls_text(calls), name) == ("", expected)
    assert parse_tool_calls("Just an answer, no call.", name) == ("Just an answer, no call.", [])


def test_parse_keeps_content_and_refuses_malformed_calls():
    assert parse_tool_calls('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "qwen") == (
        "Let me check.", [{"name": "f", "arguments": {"x": 1}}])
    # a malformed call stays in the content (never guessed at, never lost), in every format
    bad = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(bad, "qwen") == (bad, [])
    good = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls(f"A {good}\n{bad} B", "qwen") == (f"A \n{bad} B", [{"name": "f", "arguments": {}}])
    assert parse_tool_calls("[TOOL_CALLS] [{oops", "mistral") == ("[TOOL_CALLS] [{oops", [])
    assert parse_tool_calls('Action: f\nAction Input: {"x": [1, 2]}', "default") == ("", [{"name": "f", "arguments": {"x": [1, 2]}}])
    assert parse_tool_calls("Action: f\nAction Input: nope", "default") == ("Action: f\nAction Input: nope", [])


# ---- runs ------------------------------------------------------------------------------------------------------------

def test_sft_on_the_glaive_demo_runs_and_trains_the_calls(tiny_chat_model_dir, tmp_path):
    import supervised_finetuning

    source = shared_path("data", "general", "glaive_toolcall_en_demo.json")
    if not source.is_file():
        pytest.skip("../shared is absent")
    data = tmp_path / "data"
    data.mkdir()
    (data / "glaive.json").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    trainer = supervised_finetuning.main([
        "--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data), "--output_dir", str(out),
        "--report_to", "none", "--max_steps", "1", "--model_max_length", "256", "--max_train_samples", "8",
        "--per_device_train_batch_size", "4", "--save_strategy", "no"])
    assert trainer.state.global_step == 1 and (out / "adapter_model.safetensors").is_file()
    # What was trained on: the first call of the demo is supervised, its observation is not
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    record = load_conversations([str(data / "glaive.json")])[0]
    [pieces] = get_chat_format(tok, None).samples(record["messages"], record["tools"])
    runs = trained_runs(tok, encode_dialog(tok, pieces, 100_000))
    assert runs[1] == ('Action: search_recipes\nAction Input: {"ingredients": ["chicken", "bell peppers", "rice"]}'
                       "<|im_end|>")
    assert not any("Observation" in run or "recipes\": [" in run for run in runs)


def test_dpo_on_tool_preference_pairs_runs(tiny_chat_model_dir, tmp_path):
    import dpo_training

    rows = []
    for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima"]):
        rows.append({"conversations": [{"from": "human", "value": f"Weather in {city}?"}], "tools": json.dumps([SCHEMA]),
                     "chosen": {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
                     "rejected": {"from": "gpt", "value": f"I cannot check {city}."}})
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "pairs.jsonl", rows)
    out = tmp_path / "out"
    trainer = dpo_training.main([
        "--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data), "--output_dir", str(out),
        "--report_to", "none", "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
        "--model_max_length", "512"])
    assert trainer.state.global_step == 1
    row = trainer.train_dataset[0]
    tok = trainer.processing_class
    assert tok.decode(row["chosen_ids"]).startswith("Action: get_weather\nAction Input: {\"city\": ")
    assert "# Tools" in tok.decode(row["prompt_ids"])


@pytest.mark.slow
@requires_shared
def test_smollm2_learns_glaive_tool_calls_and_a_held_out_call_parses(tmp_path, capsys):
    """LoRA SFT of SmolLM2-135M-Instruct (ChatML without tools: the default tool format) on glaive calls; the loss
    falls and, asked a held-out question with its tools, the model emits a call that parses to an offered tool."""
    import torch

    import supervised_finetuning
    from inference import generate_responses

    from conftest import ROOT

    smol = ROOT / "models" / "SmolLM2-135M-Instruct"
    if not (smol / "config.json").is_file():
        pytest.skip("models/SmolLM2-135M-Instruct absent (prepare_model.py)")
    rows = json.loads(shared_path("data", "general", "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    # Conversations that open with a question answered by a call: the first reply is the thing to learn
    calling = [r for r in rows if len(r["conversations"]) > 1 and r["conversations"][1]["from"] == "function_call"]
    train, held_out = calling[:-8], calling[-8:]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        trainer = supervised_finetuning.main([
            "--model_name_or_path", str(smol), "--train_file_dir", str(data), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--max_steps", "40", "--model_max_length", "384", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "4", "--logging_steps", "5", "--save_strategy", "no", "--seed", "0",
            "--lora_rank", "16", "--lora_alpha", "32", "--do_eval", "False", "--disable_tqdm", "True"])
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        model, tok = trainer.model, trainer.processing_class
        fmt = get_chat_format(tok, None)
        records = [load_conversations([str(_write_one(tmp_path / f"h{i}.json", r))])[0] for i, r in enumerate(held_out)]
        prompts = [r["messages"][:1] for r in records]
        answers = generate_responses(model, tok, fmt, prompts, max_new_tokens=64, batch_size=4,
                                     tools=[r["tools"] for r in records])
    finally:
        torch.set_num_threads(threads)
    parsed = [parse_tool_calls(a, fmt) for a in answers]
    offered = [{t["function"]["name"] for t in r["tools"]} for r in records]
    good = sum(any(c["name"] in names for c in calls) for (_, calls), names in zip(parsed, offered))
    with capsys.disabled():
        print("\nSmolLM2 glaive tool SFT: losses", losses, f"held-out calls parsed to an offered tool: {good}/8")
        print("first held-out answer:", repr(answers[0]))
    assert losses[-1] < losses[0] * 0.7
    assert good >= 4


def _write_one(path, row):
    path.write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    return path
