"""Folding a LoRA adapter into its base model, checked against base + adapter, written atomically.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) from any stage is loaded onto the
full-precision base -- never onto quantized weights, also when it was trained with QLoRA -- after the base has been
shaped as training shaped it: embeddings resized to the adapter's vocabulary, a one-output ``score`` head for a
reward model. Every adapter tensor is checked against the base's modules first, so a wrong base is reported by
name instead of as a size-mismatch traceback. :func:`load_adapted_model` is shared with ``inference.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from .arguments import ModelArguments, ModelSourceArguments
from .chat_format import RECORD_FILE, load_recorded_chat_format, resolve_chat_format
from .errors import ConfigError, UserError
from .jinja_chat_templates import jinja_chat_template
from .modeling import load_tokenizer
from .resilience import writing

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MODEL_TYPES = ["auto", "causal_lm", "sequence_classification"]
QUANTIZATIONS = ["auto", "none", "4bit", "qlora", "8bit"]
SCORE_HEAD = "score"
MERGE_REPORT = "merge_report.json"
# Config fields two checkpoints of one architecture and vocabulary share.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Parts of a PEFT state-dict key that follow the adapted module's path.
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                  "modules_to_save", "original_module"}
# PEFT does not record a quantized base in adapter_config.json; its model card may (README.md).
_CARD_QUANT_LINE = "The following `bitsandbytes` quantization config was used during training:"


@dataclass
class MergeArguments:
    """Flags of merge_peft_adapter.py besides the model source (--base_model/--model_name_or_path, --lora_model,
    --tokenizer_path, --trust_remote_code: :class:`medtrain.arguments.ModelSourceArguments`, shared with inference,
    serving and evaluation)."""

    output_dir: str = field(metadata={"help": "Where to write the merged model (must not exist or be empty)."})
    model_type: str = field(
        default="auto",
        metadata={
            "help": "causal_lm or sequence_classification (reward model). auto: sequence_classification when the "
            "adapter's task_type is SEQ_CLS or it carries a trained `score` head.",
            "choices": MODEL_TYPES,
        },
    )
    # Not GenerationModelArguments.torch_dtype: there it is the dtype weights are loaded and run in (auto = float32
    # on CPU, bf16/fp16 on GPU); here merging always runs in float32 and this is the dtype written (auto = the base
    # checkpoint's own dtype). Same spelling and choices, different meaning and resolution: kept separate.
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the written weights; merging itself runs in float32. auto: the base checkpoint's dtype.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    training_quantization: str = field(
        default="auto",
        metadata={
            "help": "How the base was quantized while the adapter trained (reported only: the merge always uses the "
            "full-precision base). 4bit = --load_in_4bit, qlora = --load_in_4bit --qlora (NF4), 8bit = "
            "--load_in_8bit; auto = read the adapter's model card, else none.",
            "choices": QUANTIZATIONS,
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    no_verify: bool = field(
        default=False, metadata={"help": "Skip comparing the merged model with base + adapter (not recommended)."}
    )
    tolerance: float = field(
        default=1e-3, metadata={"help": "Largest max |logit difference| (float32) accepted between merged and base + adapter."}
    )


@dataclass
class AdapterInfo:
    """What an adapter directory says about itself, read without loading any model."""

    path: str
    config: dict
    shapes: dict[str, tuple[int, ...]]  # PEFT state-dict key -> tensor shape

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def recorded_base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def module_shapes(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(module path in the base model, parameter part, shape)`` of every tensor."""
        return [(*split_adapter_key(key), shape) for key, shape in self.shapes.items()]

    def full_weight_rows(self, module: str) -> int | None:
        """Rows of a full weight the adapter stores for ``module`` (modules_to_save / saved embeddings)."""
        for path, part, shape in self.module_shapes():
            if path == module and part in ("weight", "modules_to_save.weight"):
                return shape[0]
        return None


