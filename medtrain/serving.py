"""The serving engine behind openai_api.py and web_demo.py: many clients, one model, batched ``generate`` calls.

Requests are queued (a bounded queue: :class:`QueueFull` when it is full) and one worker thread takes as many
compatible ones as fit into ``max_batch_size`` rows (a request with ``n`` choices takes ``n`` rows), left-pads
their prompts and runs one ``model.generate`` for the batch. The event loop of the web server never waits for the
model. Requests are compatible when they sample alike (greedy, or the same temperature/top_p; a seeded request runs
in a batch of its own so the seed reproduces its answer).

Per row, a :class:`_BatchTracker` (a ``StoppingCriteria``, so ``generate`` calls it after every step with the new
tokens) decodes the text so far, streams what is final to the request's sink, and marks the row done when it
produced a stop token, the chat format's end-of-turn text or a ``stop`` string, reached its own ``max_tokens``, or
its client went away (cancelled). A done row is padded by ``generate`` from then on and the batch goes on for the
other rows; when every row is done ``generate`` returns at once. So a cancelled request stops streaming and leaves
the queue immediately, and its row costs nothing more once the batch's other rows end (static batching: the batch
keeps its width until then).

Answer text follows :func:`medtrain.generation.decode_response` exactly (no special tokens, cut at the first stop,
outer whitespace stripped): what is streamed adds up to the non-streamed answer and to inference.py's answer.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .errors import ConfigError
from .generation import (
    GenerationModelArguments, format_source, left_pad, load_for_inference, model_dirs_of, prompt_ids, stop_token_ids,
)

logger = logging.getLogger("medtrain.serving")

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class QueueFull(Exception):
    """The engine's queue holds ``max_queue_size`` requests already: answer 429 and let the client retry."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated. ``temperature`` 0 = greedy (then top_p and seed do not matter)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # texts that end the answer (not included in it)
    seed: int | None = None
    ignore_eos: bool = False  # go on past stop tokens and the end-of-turn text (benchmarks, tests); `stop` still ends
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Event:
    """What a request's sink receives: ``delta`` (new answer text of choice ``index``), ``finish`` (choice ``index``
    ended: ``finish_reason``, ``token_ids``), then one ``done`` (all choices ended) or ``error`` (``message``)."""

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    message: str = ""


@dataclass(eq=False)
class Request:
    """One chat completion: its prompt ids, sampling, ``n`` choices, and where its events go (called from the
    worker thread; it must not block)."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    n: int = 1
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    tokens_generated: int = 0  # over all choices, counted as generated (also after a cancel: it shows when it stopped)

    def batch_key(self) -> tuple:
        """Requests with equal keys may share a batch (one GenerationConfig per generate call)."""
        p = self.params
        if p.seed is not None:
            return ("seed", self.id)
        sampling = () if p.greedy else (p.temperature, p.top_p)
        return (p.greedy, sampling, p.ignore_eos, p.repetition_penalty)


class _Row:
    """One choice of one request inside a running batch."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.ids: list[int] = []
        self.sent = ""  # answer text already streamed
        self.done = False
        self.finish_reason: str | None = None


