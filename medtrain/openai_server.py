"""The OpenAI-compatible HTTP API over a :class:`medtrain.serving.Engine` (FastAPI): the subset openai_api.py serves.

``GET /v1/models``, ``POST /v1/chat/completions`` (JSON, or server-sent events in OpenAI's chunk format ending
with ``data: [DONE]``), ``GET /health``. Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param",
"code"}}``: 400 naming the bad request field, 401 for a missing/wrong key, 404 for another model name, 413 for a
body over the limit, 429 when the queue is full (with Retry-After), 500 when generation fails.

Prompts are the chat format's rendering, tokenised piece by piece as SFT tokenised them
(:func:`medtrain.generation.prompt_ids`). The request body is read and parsed by hand (not by FastAPI's body
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from .errors import UserError
from .serving import Engine, Event, QueueFull, Request, SamplingParams

ROLES = ("system", "user", "assistant")


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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


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
    tools: list[Any] | None = None
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
    if request.tools:
        # Hook for tool calling: render `tools` into the prompt and parse `tool_calls` out of the answer once the
        # project's tool-call format exists (issue 24); until then say so instead of ignoring the tools.
        raise ApiError(400, "tools are not supported by this server yet", param="tools")
    check_roles(request.messages)
    return request


def check_roles(messages: list[ChatMessage]) -> None:
    """An optional leading system message, then user/assistant alternating from user, ending with user."""
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        raise ApiError(400, "messages: the conversation has no user message", param="messages")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i].role != expected:
            raise ApiError(400, f"messages[{i}].role: expected {expected!r}, got {messages[i].role!r} (after an "
                           "optional leading system message, roles alternate user/assistant starting with user, "
                           "and the last message is the user's)", param=f"messages[{i}].role")
    if messages[-1].role != "user":
        raise ApiError(400, f"messages[{len(messages) - 1}].role: the last message must be the user's",
                       param=f"messages[{len(messages) - 1}].role")


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
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = await run_in_threadpool(engine.prompt_ids, messages)
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
    for i in range(job.n):
        choice = {"index": i, "message": {"role": "assistant", "content": result["texts"][i]},
                  "logprobs": None, "finish_reason": result["reasons"][i]}
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
    finished = False
    try:
        first = {"prompt_token_ids": job.prompt_ids} if body.return_token_ids else {}
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(job.n)], **first)
        while True:
            event = await events.get()
            if event.kind == "delta":
                yield chunk([{"index": event.index, "delta": {"content": event.text}, "logprobs": None,
                              "finish_reason": None}])
            elif event.kind == "finish":
                token_ids[event.index] = event.token_ids
                last = {"index": event.index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
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