@dataclass
class MergeReport:
    output_dir: str
    model_type: str
    dtype: str
    max_abs_diff: float | None = None  # merged vs base + adapter, float32
    written_max_abs_diff: float | None = None  # reloaded output_dir vs base + adapter (float32 outputs only)
    quantization: str | None = None  # how the base was quantized during training
    quantized_max_abs_diff: float | None = None  # merged vs quantized base + adapter (the training-time model)
    resized_to: int | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Reading the adapter


def split_adapter_key(key: str) -> tuple[str, str]:
    """``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> ``("model.layers.0.q_proj", "lora_A.weight")``."""
    parts = key.removeprefix("base_model.model.").split(".")
    for i, part in enumerate(parts):
        if part in _ADAPTER_PARTS:
            return ".".join(parts[:i]), ".".join(parts[i:])
    return ".".join(parts[:-1]), parts[-1]


def _tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    safetensors_file = os.path.join(path, "adapter_model.safetensors")
    bin_file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(safetensors_file):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_file, "pt") as fh:
                return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise UserError(f"{safetensors_file}: cannot read the adapter weights: {err}") from None
    if os.path.isfile(bin_file):
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise UserError(f"{path}: no adapter_model.safetensors (or .bin): the adapter's weights are missing.")


def read_adapter(path: str, model_flag: str = "--model_name_or_path") -> AdapterInfo:
    """Read ``adapter_config.json`` and the weight shapes of the adapter in ``path`` (``model_flag``: the model flag
    as the user spelled it, which messages name, as in :func:`check_base_path`)."""
    if not os.path.isdir(path):
        raise ConfigError(f"--lora_model {path}: no such directory.")
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        hint = f" It holds a full model: use it as {model_flag} instead." if os.path.isfile(
            os.path.join(path, "config.json")) else ""
        raise ConfigError(f"--lora_model {path}: no {ADAPTER_CONFIG} there, so it is not a LoRA adapter.{hint}")
    try:
        with open(config_file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"{config_file}: cannot read it: {err}") from None
    if config.get("peft_type") not in (None, "LORA"):
        raise UserError(f"{config_file}: peft_type {config.get('peft_type')!r} is not a LoRA adapter.")
    return AdapterInfo(path, config, _tensor_shapes(path))


def detect_model_type(info: AdapterInfo, requested: str = "auto") -> str:
    """``causal_lm`` or ``sequence_classification``; a request that would lose the adapter's head is refused."""
    has_score = info.full_weight_rows(SCORE_HEAD) is not None
    is_seq_cls = info.task_type == "SEQ_CLS" or SCORE_HEAD in (info.config.get("modules_to_save") or []) or has_score
    if requested == "auto":
        return "sequence_classification" if is_seq_cls else "causal_lm"
    if requested == "causal_lm" and is_seq_cls:
        raise ConfigError(
            f"--lora_model {info.path} is a reward-model adapter (task_type {info.task_type}, trained `score` head): "
            "--model_type causal_lm would drop its head. Use --model_type sequence_classification (or auto)."
        )
    if requested == "sequence_classification" and not has_score:
        raise ConfigError(
            f"--lora_model {info.path} has no trained `score` head (task_type {info.task_type}): a sequence "
            "classifier merged from it would score with a random head. Use --model_type causal_lm (or auto)."
        )
    return requested


