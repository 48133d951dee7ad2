"""openai_api.py on tiny random models, talked to with the official `openai` client over real HTTP on a free
loopback port: answers equal inference.py's, streams add up to them, a 3-turn history is fed to the model as the
exact token ids SFT trained on, stop strings / max_tokens / n / seed behave as OpenAI documents, 32 concurrent
requests are batched and all answered, a client that disconnects mid-stream frees its slot, a full queue answers
429, and every malformed request gets its status and a message naming the field while the server keeps serving.
Tools: a request with tools and tool-call history is fed as training's ids; answers with calls (from a scripted
model under the real Engine) come back as OpenAI tool_calls, streamed and not."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import ROOT
from medtrain.chat_format import get_chat_format, save_chat_format
from medtrain.data import tokenize_conversations
from medtrain.entrypoint import run_main
from medtrain.generation import generate_responses, prompt_ids
from medtrain.openai_server import _CallHolder, create_app
from medtrain.generation import GenerationModelArguments
from medtrain.serving import Engine, ServeArguments, load_engine
from medtrain.tokenization import IGNORE_INDEX
from medtrain.tools import TOOL_FORMATS, parse_tool_calls

KEY = "test-key-123"
SYSTEM = "You are a careful doctor."
U1, A1, U2, A2, U3 = "I have a fever.", "Rest and drink water.", "For how long?", "Three days.", "And then?"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core machine thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LiveServer:
    """The API app under uvicorn in a thread, on a free loopback port (port 0: the OS picks)."""

    def __init__(self, model_dir: Path, name: str = "tiny", api_key: str | None = KEY, engine: Engine | None = None,
                 **engine_flags):
        args = ServeArguments(**engine_flags)
        self.engine, self.info = (engine, {}) if engine else load_engine(
            GenerationModelArguments(model_name_or_path=str(model_dir)), args)
        self.name = name
        app = create_app(self.engine, name, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                         max_request_bytes=4096, info=self.info)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir):
    live = LiveServer(tiny_chat_model_dir, max_batch_size=8, max_tokens_limit=256)
    yield live
    live.close()


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_chat_model_dir) -> Path:
    """The tiny chat model with room for 4096 positions, for generations long enough to interrupt."""
    path = tmp_path_factory.mktemp("tiny-long")
    for item in tiny_chat_model_dir.iterdir():
        shutil.copy(item, path / item.name)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return path


def chat(live: LiveServer, messages, **kwargs):
    return live.client.chat.completions.create(model=live.name, messages=messages, **kwargs)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def answer_directly(live: LiveServer, messages, max_new_tokens: int) -> str:
    engine = live.engine
    return generate_responses(engine.model, engine.tokenizer, engine.chat_format, [messages],
                              max_new_tokens=max_new_tokens, batch_size=1, temperature=0.0)[0]


# ----------------------------------------------------------------------------------------------------------------
# Chat, streamed and not


def test_models_lists_the_served_model_and_its_chat_format(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    extra = models.data[0].model_extra
    assert extra["chat_format"] == {"kind": "tokenizer", "template_name": None, "system_prompt": None}
    assert extra["max_model_len"] == 512 and extra["adapter"] is None
    assert server.health()["status"] == "ok"


def test_non_streamed_answer_is_inference_py_answer(server):
    messages = [{"role": "user", "content": U1}]
    response = chat(server, messages, temperature=0, max_tokens=16)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == answer_directly(server, messages, 16)
    assert choice.finish_reason in ("stop", "length")
    ids = prompt_ids(server.engine.tokenizer, server.engine.chat_format, messages)
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.total_tokens == len(ids) + response.usage.completion_tokens
    assert response.id.startswith("chatcmpl-") and response.model == "tiny"


def test_streamed_chunks_add_up_to_the_non_streamed_answer(server):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1}]
    whole = chat(server, messages, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    chunks = list(chat(server, messages, temperature=0, max_tokens=24, stream=True,
                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed, in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": U1}], "max_tokens": 3, "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    json.loads(events[-2][6:])  # every other event is one JSON chunk


def training_prompt_ids(tokenizer, chat_format, conversation: list[dict], tools: list | None = None) -> list[int]:
    """SFT's own encoding of ``conversation`` (medtrain.data.tokenize_conversations), cut before the last answer's
    supervised tokens: what the model saw in training right before it had to produce that answer."""
    dataset = tokenize_conversations([{"messages": conversation, "source": "test", "tools": tools}], tokenizer,
                                     chat_format, max_length=4096, train_on_inputs=False)
    input_ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start]


@pytest.mark.parametrize("case", ["tokenizer_chatml", "recorded_vicuna_with_system_prompt"])
def test_three_turn_history_reaches_the_model_as_training_tokenised_it(case, server, tiny_model_dir, tmp_path):
    history = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
               {"role": "user", "content": U2}, {"role": "assistant", "content": A2},
               {"role": "user", "content": U3}]
    if case == "tokenizer_chatml":
        live, close = server, False
        history = [{"role": "system", "content": SYSTEM}] + history
        chat_format = get_chat_format(live.engine.tokenizer, None, None)
        expected_text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>"
                         f"assistant\n{A1}<|im_end|>\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n"
                         f"{A2}<|im_end|>\n<|im_start|>user\n{U3}<|im_end|>\n<|im_start|>assistant\n")
    else:
        # A model trained with --template_name vicuna --system_prompt SYSTEM: the server must use that record.
        model_dir = tmp_path / "sft-vicuna"
        shutil.copytree(tiny_model_dir, model_dir)
        from transformers import AutoTokenizer

        chat_format = get_chat_format(AutoTokenizer.from_pretrained(model_dir), "vicuna", SYSTEM)
        save_chat_format(chat_format, str(model_dir))
        live, close = LiveServer(model_dir), True
        expected_text = f"{SYSTEM} USER: {U1} ASSISTANT: {A1}</s>USER: {U2} ASSISTANT: {A2}</s>USER: {U3} ASSISTANT:"
    try:
        response = chat(live, history, max_tokens=4, temperature=0, extra_body={"return_token_ids": True})
        sent = response.model_extra["prompt_token_ids"]
        trained = training_prompt_ids(live.engine.tokenizer, chat_format,
                                      history + [{"role": "assistant", "content": "Rest."}])
        assert sent == trained
        assert live.engine.tokenizer.decode(sent, skip_special_tokens=False) == expected_text
        assert response.usage.prompt_tokens == len(trained)
        assert len(response.choices[0].model_extra["token_ids"]) == response.usage.completion_tokens
    finally:
        if close:
            live.close()


# ----------------------------------------------------------------------------------------------------------------
# Sampling controls


def test_stop_strings_cut_the_answer_before_them(server):
    messages = [{"role": "user", "content": U2}]
    full = chat(server, messages, temperature=0, max_tokens=40, extra_body={"ignore_eos": True}).choices[0]
    text = full.message.content
    # a stop text from the middle of the answer (plain characters, not at its start)
    stop = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 2) if text[i:i + 2].isalnum())
    expected = text[:text.find(stop)].strip()
    cut = chat(server, messages, temperature=0, max_tokens=40, stop=["zzzz-never", stop],
               extra_body={"ignore_eos": True}).choices[0]
    assert (cut.message.content, cut.finish_reason) == (expected, "stop")
    streamed = chat(server, messages, temperature=0, max_tokens=40, stop=stop, stream=True,
                    extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_max_tokens_bounds_the_answer(server):
    messages = [{"role": "user", "content": U1}]
    for max_tokens in (1, 7):
        response = chat(server, messages, temperature=0, max_tokens=max_tokens,
                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert response.usage.completion_tokens == max_tokens
        assert len(response.choices[0].model_extra["token_ids"]) == max_tokens
        assert response.choices[0].finish_reason == "length"


def test_n_choices_and_seed_reproduce_a_sampled_answer(server):
    messages = [{"role": "user", "content": U1}]
    kwargs = dict(temperature=1.0, top_p=0.95, max_tokens=12, n=3, seed=1234, extra_body={"ignore_eos": True})
    first, again = chat(server, messages, **kwargs), chat(server, messages, **kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # same seed, same answers
    assert len(set(texts)) > 1  # the three choices are sampled separately
    other = chat(server, messages, **{**kwargs, "seed": 99})
    assert [c.message.content for c in other.choices] != texts
    assert first.usage.completion_tokens == 36


# ----------------------------------------------------------------------------------------------------------------
# Concurrency


def test_32_concurrent_requests_are_batched_and_all_answered(server):
    questions = [f"Question {i}: I have had a cough for {i} days." for i in range(32)]
    batches_before = server.engine.batches

    def ask(question: str):
        return chat(server, [{"role": "user", "content": question}], temperature=0, max_tokens=6,
                    extra_body={"return_token_ids": True})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(ask, questions))
    assert len(responses) == 32
    for question, response in zip(questions, responses):
        ids = prompt_ids(server.engine.tokenizer, server.engine.chat_format, [{"role": "user", "content": question}])
        assert response.model_extra["prompt_token_ids"] == ids  # each answer belongs to its own question
        assert response.choices[0].finish_reason in ("stop", "length")
        assert 1 <= response.usage.completion_tokens <= 6
    sizes = server.engine.batch_rows[-(server.engine.batches - batches_before):]
    assert sum(sizes) == 32 and max(sizes) <= 8
    assert len(sizes) < 32  # requests arriving together shared generate calls
    assert server.health()["queued"] == 0


def _content_chunks(lines, count: int) -> list[str]:
    """Read SSE ``lines`` (one iterator kept open: a dropped httpx line iterator closes the connection) until
    ``count`` chunks with answer text came."""
    got = []
    for line in lines:
        if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
            got.append(line)
            if len(got) == count:
                break
    return got


@pytest.fixture(scope="module")
def small_server(long_model_dir):
    """One row per batch, one request waiting at most: easy to fill."""
    live = LiveServer(long_model_dir, max_batch_size=1, max_queue_size=1, max_tokens_limit=4000)
    jobs = []
    submit = live.engine.submit
    live.engine.submit = lambda job: submit(job) and (jobs.append(job) or job)
    live.jobs = jobs
    yield live
    live.close()


def long_stream(live: LiveServer, http: httpx.Client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": U1}], "max_tokens": 4000, "stream": True,
            "ignore_eos": True}
    return http.stream("POST", f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_disconnect_mid_stream_stops_generation_and_frees_the_slot(small_server):
    live = small_server
    with httpx.Client(timeout=60) as http:
        with long_stream(live, http) as response:
            lines = response.iter_lines()
            assert len(_content_chunks(lines, 3)) == 3
            job = live.jobs[-1]
            assert not job.cancelled.is_set()
        # leaving the block closed the connection mid-stream
    wait_for(lambda: job.cancelled.is_set(), what="the server to notice the disconnect")
    wait_for(lambda: live.health()["active_rows"] == 0, what="the slot to be freed")
    assert 3 <= job.tokens_generated < 4000  # generation stopped early, it did not run to max_tokens
    stopped_at = job.tokens_generated
    time.sleep(0.2)
    assert job.tokens_generated == stopped_at
    answer = chat(live, [{"role": "user", "content": U2}], temperature=0, max_tokens=5)  # the slot serves again
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_full_queue_answers_429_and_recovers(small_server):
    live = small_server
    with httpx.Client(timeout=60) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        with long_stream(live, http) as response:
            lines = response.iter_lines()
            _content_chunks(lines, 1)  # the batch slot is taken
            waiting = pool.submit(chat, live, [{"role": "user", "content": U2}], temperature=0, max_tokens=5)
            wait_for(lambda: live.health()["queued"] == 1, what="the second request to queue")
            with pytest.raises(openai.RateLimitError) as err:
                chat(live, [{"role": "user", "content": U3}], max_tokens=5)
            assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "1"
            assert "busy" in err.value.body["message"] and err.value.body["code"] == "queue_full"
            assert not waiting.done() and live.jobs[-2].tokens_generated > 0
        # the stream's client left: the queued request runs now, and the server takes new ones
        assert waiting.result(timeout=60).choices[0].finish_reason in ("stop", "length")
    assert chat(live, [{"role": "user", "content": U3}], max_tokens=3).usage.completion_tokens >= 1


# ----------------------------------------------------------------------------------------------------------------
# Bad requests


def _messages(role: str = "user"):
    return [{"role": role, "content": U1}]


# (case, body or raw bytes, headers, status, message fragment, param)
BAD_REQUESTS = [
    ("missing messages", {"model": "tiny"}, None, 400, "messages: Field required", "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, None, 400, "messages: List should have at least 1",
     "messages"),
    ("unknown role", {"model": "tiny", "messages": _messages("doctor")}, None, 400,
     "messages[0].role: Input should be 'system', 'user', 'assistant' or 'tool' (got 'doctor')", "messages[0].role"),
    ("content not text", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, None, 400,
     "messages[0].content", "messages[0].content"),
    ("roles out of order", {"model": "tiny", "messages": _messages() + _messages()}, None, 400,
     "messages[1].role: expected 'assistant', got 'user'", "messages[1].role"),
    ("ends with the assistant", {"model": "tiny", "messages": _messages() + _messages("assistant")}, None, 400,
     "messages[1].role: the last message must be the user's or a tool result", "messages[1].role"),
    ("negative max_tokens", {"model": "tiny", "messages": _messages(), "max_tokens": -5}, None, 400,
     "max_tokens: Input should be greater than or equal to 1 (got -5)", "max_tokens"),
    ("max_tokens over the cap", {"model": "tiny", "messages": _messages(), "max_tokens": 100000}, None, 400,
     "max_tokens: at most 256 (--max_tokens_limit), got 100000", "max_tokens"),
    ("temperature out of range", {"model": "tiny", "messages": _messages(), "temperature": 3}, None, 400,
     "temperature: Input should be less than or equal to 2", "temperature"),
    ("five stop strings", {"model": "tiny", "messages": _messages(), "stop": list("abcde")}, None, 400,
     "stop: Value error, at most 4 stop sequences", "stop"),
    ("n over the batch size", {"model": "tiny", "messages": _messages(), "n": 9}, None, 400,
     "n: at most 8 (--max_batch_size)", "n"),
    ("tool without a function", {"model": "tiny", "messages": _messages(), "tools": [{"type": "function"}]},
     None, 400, "tools[0].function: Field required", "tools[0].function"),
    ("prompt longer than the context", {"model": "tiny", "messages": _messages() and
                                        [{"role": "user", "content": "fever " * 600}]}, None, 400,
     "maximum context length is 512 tokens", "messages"),
    ("another model", {"model": "gpt-4o", "messages": _messages()}, None, 404,
     "model 'gpt-4o' is not served here; this server serves 'tiny'", "model"),
    ("non-JSON body", b"{'model': 'tiny',", None, 400, "the request body is not valid JSON", None),
    ("JSON that is not an object", b"[1, 2]", None, 400, "the request body must be a JSON object, got list", None),
    ("oversized body", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}, None, 413,
     "the request body is larger than 4096 bytes", None),
    ("no API key", {"model": "tiny", "messages": _messages()}, {"Authorization": ""}, 401,
     "missing or incorrect API key", None),
    ("wrong API key", {"model": "tiny", "messages": _messages()}, {"Authorization": "Bearer nope"}, 401,
     "missing or incorrect API key", None),
    ("tool without a name", {"model": "tiny", "messages": _messages(),
                             "tools": [{"type": "function", "function": {"description": "weather"}}]}, None, 400,
     "tools[0].function.name: Field required", "tools[0].function.name"),
    ("tool of another type", {"model": "tiny", "messages": _messages(),
                              "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, None, 400,
     "tools[0].type: Input should be 'function'", "tools[0].type"),
    ("tool_choice required", {"model": "tiny", "messages": _messages(), "tools": [{"type": "function", "function":
                              {"name": "f"}}], "tool_choice": "required"}, None, 400,
     'tool_choice: "required" is not supported', "tool_choice"),
    ("tool_choice auto without tools", {"model": "tiny", "messages": _messages(), "tool_choice": "auto"}, None, 400,
     "tool_choice: 'auto' is only allowed when tools are given", "tool_choice"),
    ("call arguments not JSON", {"model": "tiny", "messages": _messages() + [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{city"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}]}, None, 400,
     "messages[1].tool_calls[0].function.arguments: invalid JSON", "messages[1].tool_calls[0].function.arguments"),
    ("tool result without a call", {"model": "tiny", "messages": _messages() + _messages("tool")}, None, 400,
     "messages[1].role: expected 'assistant', got 'tool'", "messages[1].role"),
    ("call not followed by its result", {"model": "tiny", "messages": _messages() + [
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}] + _messages()},
     None, 400, "messages[2].role: expected 'tool', got 'user'", "messages[2].role"),
]


def test_bad_request_catalogue_and_the_server_keeps_serving(server):
    for case, body, headers, status, message, param in BAD_REQUESTS:
        all_headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=all_headers)
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert message in error["message"], (case, error)
        assert error["param"] == param, (case, error)
        assert error["type"] in ("invalid_request_error",), case
    # the same through the official client: typed exceptions with the server's message
    with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be greater than or equal to 1"):
        chat(server, _messages(), max_tokens=-1)
    with pytest.raises(openai.AuthenticationError, match="missing or incorrect API key"):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).completions.create(
            model="tiny", prompt="hi")
    # a chunked body (no Content-Length) over the limit is refused while it arrives
    chunks = iter([b'{"model": "tiny", "messages": [{"role": "user", "content": "', b"x" * 3000, b"x" * 3000, b'"}]}'])
    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 413
    # and after all that, it still answers
    response = chat(server, _messages(), temperature=0, max_tokens=4)
    assert response.choices[0].finish_reason in ("stop", "length") and server.health()["queued"] == 0


# ----------------------------------------------------------------------------------------------------------------
# The command line


def test_command_line_serves_on_loopback_with_a_key(tiny_chat_model_dir):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "openai_api.py"), "--model_name_or_path", str(tiny_chat_model_dir), "--port", "0",
         "--api_key", KEY, "--num_threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    output = []
    try:
        url = None
        for line in process.stdout:
            output.append(line)
            if "Uvicorn running on http://" in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
                break
        assert url and url.startswith("http://127.0.0.1:"), "".join(output)
        name = tiny_chat_model_dir.name
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        response = client.chat.completions.create(model=name, messages=_messages(), max_tokens=3, temperature=0)
        assert response.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_bad_flags_exit_2_naming_them(tiny_chat_model_dir, capsys):
    import openai_api

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: openai_api.main(["--model_name_or_path", str(tiny_chat_model_dir), "--max_batch_size", "0",
                                          "--max_queue_size", "0"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max_batch_size must be >= 1, got 0." in err and "--max_queue_size must be >= 1, got 0." in err


# ----------------------------------------------------------------------------------------------------------------
# Tool calls

WEATHER = {"type": "function", "function": {  # small: the tiny tokenizer spends a token on almost every character
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
# An OpenAI client's history: a call (arguments as JSON text), its result, the answer, a new question.
TOOL_HISTORY = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 C in Paris."},
    {"role": "user", "content": "And in Rome?"},
]
# The same conversation as a training record holds it (medtrain.formats): arguments parsed, no call ids.
TRAINED_HISTORY = [
    TOOL_HISTORY[0], TOOL_HISTORY[1],
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp_c": 21}'},
    TOOL_HISTORY[4], TOOL_HISTORY[5],
]


@pytest.mark.parametrize("ending", ["user", "tool"])
def test_tools_and_tool_history_reach_the_model_as_training_tokenised_them(server, ending):
    history, trained = list(TOOL_HISTORY), list(TRAINED_HISTORY)
    if ending == "tool":  # the model answers a tool result
        history, trained = history[:4], trained[:4]
    response = chat(server, history, tools=[WEATHER], max_tokens=3, temperature=0,
                    extra_body={"return_token_ids": True})
    sent = response.model_extra["prompt_token_ids"]
    tokenizer, chat_format = server.engine.tokenizer, server.engine.chat_format
    assert sent == training_prompt_ids(tokenizer, chat_format, trained + [{"role": "assistant", "content": "Ok."}],
                                       tools=[WEATHER])
    text = tokenizer.decode(sent, skip_special_tokens=False)
    # the tiny ChatML template has no tool support: the default tool format writes tools, calls and results as text
    assert json.dumps(WEATHER["function"]) in text
    assert 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>' in text
    assert '<|im_start|>user\nObservation: {"temp_c": 21}<|im_end|>' in text
    # tool_choice "none": the model is not offered the tools (the prompt is training's rendering without them)
    response = chat(server, history, tools=[WEATHER], tool_choice="none", max_tokens=3, temperature=0,
                    extra_body={"return_token_ids": True})
    assert response.model_extra["prompt_token_ids"] == training_prompt_ids(
        tokenizer, chat_format, trained + [{"role": "assistant", "content": "Ok."}])


class ScriptedModel(torch.nn.Module):
    """Stands in for the model under a real Engine: "generates" ``script`` token by token through the engine's own
    stopping criteria (the tracker that streams text, stops rows and finishes them), so an answer with tool calls
    is deterministic while everything from the HTTP request to the streamed chunks is the production path."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device from the parameters
        self.script: list[int] = []

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
        for token in self.script:
            input_ids = torch.cat([input_ids, torch.full((input_ids.shape[0], 1), token)], dim=1)
            if stopping_criteria(input_ids, None).all():
                break
        return input_ids


