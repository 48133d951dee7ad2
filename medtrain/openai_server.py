"""The OpenAI-compatible HTTP API over a :class:`medtrain.serving.Engine` (FastAPI): the subset openai_api.py serves.

``GET /v1/models``, ``POST /v1/chat/completions`` (JSON, or server-sent events in OpenAI's chunk format ending
with ``data: [DONE]``), ``GET /health``. Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param",
"code"}}``: 400 naming the bad request field, 401 for a missing/wrong key, 404 for another model name, 413 for a
body over the limit, 429 when the queue is full (with Retry-After), 500 when generation fails.

Prompts are the chat format's rendering, tokenised piece by piece as SFT tokenised them
(:func:`medtrain.generation.prompt_ids`), with the request's ``tools`` and tool-call history rendered as training
renders them; calls in the answer are parsed (:func:`medtrain.tools.parse_tool_calls`) into ``message.tool_calls``
(streamed: content up to where a call can start, then each call whole; :class:`_CallHolder`). The request body is read and parsed by hand (not by FastAPI's body
binding) so that an oversized body is refused before it is all read and every error is a 400 in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from .errors import UserError
from .serving import Engine, Event, QueueFull, Request, SamplingParams, _stop_prefix_hold
from .tools import parse_tool_calls, tool_format_of

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code, self.headers = (
            status, message, param, type_, code, headers)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------------------------------------------
# Request schema (unknown fields are ignored, as OpenAI clients send many optional ones)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; an object is taken as well


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool results (accepted; the chat formats do not render it, as in training)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSchema


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted only at their neutral values: anything else would be silently ignored otherwise
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None  # "auto" / "none" (checked in parse_request: the refused kinds get their own message)
    parallel_tool_calls: bool | None = None  # accepted: the model may write several calls, all are returned
    # extensions (as in vLLM): sent with the openai client's extra_body
    ignore_eos: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0)
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    # The tool schemas exactly as the client sent them (key order included: they are rendered into the prompt as
    # JSON, as training renders a record's tools), in training's shape {"type": "function", "function": {...}}.
    _offered: list[dict] | None = PrivateAttr(default=None)

    def offered_tools(self) -> list[dict] | None:
        """The tools rendered into the prompt: none when ``tool_choice`` is "none" (the model is not offered them)."""
        return None if self.tool_choice == "none" else self._offered


def _field_path(loc: tuple) -> str:
    """pydantic's ``('messages', 0, 'role')`` as ``messages[0].role``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("str", "list[", "function-", "literal[")):  # union branch labels
            path += f".{part}" if path else str(part)
    return path


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        # A message whose role is wrong fails every branch of content too: report the role, the root cause.
        for error in err.errors():
            if error["loc"][-1:] == ("role",):
                first = error
                break
        field = _field_path(first["loc"])
        got = f" (got {first['input']!r})" if first["type"] != "missing" and "input" in first else ""
        raise ApiError(400, f"{field}: {first['msg']}{got}", param=field) from None
    if request.presence_penalty or request.frequency_penalty:
        raise ApiError(400, "presence_penalty/frequency_penalty are not supported (use repetition_penalty)",
                       param="presence_penalty" if request.presence_penalty else "frequency_penalty")
    if request.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    check_tool_choice(request)
    if request.tools:
        request._offered = [{"type": "function", "function": tool["function"]} for tool in data["tools"]]
    check_roles(request.messages)
    return request


def check_tool_choice(request: ChatCompletionRequest) -> None:
    """``auto`` (the default with tools) and ``none``; "required" and a named function would need constrained
    decoding, which this server does not do: refused rather than silently not enforced."""
    choice = request.tool_choice
    if choice is None or choice in TOOL_CHOICES:
        if choice == "auto" and not request.tools:
            raise ApiError(400, "tool_choice: 'auto' is only allowed when tools are given", param="tool_choice")
        return
    if choice == "required" or isinstance(choice, dict):
        raise ApiError(400, f"tool_choice: {json.dumps(choice)} is not supported (this server does not force tool "
                       "calls); use 'auto' or 'none'", param="tool_choice")
    raise ApiError(400, f"tool_choice: expected 'auto' or 'none', got {choice!r}", param="tool_choice")


