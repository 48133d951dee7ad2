"""The serving engine (medtrain/serving.py) without HTTP: a row cancelled inside a running batch stops at once while
the other rows of that batch go on unchanged, a batch whose rows are all cancelled ends, and answers equal
inference.py's decoding of the same tokens."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from medtrain.generation import decode_response, prompt_ids
from medtrain.serving import Engine, Request, SamplingParams, collect
from medtrain.merging import load_base

QUESTIONS = ["I have a fever.", "My blood pressure is high."]


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    from medtrain.chat_format import get_chat_format

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = load_base(str(tiny_chat_model_dir), "causal_lm", torch.float32)
    engine = Engine(model, tokenizer, get_chat_format(tokenizer, None), max_batch_size=2, batch_wait_s=0.5)
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


def cancelling_sink(engine, events: queue.Queue, after_deltas: int | None):
    """A sink that cancels its own request when its ``after_deltas``-th text piece arrives. The sink runs on the
    worker thread between two generation steps, so the cancel lands at an exact step whatever the machine's load."""
    seen = []

    def sink(event):
        events.put(event)
        if event.kind == "delta" and after_deltas is not None:
            seen.append(event)
            if len(seen) == after_deltas:
                engine.cancel(sink.request)

    return sink


def submit_pair(engine, max_tokens: int, cancel_first_after: int | None = None):
    """Both questions in one batch (the engine waits 0.5 s for a second request); optionally the first request is
    cancelled after it streamed ``cancel_first_after`` pieces. Returns the first request, its events and the second
    one's result."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    first_events: queue.Queue = queue.Queue()
    second_events: queue.Queue = queue.Queue()
    ids = [engine.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    sink = cancelling_sink(engine, first_events, cancel_first_after)
    first = sink.request = Request(ids[0], params, sink)
    engine.submit(first)
    engine.submit(Request(ids[1], params, second_events.put))
    return first, first_events, collect(second_events, timeout=300)


def test_one_cancelled_row_leaves_the_rest_of_its_batch_unchanged(engine):
    batches = engine.batches
    _, first_events, reference = submit_pair(engine, max_tokens=40)
    assert collect(first_events, timeout=60)["finish_reasons"] == ["length"]
    assert engine.batches == batches + 1 and engine.batch_rows[-1] == 2  # the two really shared one generate
    first, first_events, result = submit_pair(engine, max_tokens=40, cancel_first_after=2)
    assert engine.batches == batches + 2 and engine.batch_rows[-1] == 2
    assert result == reference  # the surviving row generated exactly what it generates next to a live row
    assert result["finish_reasons"] == ["length"] and len(result["token_ids"][0]) == 40
    assert first.cancelled.is_set() and first.tokens_generated < 40  # the cancelled row stopped early
    kinds = [first_events.get_nowait().kind for _ in range(first_events.qsize())]
    assert kinds == ["delta", "delta"]  # nothing after the cancel, and no finish/done for a cancelled request
    deadline = time.monotonic() + 30  # the worker clears the batch just after sending the last "done"
    while engine.stats()["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active_rows"] == 0


def test_a_batch_whose_rows_are_all_cancelled_ends(engine):
    events: queue.Queue = queue.Queue()
    ids = engine.prompt_ids([{"role": "user", "content": QUESTIONS[0]}])
    sink = cancelling_sink(engine, events, 1)
    job = sink.request = Request(ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), sink)
    engine.submit(job)
    after: queue.Queue = queue.Queue()  # served once the cancelled batch ended
    engine.submit(Request(ids, SamplingParams(max_tokens=3, temperature=0), after.put))
    assert collect(after, timeout=120)["finish_reasons"][0] in ("stop", "length")
    assert job.tokens_generated <= 8  # stopped a step after the cancel (a piece may need a few tokens), not at 400


def test_answer_text_is_inference_decoding_of_the_same_tokens(engine):
    events: queue.Queue = queue.Queue()
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    ids = prompt_ids(engine.tokenizer, engine.chat_format, messages)
    engine.submit(Request(ids, SamplingParams(max_tokens=30, temperature=0), events.put))
    result = collect(events, timeout=60)
    assert result["texts"][0] == decode_response(engine.tokenizer, engine.chat_format, result["token_ids"][0],
                                                 engine.stop_ids)