def detect_training_quantization(adapter_dir: str, requested: str = "auto") -> str | None:
    """How the base was quantized when the adapter trained: ``4bit``, ``qlora``, ``8bit`` or None.

    PEFT 0.21 records nothing in ``adapter_config.json``; a model card written by a PEFT that records the
    bitsandbytes config is read when ``requested`` is ``auto``.
    """
    if requested != "auto":
        return None if requested == "none" else requested
    card = os.path.join(adapter_dir, "README.md")
    try:
        with open(card, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    if _CARD_QUANT_LINE not in text:
        return None
    section = text.split(_CARD_QUANT_LINE, 1)[1]
    if re.search(r"- load_in_8bit: True", section):
        return "8bit"
    if re.search(r"- load_in_4bit: True", section):
        return "qlora" if re.search(r"- bnb_4bit_quant_type: nf4", section) else "4bit"
    return None


# --------------------------------------------------------------------------------------------------------------
# Loading a base shaped like the training-time model, and attaching the adapter


def _read_config(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = "" if os.path.exists(path) else " (no such local directory, and not available from the Hub)"
        raise UserError(f"cannot read a model config from {path}{where}: {str(err).splitlines()[0]}") from None


def check_base_path(base_model: str, flag: str = "--model_name_or_path") -> None:
    """The base must be a full model, not an adapter, and must hold full-precision weights. Errors name ``flag``,
    the spelling the user typed (``--model_name_or_path`` or its alias ``--base_model``)."""
    local = os.path.isdir(base_model)
    if not local and base_model.startswith((".", "/", "~")):
        raise ConfigError(f"{flag} {base_model}: no such directory.")
    if local and os.path.isfile(os.path.join(base_model, ADAPTER_CONFIG)) and not os.path.isfile(
        os.path.join(base_model, "config.json")
    ):
        raise ConfigError(
            f"{flag} {base_model} is a LoRA adapter, not a model: merge it into its own base first and pass "
            "that merged directory."
        )
    if local and os.path.isfile(os.path.join(base_model, "config.json")):
        with open(os.path.join(base_model, "config.json"), encoding="utf-8") as fh:
            quant = json.load(fh).get("quantization_config")
        if quant:
            raise ConfigError(
                f"{flag} {base_model} stores quantized weights ({quant.get('quant_method', 'quantized')}): an "
                "adapter is merged into the full-precision base only. Pass the original (unquantized) base model."
            )


def check_recorded_base(info: AdapterInfo, base_config: Any, trust_remote_code: bool,
                        model_flag: str = "--model_name_or_path") -> None:
    """Compare the base model (``model_flag``) with the base recorded in adapter_config.json, when that one is on
    disk."""
    recorded = info.recorded_base
    if not recorded or not os.path.isfile(os.path.join(recorded, "config.json")):
        return
    trained_on = _read_config(recorded, trust_remote_code)
    differences = [
        f"{name} {getattr(trained_on, name)} vs {getattr(base_config, name)}"
        for name in _SHAPE_FIELDS
        if getattr(trained_on, name, None) is not None and getattr(base_config, name, None) is not None
        and getattr(trained_on, name) != getattr(base_config, name)
    ]
    if differences:
        raise ConfigError(
            f"--lora_model {info.path} was trained on {recorded}, whose architecture or vocabulary differs from "
            f"{model_flag} ({'; '.join(differences)}; adapter's base vs yours). Pass the base model it was trained on."
        )


def _module_name(model: Any, module: Any) -> str | None:
    if module is None:
        return None
    return next((name for name, mod in model.named_modules() if mod is module), None)


def _expected_shape(module: Any, part: str) -> tuple[int, ...] | None:
    """The shape an adapter tensor ``part`` must have for ``module`` (None when not checked)."""
    weight = getattr(module, "weight", None)
    if part in ("weight", "modules_to_save.weight", "original_module.weight") and weight is not None:
        return tuple(weight.shape)
    if isinstance(module, torch.nn.Linear):
        if part == "lora_A.weight":
            return (-1, module.in_features)
        if part == "lora_B.weight":
            return (module.out_features, -1)
    if isinstance(module, torch.nn.Embedding):
        if part == "lora_embedding_A":
            return (-1, module.num_embeddings)
        if part == "lora_embedding_B":
            return (module.embedding_dim, -1)
    return None


def check_adapter_shapes(model: Any, info: AdapterInfo, model_flag: str = "--model_name_or_path") -> None:
    """Every adapter tensor must fit a module of ``model``; mismatches are listed (a different architecture)."""
    problems = []
    for path, part, shape in info.module_shapes():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: no such module in the base model")
            continue
        expected = _expected_shape(module, part)
        if expected is None:
            continue
        if len(expected) != len(shape) or any(e not in (-1, s) for e, s in zip(expected, shape)):
            problems.append(f"{path}.{part}: adapter {list(shape)}, base expects {[e if e >= 0 else 'r' for e in expected]}")
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(
            f"--lora_model {info.path} does not fit {model_flag}: {listed}. The adapter was trained on a different "
            f"architecture (adapter_config.json base_model_name_or_path: {info.recorded_base!r})."
        )


def match_vocabulary(model: Any, info: AdapterInfo, tokenizer: Any,
                     model_flag: str = "--model_name_or_path") -> int | None:
    """Resize the base's embeddings to the adapter's vocabulary before the adapter is loaded.

    The adapter's saved embedding rows (modules_to_save, or PEFT's automatic save after a resize) are the size
    training used. Returns the new size, or None when no resize was needed.
    """
    embed_name = _module_name(model, model.get_input_embeddings())
    head_name = _module_name(model, model.get_output_embeddings())
    base_rows = model.get_input_embeddings().weight.shape[0]
    adapter_rows = info.full_weight_rows(embed_name) if embed_name else None
    if adapter_rows is None and head_name:
        adapter_rows = info.full_weight_rows(head_name)
    vocab = len(tokenizer)
    if adapter_rows is None:
        if vocab > base_rows:
            raise UserError(
                f"the tokenizer has {vocab} tokens but {model_flag} has {base_rows} embedding rows and --lora_model "
                f"{info.path} carries no embeddings for the extra tokens: they would get untrained weights. Pass the "
                "tokenizer the adapter was trained with (--tokenizer_path), or retrain with --modules_to_save "
                "embed_tokens,lm_head."
            )
        return None
    if adapter_rows < base_rows:
        raise UserError(
            f"--lora_model {info.path} was trained with a {adapter_rows}-row vocabulary but {model_flag} has "
            f"{base_rows} embedding rows: a different base model or vocabulary. Pass the base it was trained on."
        )
    if vocab > adapter_rows:
        raise UserError(
            f"the tokenizer has {vocab} tokens but --lora_model {info.path} was trained with {adapter_rows} "
            "embedding rows: this is not the tokenizer the adapter was trained with (pass it as --tokenizer_path)."
        )
    if adapter_rows == base_rows:
        return None
    if head_name and info.full_weight_rows(head_name) is None:
        logger.warning("the adapter stores input embeddings but not %s for the %d new rows: those rows of the "
                       "output head stay untrained", head_name, adapter_rows - base_rows)
    # The adapter overwrites the new rows, so their initial values do not matter (no random mean-resizing).
    model.resize_token_embeddings(adapter_rows, mean_resizing=False)
    logger.info("resized the base embeddings from %d to %d rows, as the adapter was trained", base_rows, adapter_rows)
    return adapter_rows


def _quantization_config(quantization: str) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    qlora = quantization == "qlora"  # the same settings as medtrain.modeling.quantization_config
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" if qlora else "fp4",
                              bnb_4bit_use_double_quant=qlora, bnb_4bit_compute_dtype=torch.float32)


def load_base(base_model: str, model_type: str, dtype: torch.dtype, trust_remote_code: bool = False,
              num_labels: int = 1, quantization: str | None = None) -> Any:
    """The base as ``model_type`` (a reward model: a ``num_labels``-output sequence classifier), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _read_config(base_model, trust_remote_code)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if quantization:
        kwargs["quantization_config"] = _quantization_config(quantization)
    if model_type == "sequence_classification":
        config.num_labels = num_labels  # from_pretrained ignores num_labels next to an explicit config
        auto_class = AutoModelForSequenceClassification
    else:
        auto_class = AutoModelForCausalLM
    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # the quiet loader is a nicety only
        from contextlib import nullcontext as suppress_seqcls_warning
    try:
        with suppress_seqcls_warning():  # a fresh `score` head is expected: the adapter brings the trained one
            model = auto_class.from_pretrained(base_model, config=config, **kwargs)
    except ImportError as err:
        raise UserError(f"cannot load {base_model}: {err}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model from {base_model}: {str(err).splitlines()[0]}") from None
    return model.eval()


def load_adapted_model(base_model: str, info: AdapterInfo, tokenizer: Any, model_type: str, dtype: torch.dtype,
                       trust_remote_code: bool = False, quantization: str | None = None,
                       model_flag: str = "--model_name_or_path") -> tuple[Any, int | None]:
    """Base (resized to the adapter's vocabulary) + adapter as a PeftModel in eval mode, and the resized size
    (``model_flag``: the model flag as the user spelled it, for error messages)."""
    from peft import PeftModel

    model = load_base(base_model, model_type, dtype, trust_remote_code,
                      num_labels=info.full_weight_rows(SCORE_HEAD) or 1, quantization=quantization)
    resized = match_vocabulary(model, info, tokenizer, model_flag)
    check_adapter_shapes(model, info, model_flag)
    if getattr(model.config, "pad_token_id", None) is None or model_type == "sequence_classification":
        # A reward model reads its score at the last token != pad_token_id: training set it to the tokenizer's pad.
        model.config.pad_token_id = tokenizer.pad_token_id
    try:
        model = PeftModel.from_pretrained(model, info.path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"cannot load the adapter {info.path} onto {base_model}: {str(err).splitlines()[0]}") from None
    return model.eval(), resized


# --------------------------------------------------------------------------------------------------------------
# Verification


def probe_batch(vocab_size: int, pad_token_id: int | None, rows: int = 3, length: int = 12) -> torch.Tensor:
    """Fixed token ids to compare models on: random rows plus the highest ids (the rows a resize adds).

    The pad id is avoided because a sequence classifier reads its score at the last non-pad token.
    """
    length = min(length, vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    ids[-1] = torch.arange(vocab_size - length, vocab_size)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = (pad_token_id + 1) % vocab_size
    return ids


@torch.no_grad()
def model_outputs(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (causal LM) or scores (sequence classifier) in float32 on CPU."""
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device))
    return out.logits.float().cpu()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# Writing