def training_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages in the shape training's data loader gives the chat format (medtrain.formats): tool calls as
    ``{"type": "function", "function": {"name", "arguments": dict}}``, tool results as ``{"role": "tool",
    "content"}``. Arguments that are not a JSON object are a 400 naming the field."""
    out = []
    for i, message in enumerate(messages):
        converted: dict = {"role": message.role, "content": message.text()}
        if message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                field = f"messages[{i}].tool_calls[{j}].function.arguments"
                arguments = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except ValueError as err:
                        raise ApiError(400, f"{field}: invalid JSON ({err})", param=field) from None
                if not isinstance(arguments, dict):
                    raise ApiError(400, f"{field}: expected a JSON object, got {type(arguments).__name__}",
                                   param=field)
                calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
            converted["tool_calls"] = calls
        out.append(converted)
    return out


def check_roles(messages: list[ChatMessage]) -> None:
    """An optional leading system message, then user/assistant alternating from user, ending with user or tool
    results; an assistant turn with ``tool_calls`` is followed by one or more ``tool`` results, then the assistant
    (the order training accepts, medtrain.formats)."""
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        raise ApiError(400, "messages: the conversation has no user message", param="messages")
    previous = None
    for i in range(start, len(messages)):
        message = messages[i]
        if message.tool_calls and message.role != "assistant":
            raise ApiError(400, f"messages[{i}].tool_calls: only assistant messages call tools",
                           param=f"messages[{i}].tool_calls")
        if previous is None:
            allowed = ("user",)
        elif previous.role == "assistant":
            allowed = ("tool",) if previous.tool_calls else ("user",)
        elif previous.role == "tool":
            allowed = ("tool", "assistant")
        else:
            allowed = ("assistant",)
        if message.role not in allowed:
            expected = " or ".join(repr(role) for role in allowed)
            raise ApiError(400, f"messages[{i}].role: expected {expected}, got {message.role!r} (after an "
                           "optional leading system message, roles alternate user/assistant starting with user, an "
                           "assistant message with tool_calls is followed by its tool results, and the last message "
                           "is the user's or a tool result)", param=f"messages[{i}].role")
        previous = message
    if messages[-1].role not in ("user", "tool"):
        raise ApiError(400, f"messages[{len(messages) - 1}].role: the last message must be the user's or a tool "
                       "result", param=f"messages[{len(messages) - 1}].role")


# --------------------------------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_tokens_limit: int = 2048,
               max_request_bytes: int = 1 << 20, default_temperature: float = 1.0, default_top_p: float = 1.0,
               info: dict | None = None) -> FastAPI:
    """The API over ``engine``. ``info`` (model path, adapter, chat format) is shown by /v1/models and /health."""
    app = FastAPI(title="medtrain OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    info = dict(info or {})

    @app.exception_handler(ApiError)
    async def _api_error(_request: HttpRequest, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def _internal(_request: HttpRequest, err: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", type_="server_error").response()

    @app.exception_handler(404)
    async def _not_found(request: HttpRequest, _err: Exception) -> JSONResponse:
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: HttpRequest, _err: Exception) -> JSONResponse:
        return ApiError(405, f"method {request.method} is not allowed on {request.url.path}").response()

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: HttpRequest) -> bytes:
        length = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body is larger than {max_request_bytes} bytes (--max_request_bytes)",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():  # a chunked body without a length is counted as it arrives
            body += chunk
            if len(body) > max_request_bytes:
                raise too_big
        return bytes(body)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "medtrain", "max_model_len": engine.context_length, **info}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        authorize(request)
        body = parse_request(await read_body(request))
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if body.n > engine.max_batch_size:
            raise ApiError(400, f"n: at most {engine.max_batch_size} (--max_batch_size)", param="n")
        messages = training_messages(body.messages)
        try:
            ids = await run_in_threadpool(engine.prompt_ids, messages, body.offered_tools())
        except UserError as err:  # the chat format refuses the conversation (DataError names the field)
            raise ApiError(400, str(err), param=getattr(err, "field", None) or "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        context = engine.context_length
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise ApiError(400, f"{field}: at most {max_tokens_limit} (--max_tokens_limit), got {max_tokens}",
                           param=field)
        if context:
            room = context - len(ids)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise ApiError(400, f"messages: this model's maximum context length is {context} tokens; the "
                               f"messages take {len(ids)} and {field} asks for {max_tokens or 1} more",
                               param="messages", code="context_length_exceeded")
            max_tokens = max_tokens or min(max_tokens_limit, room)
        params = SamplingParams(
            max_tokens=max_tokens or max_tokens_limit,
            temperature=default_temperature if body.temperature is None else body.temperature,
            top_p=default_top_p if body.top_p is None else body.top_p,
            stop=tuple(body.stop or ()), seed=body.seed, ignore_eos=body.ignore_eos,
            repetition_penalty=body.repetition_penalty,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # called on the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is going down
                pass

        job = Request(prompt_ids=ids, params=params, sink=sink, n=body.n)
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry later", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(
                _stream(engine, job, events, completion_id, model_name, body), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(engine, job, events, request, completion_id, model_name, body)

    return app


def _openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls (medtrain.tools.parse_tool_calls) as OpenAI's ``message.tool_calls``: arguments as JSON text."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for call in calls]


def _finish_reason(reason: str | None, calls: list[dict]) -> str | None:
    """``tool_calls`` when the model ended its turn with calls; an answer cut by max_tokens stays ``length``."""
    return "tool_calls" if calls and reason == "stop" else reason


class _CallHolder:
    """One streamed choice while tools are offered: its text goes out as content up to where a call could start
    (the tool format's ``call_starts``; a possible partial start at the end is held back), everything after that is
    held until the answer ends, then split by ``parse_tool_calls`` into the content still unsent and the calls.
    What was sent is always a prefix of the parsed content, so the streamed content equals the non-streamed one."""

    def __init__(self, chat_format: Any):
        self.chat_format = chat_format
        self.starts = tool_format_of(chat_format).call_starts
        self.text = self.sent = ""
        self.holding = False

    def feed(self, delta: str) -> str:
        """The content to send now for this new text."""
        self.text += delta
        if self.holding:
            return ""
        cuts = [self.text.find(start) for start in self.starts if start in self.text]
        if cuts:
            self.holding = True
            safe = self.text[:min(cuts)].rstrip()
        else:
            safe = self.text[:len(self.text) - _stop_prefix_hold(self.text, self.starts)].rstrip()
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            delta, self.sent = safe[len(self.sent):], safe
            return delta
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        """``(content not yet sent, calls)`` of the whole answer."""
        content, calls = parse_tool_calls(self.text, self.chat_format)
        content = content if calls else self.text.strip()  # no call: the whole answer is content (as non-streamed)
        return (content[len(self.sent):] if content.startswith(self.sent) else ""), calls


def _usage(job: Request, token_ids: list[list[int]]) -> dict:
    completion = sum(len(ids) for ids in token_ids)
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(job.prompt_ids) + completion}


async def _complete(engine: Engine, job: Request, events: asyncio.Queue, http: HttpRequest, completion_id: str,
                    model_name: str, body: ChatCompletionRequest) -> Any:
    """Wait for all choices; a client that disconnects meanwhile cancels the generation."""

    async def gather() -> dict:
        texts, reasons, token_ids = [""] * job.n, [None] * job.n, [[] for _ in range(job.n)]
        while True:
            event = await events.get()
            if event.kind == "delta":
                texts[event.index] += event.text
            elif event.kind == "finish":
                reasons[event.index], token_ids[event.index] = event.finish_reason, event.token_ids
            elif event.kind == "error":
                raise ApiError(500, event.message, type_="server_error")
            elif event.kind == "done":
                return {"texts": texts, "reasons": reasons, "token_ids": token_ids}

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    result_task = asyncio.ensure_future(gather())
    watch_task = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
    if not result_task.done():
        engine.cancel(job)
        result_task.cancel()
        return JSONResponse({}, status_code=499)  # nobody reads it
    result = result_task.result()
    choices = []
    tools = body.offered_tools()
    for i in range(job.n):
        text, reason = result["texts"][i], result["reasons"][i]
        message = {"role": "assistant", "content": text}
        content, calls = parse_tool_calls(text, engine.chat_format) if tools else (text, [])
        if calls:  # as OpenAI: content is the text before the calls, null when there is none
            message = {"role": "assistant", "content": content or None, "tool_calls": _openai_calls(calls)}
        choice = {"index": i, "message": message, "logprobs": None, "finish_reason": _finish_reason(reason, calls)}
        if body.return_token_ids:
            choice["token_ids"] = result["token_ids"][i]
        choices.append(choice)
    response = {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage(job, result["token_ids"])}
    if body.return_token_ids:
        response["prompt_token_ids"] = job.prompt_ids
    return JSONResponse(response)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, job: Request, events: asyncio.Queue, completion_id: str, model_name: str,
                  body: ChatCompletionRequest):
    """OpenAI's chunk stream. Leaving this generator early (the client disconnected) cancels the generation."""
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": choices, **extra})

    token_ids: list[list[int]] = [[] for _ in range(job.n)]
    holders = [_CallHolder(engine.chat_format) for _ in range(job.n)] if body.offered_tools() else None
    finished = False

    def content(index: int, text: str) -> str:
        return chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
    try:
        first = {"prompt_token_ids": job.prompt_ids} if body.return_token_ids else {}
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(job.n)], **first)
        while True:
            event = await events.get()
            if event.kind == "delta":
                text = holders[event.index].feed(event.text) if holders else event.text
                if text:
                    yield content(event.index, text)
            elif event.kind == "finish":
                token_ids[event.index] = event.token_ids
                calls: list[dict] = []
                if holders:  # the held text: the rest of the content, then each call whole in one delta
                    rest, calls = holders[event.index].finish()
                    if rest:
                        yield content(event.index, rest)
                    for k, call in enumerate(_openai_calls(calls)):
                        yield chunk([{"index": event.index, "delta": {"tool_calls": [{"index": k, **call}]},
                                      "logprobs": None, "finish_reason": None}])
                last = {"index": event.index, "delta": {}, "logprobs": None,
                        "finish_reason": _finish_reason(event.finish_reason, calls)}
                if body.return_token_ids:
                    last["token_ids"] = event.token_ids
                yield chunk([last])
            elif event.kind == "error":
                finished = True
                yield _sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                      "code": None}})
                break
            elif event.kind == "done":
                finished = True
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], usage=_usage(job, token_ids))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.cancel(job)