def _stop_prefix_hold(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still grow into one of ``stops`` (hold them back)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if stop.startswith(text[-n:]):
                hold = n
                break
    return hold


class _BatchTracker(StoppingCriteria):
    """Called by ``generate`` after each step: streams each row's new text and says which rows are done."""

    def __init__(self, rows: list[_Row], tokenizer: Any, stop_ids: list[int], end_of_turn: str | None,
                 tokenizer_lock: threading.Lock):
        self.rows, self.tokenizer, self.tokenizer_lock = rows, tokenizer, tokenizer_lock
        self.stop_ids = set(stop_ids)
        self.end_of_turn = end_of_turn or ""
        self.first_token_at: float | None = None

    def _stops(self, row: _Row) -> tuple[str, ...]:
        params = row.request.params
        stops = tuple(s for s in params.stop if s)
        if self.end_of_turn and not params.ignore_eos:
            stops += (self.end_of_turn,)
        return stops

    def _finish(self, row: _Row, reason: str, text: str | None) -> None:
        if text is not None and text.startswith(row.sent) and len(text) > len(row.sent):
            row.request.sink(Event("delta", row.index, text=text[len(row.sent):]))
            row.sent = text
        row.done, row.finish_reason = True, reason
        if reason != FINISH_CANCELLED:
            row.request.sink(Event("finish", row.index, finish_reason=reason, token_ids=list(row.ids)))

    def step(self, row: _Row, token: int) -> None:
        """Take ``row``'s newest token: stream the text that is now final, or finish the row."""
        request = row.request
        if request.cancelled.is_set():
            self._finish(row, FINISH_CANCELLED, None)
            return
        params = request.params
        request.tokens_generated += 1
        if token in self.stop_ids and not params.ignore_eos:
            row.ids.append(token)  # generated, so counted; the text never shows it
            self._finish(row, FINISH_STOP, self._decode(row.ids[:-1]).strip())
            return
        row.ids.append(token)
        text = self._decode(row.ids).lstrip()
        stops = self._stops(row)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            self._finish(row, FINISH_STOP, text[:min(cuts)].strip())
            return
        if len(row.ids) >= params.max_tokens:
            self._finish(row, FINISH_LENGTH, text.strip())
            return
        # Final so far: not a possible start of a stop string, not an incomplete UTF-8 character (U+FFFD while a
        # multi-byte character is split over tokens), not trailing whitespace (the answer is stripped at the end).
        safe = text[:len(text) - _stop_prefix_hold(text, stops)]
        if safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")
        safe = safe.rstrip()
        if len(safe) > len(row.sent) and safe.startswith(row.sent):
            request.sink(Event("delta", row.index, text=safe[len(row.sent):]))
            row.sent = safe

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest):
            if not row.done:
                self.step(row, token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Engine:
    """Queue + worker thread around one model. ``submit`` from any thread; events arrive through each sink."""

    def __init__(self, model: Any, tokenizer: Any, chat_format: Any, max_batch_size: int = 8,
                 max_queue_size: int = 64, batch_wait_s: float = 0.01):
        if max_batch_size < 1 or max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format
        self.max_batch_size, self.max_queue_size, self.batch_wait_s = max_batch_size, max_queue_size, batch_wait_s
        self.stop_ids = stop_token_ids(tokenizer, chat_format, model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        # A fast tokenizer used from two threads at once can fail ("Already borrowed": encode resets its
        # truncation/padding state), so the request threads' encoding and the worker's decoding take turns.
        self.tokenizer_lock = threading.Lock()
        self._pending: list[Request] = []
        self._cond = threading.Condition()
        self._active_rows = 0
        self._closed = False
        self.batches = 0  # generate calls so far
        self.batch_rows: list[int] = []  # rows per batch, last 1000 (for /health and tests)
        self._thread = threading.Thread(target=self._run, name="medtrain-generate", daemon=True)
        self._thread.start()

    # ---- client side -----------------------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """``messages`` (offered ``tools``) as the token ids training fed the model
        (:func:`medtrain.generation.prompt_ids`)."""
        with self.tokenizer_lock:
            return prompt_ids(self.tokenizer, self.chat_format, messages, tools)

    def submit(self, request: Request) -> Request:
        if request.n > self.max_batch_size:
            raise ValueError(f"n={request.n} is more than --max_batch_size {self.max_batch_size}")
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if len(self._pending) >= self.max_queue_size:
                raise QueueFull(f"{len(self._pending)} requests are waiting (--max_queue_size {self.max_queue_size})")
            self._pending.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """The client went away: drop it from the queue, or let its batch rows stop at the next token."""
        request.cancelled.set()
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._pending), "active_rows": self._active_rows, "batches": self.batches,
                    "max_batch_size": self.max_batch_size, "max_queue_size": self.max_queue_size}

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for request in pending:
            request.sink(Event("error", message="the server is shutting down"))
        self._thread.join(timeout=30)

    # ---- worker side -----------------------------------------------------------------------------------------

    def _take_batch(self) -> list[Request] | None:
        """Wait for a request, give requests arriving together ``batch_wait_s`` to join, take what fits."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending[0]
            deadline = time.monotonic() + self.batch_wait_s
            while True:
                fitting = [r for r in self._pending if r.batch_key() == first.batch_key()]
                if sum(r.n for r in fitting) >= self.max_batch_size or time.monotonic() >= deadline:
                    break
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
                if first not in self._pending:  # cancelled while waiting
                    return []
            batch, rows = [], 0
            for request in fitting:
                if rows + request.n <= self.max_batch_size:
                    batch.append(request)
                    rows += request.n
            for request in batch:
                self._pending.remove(request)
            self._active_rows = rows
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as err:  # one bad batch must not kill the server: its clients get the error
                logger.exception("generation failed")
                for request in batch:
                    request.sink(Event("error", message=f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self._cond:
                    self._active_rows = 0

    @torch.no_grad()
    def _generate(self, batch: list[Request]) -> None:
        rows = [_Row(request, i) for request in batch for i in range(request.n)]
        params = batch[0].params
        tracker = _BatchTracker(rows, self.tokenizer, self.stop_ids, self.chat_format.stop_str, self.tokenizer_lock)
        input_ids, attention_mask = left_pad([row.request.prompt_ids for row in rows], self.pad_token_id)
        config = GenerationConfig(
            max_new_tokens=max(row.request.params.max_tokens for row in rows),
            do_sample=not params.greedy,
            temperature=None if params.greedy else params.temperature,
            top_p=None if params.greedy else params.top_p,
            top_k=None if params.greedy else 0,  # off (None would mean the checkpoint's or transformers' default of 50; OpenAI has no top_k)
            repetition_penalty=params.repetition_penalty,
            eos_token_id=[] if params.ignore_eos else self.stop_ids,  # [] (not None: None means "the model's")
            pad_token_id=self.pad_token_id,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)  # only this thread generates: the global generator is ours here
        device = next(self.model.parameters()).device
        self.batches += 1
        self.batch_rows = (self.batch_rows + [len(rows)])[-1000:]
        self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            generation_config=config, stopping_criteria=StoppingCriteriaList([tracker]))
        for row in rows:  # the batch's max_new_tokens ended rows the tracker had not finished (it always should)
            if not row.done:
                text = tracker._decode(row.ids).strip()
                tracker._finish(row, FINISH_LENGTH, text)
        for request in batch:
            if not request.cancelled.is_set():
                request.sink(Event("done"))


def collect(events: "queue.Queue[Event]", n: int = 1, timeout: float | None = None) -> dict:
    """Read a request's events from a ``queue.Queue`` sink until it is done: ``{"texts", "finish_reasons",
    "token_ids"}`` (one entry per choice). Raises RuntimeError on an error event."""
    texts, reasons, token_ids = [""] * n, [None] * n, [[] for _ in range(n)]
    while True:
        event = events.get(timeout=timeout)
        if event.kind == "delta":
            texts[event.index] += event.text
        elif event.kind == "finish":
            reasons[event.index], token_ids[event.index] = event.finish_reason, event.token_ids
        elif event.kind == "error":
            raise RuntimeError(event.message)
        elif event.kind == "done":
            return {"texts": texts, "finish_reasons": reasons, "token_ids": token_ids}


# --------------------------------------------------------------------------------------------------------------
# Flags shared by openai_api.py and web_demo.py (beside GenerationModelArguments, shared with inference.py too)


@dataclass
class ServeArguments:
    """The engine's limits and where to listen (the model to serve: :class:`GenerationModelArguments`, parsed
    beside this)."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (loopback unless you say otherwise)."})
    port: int | None = field(
        default=None,
        metadata={"help": "Port to listen on; default 8000 (openai_api.py) or 7860 (web_demo.py); 0 = any free port "
                          "(printed at start)."},
    )
    max_batch_size: int = field(default=8, metadata={"help": "Most rows (requests x n) generated together."})
    max_queue_size: int = field(default=64, metadata={"help": "Most requests waiting; more are answered 429."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    batch_wait_ms: float = field(
        default=10.0, metadata={"help": "How long the first queued request waits for others to join its batch."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch_size", "max_queue_size", "max_tokens_limit"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.port is not None and not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535, got {self.port}.")
        if self.batch_wait_ms < 0:
            problems.append(f"--batch_wait_ms must be >= 0, got {self.batch_wait_ms}.")
        if problems:
            raise ConfigError(problems)


def load_engine(model_args: GenerationModelArguments, args: ServeArguments | None = None,
                model_flag: str = "--model_name_or_path") -> tuple[Engine, dict]:
    """Load the model as inference.py does (:func:`medtrain.generation.load_for_inference`) and start an engine
    (``args``: its limits; default: the flags' defaults); also returns what is loaded, for display. ``model_flag``:
    the model flag as the user spelled it, for error messages."""
    args = args or ServeArguments()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, tokenizer, chat_format = load_for_inference(model_args, model_flag=model_flag)
    path = model_args.model_name_or_path
    info = {
        "root": os.path.abspath(path) if os.path.isdir(path) else path,
        "adapter": os.path.abspath(model_args.lora_model) if model_args.lora_model else None,
        "chat_format": chat_format.record(),
        "chat_format_source": format_source(model_args, model_dirs_of(model_args)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    logger.info("serving %s", json.dumps(info, ensure_ascii=False))
    engine = Engine(model, tokenizer, chat_format, max_batch_size=args.max_batch_size,
                    max_queue_size=args.max_queue_size, batch_wait_s=args.batch_wait_ms / 1000)
    return engine, info