def check_output_dir(output_dir: str, overwrite: bool, inputs: list[str]) -> None:
    """Refuse a non-empty ``output_dir`` (unless ``overwrite``) and one that is an input directory."""
    real = os.path.realpath(output_dir)
    for path in inputs:
        if path and os.path.exists(path) and (os.path.realpath(path) + os.sep).startswith(real + os.sep):
            raise ConfigError(f"--output_dir {output_dir} is or contains an input ({path}): choose another directory.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} is a file, not a directory.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ConfigError(
            f"--output_dir {output_dir} exists and is not empty: choose another directory or pass --overwrite_output_dir."
        )


def replace_dir(tmp_dir: str, output_dir: str) -> None:
    """Move the finished ``tmp_dir`` to ``output_dir``; an old ``output_dir`` is removed only after the move."""
    if os.path.isdir(output_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=os.path.dirname(tmp_dir))
        os.rmdir(old)
        os.rename(output_dir, old)
        os.rename(tmp_dir, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp_dir, output_dir)


def _stop_token_ids(tokenizer: Any, chat_format: Any) -> list[int]:
    """Token ids that end an answer: eos, and the chat format's stop string when it is one token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop = getattr(chat_format, "stop_str", None) if chat_format is not None else None
    if stop:
        stop_ids = tokenizer.encode(stop, add_special_tokens=False)
        if len(stop_ids) == 1 and stop_ids[0] not in ids:
            ids.append(stop_ids[0])
    return ids


def _update_generation_config(model: Any, tokenizer: Any, chat_format: Any) -> None:
    """Let plain ``generate`` stop where the chat format's answers end."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    eos = config.eos_token_id
    ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    for token_id in _stop_token_ids(tokenizer, chat_format):
        if token_id not in ids:
            ids.append(token_id)
    if ids:
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def _write_chat_template(tokenizer: Any, chat_format: Any, report: MergeReport) -> None:
    """Put the recorded chat format into the tokenizer files as a Jinja chat template, so engines that render
    prompts from them (vLLM, SGLang, ``apply_chat_template``) prompt the merged model as training did."""
    if chat_format is None:
        return
    template = jinja_chat_template(chat_format)
    if template is not None:
        tokenizer.chat_template = template
    stop = getattr(chat_format, "stop_str", None)
    if stop and len(tokenizer.encode(stop, add_special_tokens=False)) > 1:
        report.notes.append(f"the end-of-turn text {stop!r} is several tokens: engines that stop only at eos ids "
                            f"(vLLM, SGLang) need it as a stop string in each request (\"stop\": [{stop!r}])")


