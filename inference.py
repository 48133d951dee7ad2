"""Chat with a trained model (base, merged, or base + LoRA adapter), or answer a file of prompts.

    python inference.py --base_model merged-sft                                  # interactive, multi-turn
    python inference.py --base_model models/SmolLM2-135M-Instruct --lora_model outputs-sft
    python inference.py --base_model merged-sft --data_file data/prompts/heldout_questions.jsonl \
        --output_file answers.jsonl --batch_size 8                               # batch mode (greedy by default)

Prompts are rendered with the chat format recorded at training time in the adapter/model dir (unless
--template_name is given), tokenised turn by turn exactly as training tokenised them, and generation stops at the
format's end-of-turn text. In the chat, `clear` starts a new conversation and `exit` (or end of input) quits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import GenerationConfig, TextStreamer

from medtrain.arguments import ModelArguments, parse_args
from medtrain.chat_format import RECORD_FILE, load_recorded_chat_format, resolve_chat_format
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError
from medtrain.formats import find_data_files, load_prompts
from medtrain.merging import check_base_path, detect_model_type, load_adapted_model, load_base, read_adapter
from medtrain.modeling import load_tokenizer, resolve_dtype
from medtrain.tokenization import encode_dialog

logger = logging.getLogger("medtrain.inference")

CHAT_TEMPERATURE = 0.7  # default sampling temperature in the chat; batch mode defaults to greedy (reproducible)


@dataclass
class InferenceArguments:
    """Flags of inference.py."""

    base_model: str = field(metadata={"help": "Model directory (or Hub id): a base, a merged model, or an adapter's base."})
    lora_model: str | None = field(default=None, metadata={"help": "A LoRA adapter directory to apply on --base_model."})
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer; default: the adapter dir's if it has one, else --base_model's."}
    )
    template_name: str | None = field(
        default=None,
        metadata={"help": "Conversation template; default: the format recorded at training time in the model dir."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt; default: the one recorded at training time, else the template's."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Longest answer, in tokens."})
    temperature: float | None = field(
        default=None,
        metadata={"help": f"Sampling temperature; 0 = greedy. Default: {CHAT_TEMPERATURE} in the chat, 0 in batch mode."},
    )
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling probability mass (with temperature > 0)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty > 1 discourages repeating tokens."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype; auto = float32 on CPU, bf16/fp16 on GPU.",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model/tokenizer code from the checkpoint to run. Off unless you trust it."}
    )
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


# --------------------------------------------------------------------------------------------------------------
# Prompts and generation


def prompt_ids(tokenizer: Any, chat_format: Any, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` (ending with a user turn) up to the assistant header, as training tokenises them.

    Each turn's pieces are tokenised separately, exactly like ``encode_dialog`` in SFT, so the ids equal the
    training ids of the same conversation minus the answer still to be generated.
    """
    pieces = chat_format.dialog(list(messages) + [{"role": "assistant", "content": ""}])
    pieces[-1] = (pieces[-1][0], "")
    return encode_dialog(tokenizer, pieces, max_length=sys.maxsize).input_ids


def stop_token_ids(tokenizer: Any, chat_format: Any, model: Any = None) -> list[int]:
    """Ids that end an answer: the model's and tokenizer's eos, and the format's stop string if it is one token."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in (eos if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    if chat_format.stop_str:
        stop = tokenizer.encode(chat_format.stop_str, add_special_tokens=False)
        if len(stop) == 1 and stop[0] not in ids:
            ids.append(stop[0])
    return ids


def decode_response(tokenizer: Any, chat_format: Any, new_ids: list[int], stop_ids: list[int]) -> str:
    """The answer text: generated ids up to the first stop token / stop string, without special tokens."""
    for i, token_id in enumerate(new_ids):
        if token_id in stop_ids:
            new_ids = new_ids[:i]
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if chat_format.stop_str and chat_format.stop_str in text:
        text = text.split(chat_format.stop_str, 1)[0]
    return text.strip()


def generation_config(tokenizer: Any, stop_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                      repetition_penalty: float, stop_str: str | None) -> GenerationConfig:
    """A complete config (the checkpoint's sampling defaults do not leak in): greedy when temperature is 0."""
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_p=top_p if sample else None, top_k=None, repetition_penalty=repetition_penalty,
        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
    )
    if stop_str and len(tokenizer.encode(stop_str, add_special_tokens=False)) > 1:
        config.stop_strings = [stop_str]  # a multi-token end-of-turn text (needs tokenizer= in generate)
    return config