@pytest.fixture(scope="module")
def scripted(tiny_chat_model_dir):
    """Servers whose model answers a set text: one per chat format (the tokenizer's ChatML, which writes calls in
    the default Action format, and the registered qwen template with <tool_call> blocks)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir, padding_side="left")
    config = AutoConfig.from_pretrained(tiny_chat_model_dir, max_position_embeddings=4096)  # room for qwen's prompt
    servers = {}
    for template in (None, "qwen"):
        model = ScriptedModel(config)
        engine = Engine(model, tokenizer, get_chat_format(tokenizer, template, None), max_batch_size=2)
        servers[template or "chatml"] = (LiveServer(tiny_chat_model_dir, engine=engine), model)
    yield servers
    for live, _ in servers.values():
        live.close()


def say(scripted, fmt: str, answer: str) -> LiveServer:
    live, model = scripted[fmt]
    model.script = live.engine.tokenizer.encode(answer, add_special_tokens=False) + [live.engine.stop_ids[0]]
    return live


def streamed(live: LiveServer, **kwargs) -> tuple[list[str], dict, str]:
    """Content deltas, tool calls put together from their deltas (by index), finish reason of one streamed answer."""
    contents, calls, reason = [], {}, None
    for chunk in chat(live, [{"role": "user", "content": "Weather in Rome?"}], stream=True, **kwargs):
        delta = chunk.choices[0].delta
        if delta.content:
            contents.append(delta.content)
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
            assert call.type in (None, "function")
        reason = chunk.choices[0].finish_reason or reason
    return contents, calls, reason


CALLS = {
    "chatml": 'Let me check.\nAction: get_weather\nAction Input: {"city": "Rome"}\n'
              'Action: get_time\nAction Input: {}',
    "qwen": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
}


@pytest.mark.parametrize("fmt", ["chatml", "qwen"])
def test_generated_tool_calls_come_back_as_openai_tool_calls(scripted, fmt):
    live = say(scripted, fmt, CALLS[fmt])
    question = [{"role": "user", "content": "Weather in Rome?"}]
    choice = chat(live, question, tools=[WEATHER, CLOCK], temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Rome"}), ("function", "get_time", {})]
    assert calls[0].function.arguments == '{"city": "Rome"}'  # JSON text, as OpenAI sends it
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    # streamed: the content before the calls arrives as content (never the call text), then each call whole
    contents, streamed_calls, reason = streamed(live, tools=[WEATHER, CLOCK], temperature=0)
    assert "".join(contents) == "Let me check."
    assert reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls.values()] == [
        ("get_weather", {"city": "Rome"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") for c in streamed_calls.values())
    # the calls feed straight back into the next request (the client's usual loop)
    history = question + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C"},
                          {"role": "tool", "tool_call_id": calls[1].id, "content": "12:00"}]
    live = say(scripted, fmt, "It is 18 C at noon.")
    answer = chat(live, history, tools=[WEATHER, CLOCK], temperature=0).choices[0]
    assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == (
        "It is 18 C at noon.", None, "stop")


@pytest.mark.parametrize("fmt, answer", [
    ("chatml", "Action: get_weather\nAction Input: not json"),  # a malformed call is content, never guessed at
    ("qwen", "I cannot <tool_call> that."),
    ("chatml", "No tool is needed: rest and drink water."),
])
def test_answers_without_a_well_formed_call_are_content(scripted, fmt, answer):
    live = say(scripted, fmt, answer)
    choice = chat(live, [{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], temperature=0).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (answer, None, "stop")
    contents, calls, reason = streamed(live, tools=[WEATHER], temperature=0)
    assert ("".join(contents), calls, reason) == (answer, {}, "stop")


def test_tool_choice_none_and_no_tools_leave_the_answer_as_text(scripted):
    live = say(scripted, "qwen", CALLS["qwen"])
    for kwargs in ({"tools": [WEATHER, CLOCK], "tool_choice": "none"}, {}):
        choice = chat(live, [{"role": "user", "content": "Weather in Rome?"}], temperature=0, **kwargs).choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (
            CALLS["qwen"], None, "stop")
        contents, calls, reason = streamed(live, temperature=0, **kwargs)
        assert ("".join(contents), calls, reason) == (CALLS["qwen"], {}, "stop")


def test_a_call_cut_by_max_tokens_stays_length(scripted):
    live = say(scripted, "qwen", CALLS["qwen"])
    choice = chat(live, [{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], temperature=0,
                  max_tokens=8).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert CALLS["qwen"].startswith(choice.message.content)


@pytest.mark.parametrize("name", sorted(TOOL_FORMATS))
def test_streaming_holds_every_tool_format_from_where_its_calls_start(name):
    """Fed a character at a time, the stream never sends call text as content, and content sent + the rest held
    equals the non-streamed split (each format's ``call_starts`` matches what its ``calls_text`` writes)."""
    fmt = TOOL_FORMATS[name]
    prefix = "" if name == "glm4" else "Sure, I will check.\n"  # glm4's call is the whole reply
    text = prefix + fmt.calls_text([{"type": "function", "function": {"name": "get_weather",
                                                                       "arguments": {"city": "Rome"}}}])
    holder = _CallHolder(name)
    sent = "".join(holder.feed(char) for char in text)
    rest, calls = holder.finish()
    content, expected = parse_tool_calls(text, name)
    assert calls == expected == [{"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert sent + rest == content == prefix.strip()
    assert "get_weather" not in sent
