"""A web chat page (Gradio) over a trained model: streaming answers, multi-turn history, system prompt, sampling.

    python web_demo.py --model_name_or_path merged-sft                 # http://127.0.0.1:7860
    python web_demo.py --model_name_or_path models/SmolLM2-135M-Instruct --lora_model outputs-sft --port 7861

It runs the generation engine of openai_api.py (medtrain/serving.py): prompts rendered with the chat format recorded
at training time, several users' questions batched together, a closed tab stops its generation. The page shows which
model, adapter and chat format are loaded. Listens on 127.0.0.1 unless --host says otherwise; no public share link.
See docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import queue
from dataclasses import dataclass, field
from typing import Any, Iterator

from medtrain.arguments import flag_spelling, parse_args
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError, UserError
from medtrain.generation import GenerationModelArguments
from medtrain.serving import Engine, QueueFull, Request, SamplingParams, ServeArguments, load_engine


@dataclass
class DemoArguments:
    """Flags of the web page (the sliders' starting values)."""

    temperature: float = field(default=0.7, metadata={"help": "Starting temperature (0 = greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Starting top_p."})
    max_new_tokens: int = field(default=512, metadata={"help": "Starting answer length limit, in tokens."})
    title: str = field(default="medtrain chat", metadata={"help": "Page title."})

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.temperature <= 2:
            problems.append(f"--temperature must be in [0, 2], got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if problems:
            raise ConfigError(problems)


def _text(content: Any) -> str:
    """Gradio history content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def conversation(message: str, history: list[dict], system_prompt: str) -> list[dict]:
    """The chat as OpenAI-style messages: system prompt (if any), the shown history, the new question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for turn in history:
        if turn.get("role") in ("user", "assistant"):
            messages.append({"role": turn["role"], "content": _text(turn.get("content"))})
    return messages + [{"role": "user", "content": message}]


def fit_context(engine: Engine, messages: list[dict], max_new_tokens: int) -> list[int]:
    """Prompt ids, dropping the oldest exchanges (never the system prompt or the question) until the answer fits."""
    start = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids = engine.prompt_ids(messages)
        if not engine.context_length or len(ids) + max_new_tokens <= engine.context_length:
            return ids
        if len(messages) - start <= 1:
            raise UserError(f"the question is too long: {len(ids)} tokens + {max_new_tokens} to answer > the model's "
                            f"{engine.context_length}")
        messages = messages[:start] + messages[start + 2:]


def respond(engine: Engine, message: str, history: list[dict], system_prompt: str, temperature: float,
            top_p: float, max_new_tokens: int) -> Iterator[str]:
    """Stream the answer to ``message``: yields the answer so far after each piece the engine produces."""
    import gradio as gr

    max_new_tokens = int(max_new_tokens)
    try:
        ids = fit_context(engine, conversation(message, history, system_prompt or ""), max_new_tokens)
    except UserError as err:
        raise gr.Error(str(err)) from None
    events: queue.Queue = queue.Queue()
    job = Request(ids, SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p)),
                  events.put)
    try:
        engine.submit(job)
    except QueueFull:
        raise gr.Error("The server is busy; please retry in a moment.") from None
    answer, finished = "", False
    try:
        while True:
            event = events.get()
            if event.kind == "delta":
                answer += event.text
                yield answer
            elif event.kind == "error":
                finished = True
                raise gr.Error(event.message)
            elif event.kind == "done":
                finished = True
                yield answer
                return
    finally:
        if not finished:  # the page was closed or the user pressed stop
            engine.cancel(job)


def describe(info: dict) -> str:
    """The loaded model, adapter and chat format, for the page header (Markdown)."""
    fmt = info["chat_format"]
    name = fmt["template_name"] or "the tokenizer's chat template"
    system = f"; default system prompt: {fmt['system_prompt']!r}" if fmt.get("system_prompt") else ""
    return (f"**Model:** `{info['root']}`  \n**Adapter:** `{info['adapter'] or 'none'}`  \n"
            f"**Chat format:** {name} ({info['chat_format_source']}){system}  \n**Weights:** {info['dtype']}")


def build_demo(engine: Engine, info: dict, args: DemoArguments, max_tokens_limit: int) -> Any:
    import gradio as gr

    def chat_fn(message, history, system_prompt, temperature, top_p, max_new_tokens):
        yield from respond(engine, message, history, system_prompt, temperature, top_p, max_new_tokens)

    with gr.Blocks(title=args.title) as demo:
        gr.Markdown(f"# {args.title}")
        gr.Markdown(describe(info), elem_id="model-info")
        gr.Markdown("Answers come from a language model and can be wrong: this is not medical advice.")
        gr.ChatInterface(
            chat_fn,
            chatbot=gr.Chatbot(elem_id="chatbot", height=480, render=False),
            textbox=gr.Textbox(placeholder="Ask a question", elem_id="question", submit_btn=True, render=False),
            additional_inputs=[
                # render=False: shown in the accordion under the chat, not where they are created
                gr.Textbox(label="System prompt (empty: the chat format's default)", elem_id="system-prompt",
                           render=False),
                gr.Slider(0.0, 2.0, value=args.temperature, step=0.05, label="temperature (0 = greedy)", render=False),
                gr.Slider(0.05, 1.0, value=args.top_p, step=0.05, label="top_p", render=False),
                gr.Slider(1, max_tokens_limit, value=min(args.max_new_tokens, max_tokens_limit), step=1,
                          label="max new tokens", render=False),
            ],
            additional_inputs_accordion=gr.Accordion(label="System prompt and sampling", open=False, render=False),
        )
    return demo


def free_port(host: str) -> int:
    """A port the OS says is free now (Gradio needs a number; uvicorn takes 0 itself)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# The flags: the model (as in inference.py and openai_api.py), the engine and where to listen, the page's own
ARGUMENTS = [GenerationModelArguments, ServeArguments, DemoArguments]


def main(args: list[str] | None = None) -> None:
    model_args, serve_args, demo_args = parse_args(ARGUMENTS, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    engine, info = load_engine(model_args, serve_args,
                               flag_spelling(args, GenerationModelArguments, "model_name_or_path"))
    demo = build_demo(engine, info, demo_args, serve_args.max_tokens_limit)
    demo.queue(default_concurrency_limit=serve_args.max_batch_size, max_size=serve_args.max_queue_size)
    port = 7860 if serve_args.port is None else serve_args.port or free_port(serve_args.host)
    try:
        demo.launch(server_name=serve_args.host, server_port=port, share=False, show_error=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    run_main(main)
