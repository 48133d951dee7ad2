"""Generation with the chat format recorded at training time, shared by inference.py, openai_api.py and
web_demo.py (through :mod:`medtrain.serving`).

Prompts are tokenised piece by piece exactly as SFT tokenised them (:func:`prompt_ids`), answers end at the model's
eos, the tokenizer's eos or the format's end-of-turn text (:func:`stop_token_ids`, :func:`decode_response`), and
batches are left-padded (:func:`left_pad`). The model flags (:class:`GenerationModelArguments`) and the loader
(:func:`load_for_inference`) also serve eval_benchmarks.py (adapter unmerged, right padding).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig

from .arguments import TORCH_DTYPES, ModelArguments, ModelSourceArguments
from .chat_format import RECORD_FILE, load_recorded_chat_format, prompt_pieces, resolve_chat_format
from .errors import ConfigError
from .merging import check_base_path, detect_model_type, load_adapted_model, load_base, read_adapter
from .modeling import load_tokenizer, resolve_dtype
from .tokenization import encode_dialog

__all__ = ["GenerationModelArguments", "decode_response", "format_source", "generate_batch",
           "generate_responses", "generation_config", "left_pad", "load_for_inference", "model_dirs_of", "prompt_ids",
           "stop_token_ids"]


def prompt_ids(tokenizer: Any, chat_format: Any, messages: list[dict], tools: list | None = None) -> list[int]:
    """Token ids of ``messages`` (ending with a user or tool turn) up to the assistant header, as training
    tokenises them (``tools``: the tool schemas offered).

    Each turn's pieces are tokenised separately, exactly like ``encode_dialog`` in SFT, so the ids equal the
    training ids of the same conversation minus the answer still to be generated (for templates that rewrite
    history: the ids of the sample training built for that reply).
    """
    pieces = prompt_pieces(chat_format, messages, tools)
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


def left_pad(batch: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of prompts left-padded to one width, so every row continues at the
    same column (generation appends one column per step)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, batch: list[list[int]], config: GenerationConfig,
                   streamer: Any = None) -> list[list[int]]:
    """New token ids for each prompt; prompts are left-padded so every row continues at the same column."""
    input_ids, attention_mask = left_pad(batch, tokenizer.pad_token_id)
    width = input_ids.shape[1]
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
    tools: list[list | None] | None = None,
) -> list[str]:
    """Answer each conversation (message lists ending with a user or tool turn); greedy unless ``temperature`` > 0.

    Prompts are rendered with ``chat_format`` (with ``tools[i]``, the tool schemas offered to conversation ``i``)
    and tokenised as training did (:func:`prompt_ids`); batches group prompts of similar length, and the answers
    come back in the input order. Tool calls in an answer are text: :func:`medtrain.tools.parse_tool_calls`.
    """
    was_training = model.training
    model.eval()
    tools = tools or [None] * len(conversations)
    encoded = [prompt_ids(tokenizer, chat_format, messages, t) for messages, t in zip(conversations, tools)]
    stop_ids = stop_token_ids(tokenizer, chat_format, model)
    config = generation_config(tokenizer, stop_ids, max_new_tokens, temperature, top_p, repetition_penalty,
                               chat_format.stop_str)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    responses = [""] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            new_ids = generate_batch(model, tokenizer, [encoded[i] for i in index], config, streamer)
            for i, ids in zip(index, new_ids):
                responses[i] = decode_response(tokenizer, chat_format, ids, stop_ids)
    finally:
        model.train(was_training)
    return responses


# --------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class GenerationModelArguments(ModelSourceArguments):
    """:class:`ModelSourceArguments` plus how to load the weights and render chats: the model flags of inference.py,
    openai_api.py, web_demo.py and eval_benchmarks.py (merge_peft_adapter.py has no chat to render and its
    ``--torch_dtype`` is the dtype it writes, not the one it loads in)."""

    template_name: str | None = field(
        default=None,
        metadata={"help": "Conversation template; default: the format recorded at training time in the model dir."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "Default system prompt (a conversation's or request's own system message wins); default: the "
                          "one recorded at training time, else the template's."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype; auto = float32 on CPU, bf16/fp16 on GPU.", "choices": TORCH_DTYPES},
    )


def load_for_inference(args: GenerationModelArguments, *, merge: bool = True, padding_side: str = "left",
                       with_chat_format: bool = True,
                       model_flag: str = "--model_name_or_path") -> tuple[Any, Any, Any]:
    """Model (on CUDA when there is one, in eval mode), tokenizer and chat format: the one loader of inference.py,
    openai_api.py, web_demo.py and eval_benchmarks.py. The format used and where it comes from are printed to stderr.

    ``merge``: fold ``--lora_model`` into the weights (one matmul per layer while generating), else return the
    PeftModel (evaluation scores the adapter as trained). ``padding_side``: left for generation (every row continues
    at the same column), right for lm-eval's log-likelihoods. ``with_chat_format`` False: no format is resolved
    (None is returned; a plain-prompt evaluation needs none). ``model_flag``: the spelling of the model flag the user
    typed, which error messages name. Everything that can be checked without weights is checked first.
    """
    check_base_path(args.model_name_or_path, model_flag)
    adapter = read_adapter(args.lora_model, model_flag) if args.lora_model else None
    tokenizer_dir = args.tokenizer_dir()
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tokenizer_dir,
                                              trust_remote_code=args.trust_remote_code), padding_side=padding_side)
    chat_format = None
    if with_chat_format:
        model_dirs = model_dirs_of(args)
        chat_format = resolve_chat_format(tokenizer, model_dirs, args.template_name, args.system_prompt)
        print(f"chat format: {json.dumps(chat_format.record(), ensure_ascii=False)} "
              f"({format_source(args, model_dirs)})", file=sys.stderr, flush=True)

    dtype = resolve_dtype(args.torch_dtype)
    if adapter is not None:
        if detect_model_type(adapter) != "causal_lm":
            raise ConfigError(f"--lora_model {args.lora_model} is a reward-model adapter: it scores, it has no "
                              "language-model head to generate or score text with.")
        model, _ = load_adapted_model(args.model_name_or_path, adapter, tokenizer, "causal_lm", dtype,
                                      args.trust_remote_code, model_flag=model_flag)
        if merge:
            model = model.merge_and_unload()  # one matmul per layer instead of two while generating
    else:
        model = load_base(args.model_name_or_path, "causal_lm", dtype, args.trust_remote_code)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ConfigError(
            f"the tokenizer ({tokenizer_dir}) has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().weight.shape[0]} embedding rows: pass the tokenizer it was trained with."
        )
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer, chat_format


def model_dirs_of(args: ModelSourceArguments) -> list[str]:
    """Where a recorded chat format is looked for, first match wins: the adapter dir, then the model dir."""
    return [d for d in (args.lora_model, args.model_name_or_path) if d]


def format_source(args: GenerationModelArguments, model_dirs: list[str]) -> str:
    """Where the chat format in use comes from, in words."""
    if args.template_name:
        return "from --template_name"
    for directory in model_dirs:
        if os.path.isdir(directory) and load_recorded_chat_format(directory):
            return f"recorded at training time in {os.path.join(directory, RECORD_FILE)}"
    return f"default: no {RECORD_FILE} in {' or '.join(model_dirs)}"
