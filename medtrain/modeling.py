"""Loading tokenizers and models (precision, quantization, attention) and attaching LoRA adapters."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .arguments import LoraArguments, ModelArguments
from .attention import enable_shift_attn
from .errors import ConfigError, UserError
from .fused_lora import fuse_lora_layers
from .rope import apply_rope_scaling

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' = float32 on CPU (fast, exact), bfloat16 on a GPU that supports it, else float16."""
    if name != "auto":
        return _DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _check_path(path: str | None, flag: str) -> str:
    if not path:
        raise ConfigError(f"{flag} is required (a local model directory or a Hub id).")
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"{flag} {path}: no such directory. For the default model run `python prepare_model.py`.")
    return path


def load_tokenizer(model_args: ModelArguments, padding_side: str = "right") -> Any:
    """Load the tokenizer and make sure it can pad (pad = eos/unk when the tokenizer has no pad token)."""
    from transformers import AutoTokenizer

    path = _check_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path, "--tokenizer_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir
        )
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        logger.info("tokenizer has no pad token; using %r", tokenizer.pad_token)
    tokenizer.padding_side = padding_side
    return tokenizer


def quantization_config(model_args: ModelArguments, compute_dtype: torch.dtype) -> Any | None:
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4" if model_args.qlora else "fp4",
            bnb_4bit_use_double_quant=model_args.qlora,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None


def distributed_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_model(
    model_args: ModelArguments, auto_class: Any = None, tokenizer: Any = None, max_length: int | None = None,
    **extra: Any,
) -> Any:
    """Load ``auto_class`` (default AutoModelForCausalLM) from ``--model_name_or_path``.

    Quantized weights on a single GPU go through ``device_map``; under DDP/DeepSpeed each rank loads to its own
    device and Trainer places it (device_map and DDP must never be combined). ``max_length`` (the training length)
    derives the ``--rope_scaling`` factor; ``--shift_attn`` switches attention to S2-Attn.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    path = _check_path(model_args.model_name_or_path, "--model_name_or_path")
    dtype = resolve_dtype(model_args.torch_dtype)
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        attn_implementation=model_args.attn_implementation or "sdpa",
    )
    quant = quantization_config(model_args, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": local_rank}
    kwargs.update(extra)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir)
        apply_rope_scaling(config, model_args.rope_scaling, max_length, model_args.rope_scaling_factor)
        model = auto_class.from_pretrained(path, config=config, **kwargs)
    except ImportError as err:
        raise UserError(f"cannot load {path}: {err}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from None
    if tokenizer is not None:
        resize_embeddings_to(model, tokenizer)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if quant is not None:
        fix_bnb_cpu_training(model)
    if model_args.shift_attn:
        layers = enable_shift_attn(model, model_args.shift_attn_ratio)
        logger.info("S2-Attn on %d attention layers (group ratio %s, training only)", layers, model_args.shift_attn_ratio)
    return model


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding matrix, also under ZeRO-3 (whose partitioned weights have shape (0,))."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def resize_embeddings_to(model: Any, tokenizer: Any) -> bool:
    """Grow the embedding matrix when the tokenizer is larger; new rows get the mean of the old ones."""
    size = embedding_rows(model)
    if len(tokenizer) <= size:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    logger.warning("resized embeddings from %d to %d rows (mean-initialised) for the tokenizer", size, len(tokenizer))
    return True


def fix_bnb_cpu_training(model: Any) -> int:
    """Keep bitsandbytes 4-bit layers trainable on CPU (STACK-NOTES trap 6).

    On CPUs with AVX512-BF16 the first no-grad forward in eval mode repacks every ``Linear4bit`` weight into an
    inference-only layout, after which LoRA gradients through it are silently None/zero. Turning the fast path off
    keeps the trainable layout. Returns the number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def apply_lora(model: Any, lora_args: LoraArguments, task_type: str = "CAUSAL_LM",
               gradient_checkpointing: bool = False, extra_modules_to_save: list[str] | None = None) -> Any:
    """Wrap ``model`` in a LoRA adapter (fresh, or continued from ``--peft_path``); quantized bases are prepared."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    modules_to_save = list(lora_args.modules_to_save_list or [])
    for name in extra_modules_to_save or []:
        if name not in modules_to_save:
            modules_to_save.append(name)
    if lora_args.peft_path:
        if not os.path.isfile(os.path.join(lora_args.peft_path, "adapter_config.json")):
            raise ConfigError(f"--peft_path {lora_args.peft_path}: no adapter_config.json there (not a LoRA adapter).")
        logger.info("continuing training of the adapter in %s", lora_args.peft_path)
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
    else:
        targets = lora_args.target_module_list
        config = LoraConfig(
            task_type=task_type,
            r=lora_args.lora_rank,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            target_modules="all-linear" if targets == "all" else targets,
            modules_to_save=modules_to_save or None,
            # Tied input/output embeddings (SmolLM2) trained via modules_to_save must stay one weight, or the merge
            # into the tied base silently loses the trained lm_head.
            ensure_weight_tying=bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
            and bool(modules_to_save),
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise ConfigError(f"--target_modules {lora_args.target_modules}: {str(err).splitlines()[0]}") from None
    fix_bnb_cpu_training(model)
    upcast_trainable(model)
    if lora_args.fused_lora:
        fused = fuse_lora_layers(model)
        if fused:
            logger.info("fused LoRA branch on %d layers (--fused_lora False for PEFT's own forward)", fused)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def upcast_trainable(model: Any) -> int:
    """Make every trainable parameter fp32; returns how many were cast.

    Over a bf16 base (the CPU default where bf16 matmul is fast, or --torch_dtype bfloat16) PEFT keeps LoRA weights in
    fp32 (``autocast_adapter_dtype``), but ``modules_to_save`` copies (a reward model's score head, embeddings
    trained in full after the tokenizer grew) inherit the base's bf16: their AdamW updates below bf16's rounding unit
    (about 2**-8 of a weight) would vanish and the optimizer state would be bf16. Under autocast their matmuls still
    run in bf16 (the weight is cast per call). Tied weights stay one Parameter (cast in place).
    """
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            count += 1
    return count


def last_positions(length: int, count: int, device: torch.device | str) -> torch.Tensor:
    """``logits_to_keep`` for a causal LM's forward that computes the LM head on the last ``count`` of ``length``
    positions only: a 1-D index tensor (a form transformers' ``logits_to_keep`` documents), not the int ``count``.

    An int makes the model slice ``hidden[:, -count:, :]``, a non-contiguous view; ``F.linear`` on it goes through
    matmul's batched path, which expands the (vocab, hidden) weight to one copy per row when it is bf16. For SmolLM2 at
    batch 4 that is a 226 MB copy and 427 ms per forward (1 thread, AMD EPYC), against 7.7 ms for the same logits from
    the gathered, contiguous rows an index tensor gives (fp32: 42 -> 19 ms; 65 positions: 524 -> 84 ms bf16).
    """
    return torch.arange(length - count, length, device=device)


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
