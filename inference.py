"""Chat with a trained model (base, merged, or base + LoRA adapter), or answer a file of prompts.

    python inference.py --base_model merged-sft                                  # interactive, multi-turn
    python inference.py --base_model models/SmolLM2-135M-Instruct --lora_model outputs-sft
    python inference.py --base_model merged-sft --data_file data/prompts/heldout_questions.jsonl \
        --output_file answers.jsonl --batch_size 8                               # batch mode (greedy by default)

Prompts are rendered with the chat format recorded at training time in the adapter/model dir (unless
--template_name is given), tokenised turn by turn exactly as training tokenised them, and generation stops at the
format's end-of-turn text. In the chat, `clear` starts a new conversation and `exit` (or end of input) quits.
A prompt record with ``tools`` offers them to the model; its row then holds ``tool_calls`` parsed from the answer.
The model flags are those of openai_api.py and web_demo.py (``--base_model`` = ``--model_name_or_path``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers import TextStreamer

from medtrain.arguments import flag_spelling, parse_args
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError
from medtrain.formats import find_data_files, load_prompts
from medtrain.tools import parse_tool_calls
from medtrain.generation import (  # noqa: F401  (re-exported: inference.prompt_ids etc. keep working)
    GenerationModelArguments, decode_response, generate_responses, generation_config, load_for_inference, prompt_ids,
    stop_token_ids,
)

logger = logging.getLogger("medtrain.inference")

CHAT_TEMPERATURE = 0.7  # default sampling temperature in the chat; batch mode defaults to greedy (reproducible)


@dataclass
class InferenceArguments:
    """Flags of inference.py besides the model to load (:class:`GenerationModelArguments`, shared with the servers):
    sampling, and batch mode's files."""

    max_new_tokens: int = field(default=512, metadata={"help": "Longest answer, in tokens."})
    temperature: float | None = field(
        default=None,
        metadata={"help": f"Sampling temperature; 0 = greedy. Default: {CHAT_TEMPERATURE} in the chat, 0 in batch mode."},
    )
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling probability mass (with temperature > 0)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty > 1 discourages repeating tokens."})
    data_file: str | None = field(
        default=None,
        metadata={"help": "Batch mode: a .json/.jsonl file (or directory) of prompts (questions, messages, SFT rows)."},
    )
    output_file: str | None = field(default=None, metadata={"help": "Batch mode: where to write the answers (.jsonl)."})
    batch_size: int = field(default=8, metadata={"help": "Batch mode: prompts generated together (left-padded)."})

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.temperature is not None and self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top_p must be in (0, 1], got {self.top_p}.")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition_penalty must be positive, got {self.repetition_penalty}.")
        if self.batch_size <= 0:
            problems.append(f"--batch_size must be positive, got {self.batch_size}.")
        if bool(self.data_file) != bool(self.output_file):
            problems.append("batch mode needs both --data_file and --output_file.")
        if self.data_file and self.output_file and os.path.abspath(self.data_file) == os.path.abspath(self.output_file):
            problems.append("--output_file must differ from --data_file.")
        if problems:
            raise ConfigError(problems)


# The flags: the model (as in openai_api.py and web_demo.py), then this script's own
ARGUMENTS = [GenerationModelArguments, InferenceArguments]


# --------------------------------------------------------------------------------------------------------------
# Prompts and generation


class ChatStreamer(TextStreamer):
    """Prints the answer as it is generated, without the end-of-turn text or anything after it."""

    def __init__(self, tokenizer: Any, stop_str: str | None, out: Any = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_str = stop_str or ""
        self.out = out or sys.stdout
        self.pending = ""  # text held back because it may be the start of the stop string
        self.stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.stopped:
            self.pending += text
            if self.stop_str and self.stop_str in self.pending:
                self.pending, self.stopped = self.pending.split(self.stop_str, 1)[0], True
        hold = 0
        if not (stream_end or self.stopped):
            # the longest tail of the text that could still grow into the stop string
            hold = next((n for n in range(min(len(self.stop_str), len(self.pending)), 0, -1)
                         if self.stop_str.startswith(self.pending[-n:])), 0)
        emit = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(emit):]
        print(emit, end="", flush=True, file=self.out)
        if stream_end:
            print(file=self.out, flush=True)
            self.pending, self.stopped = "", False


# --------------------------------------------------------------------------------------------------------------
# The two modes


def fit_history(tokenizer: Any, chat_format: Any, messages: list[dict], limit: int | None) -> list[dict]:
    """Drop the oldest exchanges (never the system message or the new question) until the prompt fits ``limit``."""
    if not limit:
        return messages
    start = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) - start > 1 and len(prompt_ids(tokenizer, chat_format, messages)) > limit:
        messages = messages[:start] + messages[start + 2:]
        print("(the conversation is too long for the model: dropped the oldest exchange)", flush=True)
    return messages


def chat(model: Any, tokenizer: Any, chat_format: Any, args: InferenceArguments,
         read: Callable[[str], str] = input) -> list[dict]:
    """Interactive multi-turn chat; returns the final history (for tests)."""
    temperature = CHAT_TEMPERATURE if args.temperature is None else args.temperature
    context = getattr(model.config, "max_position_embeddings", None)
    limit = context - args.max_new_tokens if context and context > args.max_new_tokens else None
    print("Chat with the model. `clear` starts a new conversation, `exit` quits.", flush=True)
    history: list[dict] = []
    while True:
        try:
            text = read("User: ").strip()
        except EOFError:
            print()
            break
        if not text:
            continue
        if text == "exit":
            break
        if text == "clear":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        messages = fit_history(tokenizer, chat_format, history + [{"role": "user", "content": text}], limit)
        print("Assistant: ", end="", flush=True)
        answer = generate_responses(
            model, tokenizer, chat_format, [messages], max_new_tokens=args.max_new_tokens, batch_size=1,
            temperature=temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            streamer=ChatStreamer(tokenizer, chat_format.stop_str),
        )[0]
        history = messages + [{"role": "assistant", "content": answer}]
    return history


def answer_file(model: Any, tokenizer: Any, chat_format: Any, args: InferenceArguments) -> int:
    """Batch mode: one output row per prompt, in input order, written atomically. Returns the row count."""
    records = load_prompts(find_data_files(args.data_file))
    logger.info("answering %d prompts from %s in batches of %d", len(records), args.data_file, args.batch_size)
    responses = generate_responses(
        model, tokenizer, chat_format, [r["messages"] for r in records], max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, temperature=args.temperature or 0.0, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, tools=[r.get("tools") for r in records],
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    tmp = f"{args.output_file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record, response in zip(records, responses):
                messages = record["messages"]
                single = len(messages) == 1 and messages[0]["role"] == "user"
                row = {"question": messages[0]["content"]} if single else {"messages": messages}
                row["response"] = response
                if record.get("tools"):  # the model was offered tools: its calls, parsed (content keeps the rest)
                    row["response"], row["tool_calls"] = parse_tool_calls(response, chat_format)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(records)} answers to {args.output_file}", flush=True)
    return len(records)


def main(args: list[str] | None = None) -> Any:
    model_args, inference_args = parse_args(ARGUMENTS, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    if inference_args.data_file:
        find_data_files(inference_args.data_file)  # a missing file fails before the model loads
    model, tokenizer, chat_format = load_for_inference(
        model_args, model_flag=flag_spelling(args, GenerationModelArguments, "model_name_or_path"))
    if inference_args.data_file:
        return answer_file(model, tokenizer, chat_format, inference_args)
    return chat(model, tokenizer, chat_format, inference_args)


if __name__ == "__main__":
    run_main(main)