@torch.no_grad()
def _generate_batch(model: Any, tokenizer: Any, batch: list[list[int]], config: GenerationConfig,
                    streamer: Any = None) -> list[list[int]]:
    """New token ids for each prompt; prompts are left-padded so every row continues at the same column."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            generation_config=config, streamer=streamer, tokenizer=tokenizer)
    return [row[width:].tolist() for row in output.cpu()]


def generate_responses(
    model: Any,
    tokenizer: Any,
    chat_format: Any,
    conversations: list[list[dict]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    streamer: Any = None,
) -> list[str]:
    """Answer each conversation (message lists ending with a user turn); greedy unless ``temperature`` > 0.

    Prompts are rendered with ``chat_format`` and tokenised as training did (:func:`prompt_ids`); batches group
    prompts of similar length, and the answers come back in the input order.
    """
    was_training = model.training
    model.eval()
    encoded = [prompt_ids(tokenizer, chat_format, messages) for messages in conversations]
    stop_ids = stop_token_ids(tokenizer, chat_format, model)
    config = generation_config(tokenizer, stop_ids, max_new_tokens, temperature, top_p, repetition_penalty,
                               chat_format.stop_str)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    responses = [""] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            new_ids = _generate_batch(model, tokenizer, [encoded[i] for i in index], config, streamer)
            for i, ids in zip(index, new_ids):
                responses[i] = decode_response(tokenizer, chat_format, ids, stop_ids)
    finally:
        model.train(was_training)
    return responses


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
# Loading


def load_for_inference(args: InferenceArguments) -> tuple[Any, Any, Any]:
    """Model (adapter merged in memory), left-padding tokenizer and the chat format; the format used is printed."""
    check_base_path(args.base_model)
    adapter = read_adapter(args.lora_model) if args.lora_model else None
    tokenizer_dir = args.tokenizer_path or (
        args.lora_model if args.lora_model and os.path.isfile(os.path.join(args.lora_model, "tokenizer_config.json"))
        else args.base_model
    )
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tokenizer_dir,
                                              trust_remote_code=args.trust_remote_code), padding_side="left")
    model_dirs = [d for d in (args.lora_model, args.base_model) if d]
    chat_format = resolve_chat_format(tokenizer, model_dirs, args.template_name, args.system_prompt)
    print(f"chat format: {json.dumps(chat_format.record(), ensure_ascii=False)} ({_format_source(args, model_dirs)})",
          file=sys.stderr, flush=True)

    dtype = resolve_dtype(args.torch_dtype)
    if adapter is not None:
        if detect_model_type(adapter) != "causal_lm":
            raise ConfigError(f"--lora_model {args.lora_model} is a reward-model adapter (it scores, it cannot chat).")
        model, _ = load_adapted_model(args.base_model, adapter, tokenizer, "causal_lm", dtype, args.trust_remote_code)
        model = model.merge_and_unload()  # one matmul per layer instead of two while generating
    else:
        model = load_base(args.base_model, "causal_lm", dtype, args.trust_remote_code)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ConfigError(
            f"the tokenizer ({tokenizer_dir}) has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().weight.shape[0]} embedding rows: pass the tokenizer it was trained with."
        )
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer, chat_format


def _format_source(args: InferenceArguments, model_dirs: list[str]) -> str:
    if args.template_name:
        return "from --template_name"
    for directory in model_dirs:
        if os.path.isdir(directory) and load_recorded_chat_format(directory):
            return f"recorded at training time in {os.path.join(directory, RECORD_FILE)}"
    return f"default: no {RECORD_FILE} in {' or '.join(model_dirs)}"


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
        repetition_penalty=args.repetition_penalty,
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
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(records)} answers to {args.output_file}", flush=True)
    return len(records)


def main(args: list[str] | None = None) -> Any:
    (inference_args,) = parse_args([InferenceArguments], args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    if inference_args.data_file:
        find_data_files(inference_args.data_file)  # a missing file fails before the model loads
    model, tokenizer, chat_format = load_for_inference(inference_args)
    if inference_args.data_file:
        return answer_file(model, tokenizer, chat_format, inference_args)
    return chat(model, tokenizer, chat_format, inference_args)


if __name__ == "__main__":
    run_main(main)