def _recorded_format(info: AdapterInfo, base_model: str, tokenizer: Any) -> tuple[Any, str | None]:
    """The chat format training recorded (adapter dir, else base dir) and the record file; checked to resolve."""
    for directory in (info.path, base_model):
        if directory and os.path.isdir(directory) and load_recorded_chat_format(directory):
            record_file = os.path.join(directory, RECORD_FILE)
            try:
                return resolve_chat_format(tokenizer, [directory], None, None), record_file
            except UserError as err:
                raise ConfigError(f"{record_file}: {err}") from None
    return None, None


# --------------------------------------------------------------------------------------------------------------
# The merge


def resolve_save_dtype(name: str, base_config: Any) -> torch.dtype:
    """``auto`` keeps the base checkpoint's dtype (float32 when it records none)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    dtype = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def merge_adapter(source: ModelSourceArguments, args: MergeArguments,
                  model_flag: str = "--model_name_or_path") -> MergeReport:
    """Merge ``source.lora_model`` into ``source.model_name_or_path`` and write ``args.output_dir`` (see the module
    doc); ``model_flag``: the spelling of the model flag the user typed, which error messages name."""
    # Everything that can be checked without loading weights is checked first, before anything is written.
    info = read_adapter(source.lora_model, model_flag)
    check_base_path(source.model_name_or_path, model_flag)
    check_output_dir(args.output_dir, args.overwrite_output_dir,
                     [source.model_name_or_path, source.lora_model, source.tokenizer_path])
    model_type = detect_model_type(info, args.model_type)
    quantization = detect_training_quantization(info.path, args.training_quantization)
    base_config = _read_config(source.model_name_or_path, source.trust_remote_code)
    check_recorded_base(info, base_config, source.trust_remote_code, model_flag)
    # --tokenizer_path, else the tokenizer saved with the adapter (training saves it), else the base's
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=source.tokenizer_dir(),
                                              trust_remote_code=source.trust_remote_code))
    chat_format, record_file = _recorded_format(info, source.model_name_or_path, tokenizer)
    save_dtype = resolve_save_dtype(args.torch_dtype, base_config)
    report = MergeReport(args.output_dir, model_type, str(save_dtype).removeprefix("torch."), quantization=quantization)
    if record_file is None:
        report.notes.append(f"no {RECORD_FILE} in the adapter or base dir: inference will use the default chat format")
    logger.info("merging %s adapter %s into %s (float32; written as %s)", model_type, info.path,
                source.model_name_or_path, report.dtype)
    if quantization:
        logger.info("the adapter was trained on a %s-quantized base; merging into the full-precision base", quantization)

    # Base + adapter in float32, reference outputs, then the merge itself.
    model, report.resized_to = load_adapted_model(source.model_name_or_path, info, tokenizer, model_type, torch.float32,
                                                  source.trust_remote_code, model_flag=model_flag)
    probes = probe_batch(model.get_input_embeddings().weight.shape[0], model.config.pad_token_id)
    reference = model_outputs(model, probes) if not args.no_verify else None
    model = model.merge_and_unload()
    if reference is not None:
        report.max_abs_diff = max_abs_diff(model_outputs(model, probes), reference)
        logger.info("max |logit difference|, merged vs base + adapter (float32): %.3g", report.max_abs_diff)
        if not report.max_abs_diff <= args.tolerance:  # also catches NaN
            raise UserError(
                f"the merged model differs from base + adapter by {report.max_abs_diff:.3g} (max |logit|, float32), "
                f"more than --tolerance {args.tolerance}: nothing was written. Check that {model_flag} is the model "
                "the adapter was trained on (or pass --no_verify to write it anyway)."
            )
    if quantization and not args.no_verify:
        report.quantized_max_abs_diff = _quantized_difference(source, info, tokenizer, model_type, quantization,
                                                              probes, model_outputs(model, probes), model_flag)

    # Untie input/output embeddings that the adapter trained separately, else saving would drop one of them.
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and (
        head.weight is not model.get_input_embeddings().weight
    ):
        model.config.tie_word_embeddings = False
        report.notes.append("input and output embeddings were trained separately: written untied")
    model = model.to(save_dtype)
    _update_generation_config(model, tokenizer, chat_format)
    _write_chat_template(tokenizer, chat_format, report)

    target = os.path.abspath(args.output_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # A sibling temporary directory: the final rename stays on one filesystem, so it is atomic.
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
    # A failed write (disk full, quota) is reported naming the target, the free space and what the weights need;
    # the temporary directory is removed and an existing output_dir is left as it was.
    needs = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with writing(target, "merged model", needs):
        try:
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            if record_file:
                shutil.copyfile(record_file, os.path.join(tmp_dir, RECORD_FILE))
            if reference is not None and save_dtype == torch.float32:
                # The written files, reloaded, must give the same outputs (catches tying/saving mistakes).
                del model
                written = load_base(tmp_dir, model_type, torch.float32, source.trust_remote_code,
                                    num_labels=info.full_weight_rows(SCORE_HEAD) or 1)
                report.written_max_abs_diff = max_abs_diff(model_outputs(written, probes), reference)
                del written
                logger.info("max |logit difference|, written model vs base + adapter: %.3g", report.written_max_abs_diff)
                if not report.written_max_abs_diff <= args.tolerance:
                    raise UserError(
                        f"the merged model as written differs from base + adapter by {report.written_max_abs_diff:.3g}: "
                        "nothing was written (please report this)."
                    )
            with open(os.path.join(tmp_dir, MERGE_REPORT), "w", encoding="utf-8") as fh:
                # merge_report.json keeps its keys (base_model, lora_model): other tools read it
                json.dump(dict(vars(report), base_model=source.model_name_or_path, lora_model=source.lora_model), fh,
                          indent=2)
            replace_dir(tmp_dir, target)
        finally:
            if os.path.isdir(tmp_dir):
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return report


def _quantized_difference(source: ModelSourceArguments, info: AdapterInfo, tokenizer: Any, model_type: str,
                          quantization: str, probes: torch.Tensor, merged: torch.Tensor,
                          model_flag: str) -> float | None:
    """Max |logit difference| between the merged model and the quantized base + adapter training used."""
    try:
        quantized, _ = load_adapted_model(source.model_name_or_path, info, tokenizer, model_type, torch.float32,
                                          source.trust_remote_code, quantization=quantization, model_flag=model_flag)
    except (ImportError, UserError, RuntimeError) as err:
        logger.warning("could not load the %s-quantized base to compare with (%s)", quantization, err)
        return None
    diff = max_abs_diff(model_outputs(quantized, probes), merged)
    del quantized
    logger.info("max |logit difference|, merged (full-precision base) vs %s-quantized base + adapter: %.3g "
                "(the base's quantization error)", quantization, diff)
    return diff
