"""Command-line arguments shared by every stage, and the one parser that reads them.

Each stage parses ``(ModelArguments, LoraArguments, DataArguments, <its training config>)`` with
:func:`parse_args`. A single ``.json``/``.yaml`` file of arguments may stand in for the flags (flags given
after the file override it). Unknown flags or keys are an error that names them. Checks that involve one
dataclass live in its ``__post_init__``; checks across dataclasses live in :func:`check_arguments`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import yaml
from transformers import HfArgumentParser

from .distributed import distributed_problems, read_deepspeed_config
from .errors import ConfigError
from .hardware import HardwarePlan, cuda_run, finalize_hardware, given_precision_flags

TORCH_DTYPES = ["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelArguments:
    """Which model to load and how (precision, quantization, attention)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path or Hub id of the base causal LM (for later stages: the merged output of the previous one)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer path or id; defaults to --model_name_or_path."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype to load the weights in. 'auto' on CPU (DPO, KTO, PPO, GRPO: float32, bf16 rounding swamps "
            "their reference log-ratios; the other stages:) where the CPU multiplies bf16 fast "
            "(AMX-BF16 or AVX512-BF16; the log says which) --bf16 autocast over bfloat16 frozen weights (LoRA; the "
            "adapter stays fp32) or over float32 weights (--use_peft False: trained weights stay fp32); float32 "
            "elsewhere or when --bf16/--fp16 is given; on GPU bfloat16 where supported, else float16. --torch_dtype "
            "float32 --bf16 False is the plain fp32 run (docs/efficiency.md).",
            "choices": TORCH_DTYPES,
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model/tokenizer code from the checkpoint to run. Off unless you trust the source."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base weights in 4-bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base weights in 8-bit (bitsandbytes)."})
    qlora: bool = field(
        default=False,
        metadata={"help": "QLoRA quantization: NF4 with double quantization. Requires --load_in_4bit."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel; default sdpa. flash_attention_2 needs a CUDA device and the flash-attn "
                          "package.", "choices": [None, "eager", "sdpa", "flash_attention_2", "flex_attention"]},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models."})
    rope_scaling: str | None = field(
        default=None,
        metadata={
            "help": "Stretch RoPE to train past the model's context: 'linear' (position interpolation) or 'dynamic' "
            "(NTK). Factor = --model_max_length / the model's max_position_embeddings unless --rope_scaling_factor. "
            "Saved in config.json, so inference uses it.",
            "choices": [None, "linear", "dynamic"],
        },
    )
    rope_scaling_factor: float | None = field(
        default=None, metadata={"help": "Explicit RoPE scaling factor (>= 1) for --rope_scaling."}
    )
    shift_attn: bool = field(
        default=False,
        metadata={"help": "LongLoRA shifted sparse attention (S2-Attn) while training Llama/Qwen2-family models: "
                  "attention within token groups, half the heads shifted by half a group; full attention at inference."},
    )
    shift_attn_ratio: float = field(
        default=0.25, metadata={"help": "S2-Attn group size as a fraction of the sequence length."}
    )
    cpu_paths: str = field(
        default="auto",
        metadata={"help": "Our CPU-tuned training paths (fused LoRA branch, fused supervised-token loss, attention per "
                  "packed sequence, DPO's shared-prompt rows): auto = on for CPU runs, off for CUDA runs (they have "
                  "never run on a GPU; CUDA runs take the standard PEFT/transformers/TRL paths); on / off to force.",
                  "choices": ["auto", "on", "off"]},
    )
    low_memory: bool = field(
        default=False,
        metadata={"help": "Memory mode: bfloat16 frozen base weights + bf16 autocast (unless --torch_dtype/--bf16 are "
                  "given; the LoRA adapter stays fp32; with --use_peft False the weights train and stay fp32) and "
                  "gradient checkpointing. About a third of the peak memory of the fp32 run with LoRA "
                  "(docs/efficiency.md)."},
    )

    def __post_init__(self) -> None:
        problems = []
        if self.rope_scaling not in (None, "linear", "dynamic"):
            problems.append(f"--rope_scaling {self.rope_scaling}: choose linear or dynamic.")
        if self.rope_scaling_factor is not None and self.rope_scaling is None:
            problems.append("--rope_scaling_factor needs --rope_scaling linear|dynamic.")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor < 1.0:
            problems.append(f"--rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}.")
        if not 0.0 < self.shift_attn_ratio <= 1.0:
            problems.append(f"--shift_attn_ratio must be in (0, 1], got {self.shift_attn_ratio}.")
        if self.shift_attn and self.attn_implementation not in (None, "sdpa", "eager"):
            problems.append("--shift_attn runs its own grouped attention on sdpa: drop --attn_implementation "
                            f"{self.attn_implementation}.")
        if self.load_in_4bit and self.load_in_8bit:
            problems.append("--load_in_4bit and --load_in_8bit are mutually exclusive: pick one.")
        if self.qlora and not self.load_in_4bit:
            problems.append("--qlora needs --load_in_4bit (QLoRA is NF4 4-bit quantization): add --load_in_4bit.")
        if problems:
            raise ConfigError(problems)

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class ModelSourceArguments:
    """Which finished model to load: a model directory, optionally a LoRA adapter on it, its tokenizer, and whether
    its own code may run. Declared once for every entry point that loads a finished model (inference.py,
    openai_api.py, web_demo.py, eval_benchmarks.py, merge_peft_adapter.py; tests/test_generation_arguments.py).

    Spellings the entry points had before they shared this class are aliases, so every one of them takes both:
    ``--base_model`` (inference.py's and merge_peft_adapter.py's) = ``--model_name_or_path`` (the training stages',
    the servers' and eval_benchmarks.py's); ``--tokenizer_name_or_path`` (eval_benchmarks.py's, the training stages')
    = ``--tokenizer_path`` (inference.py's and merge_peft_adapter.py's).
    """

    model_name_or_path: str = field(
        metadata={"help": "Model directory (or Hub id): a base, a merged model, or an adapter's base.",
                  "aliases": ["--base_model", "--base-model"]},
    )
    lora_model: str | None = field(
        default=None,
        metadata={"help": "A LoRA adapter directory trained on --model_name_or_path (merged in memory for generation, "
                          "kept unmerged for evaluation; merge_peft_adapter.py writes the merge)."},
    )
    tokenizer_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer; default: the adapter dir's if it has one, else --model_name_or_path's.",
                  "aliases": ["--tokenizer_name_or_path", "--tokenizer-name-or-path"]},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model/tokenizer code from the checkpoint to run. Off unless you trust it."}
    )

    def tokenizer_dir(self) -> str:
        """``--tokenizer_path``, else the tokenizer saved with the adapter (training saves it), else the model's."""
        if self.tokenizer_path:
            return self.tokenizer_path
        if self.lora_model and os.path.isfile(os.path.join(self.lora_model, "tokenizer_config.json")):
            return self.lora_model
        return self.model_name_or_path


@dataclass
class LoraArguments:
    """LoRA / full-training choice and the adapter's shape."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or all weights (False)."})
    target_modules: str = field(
        default="all",
        metadata={"help": "Comma-separated module names to adapt; 'all' = every linear layer except the output head."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (update scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Comma-separated modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head."},
    )
    peft_path: str | None = field(
        default=None, metadata={"help": "An existing adapter to continue training instead of a fresh one."}
    )
    fused_lora: bool = field(
        default=True,
        metadata={"help": "Run plain LoRA layers through the fused branch (medtrain/fused_lora.py): same math, less "
                          "memory and time; False = PEFT's own forward."},
    )

    def __post_init__(self) -> None:
        problems = []
        if self.lora_rank <= 0:
            problems.append(f"--lora_rank must be positive, got {self.lora_rank}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if problems:
            raise ConfigError(problems)

    @property
    def target_module_list(self) -> list[str] | str:
        if self.target_modules.strip().lower() == "all":
            return "all"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def modules_to_save_list(self) -> list[str] | None:
        if not self.modules_to_save:
            return None
        return [m.strip() for m in self.modules_to_save.split(",") if m.strip()]


@dataclass
class DataArguments:
    """Where the data is and how it becomes token ids."""

    train_file_dir: str | None = field(
        default=None, metadata={"help": "Directory searched recursively for training *.json/*.jsonl files."}
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Directory searched recursively for validation *.json/*.jsonl files."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hugging Face datasets name (needs the Hub)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name for --dataset_name."})
    max_train_samples: int = field(default=-1, metadata={"help": "Use at most this many training samples (-1 = all)."})
    max_eval_samples: int = field(default=-1, metadata={"help": "Use at most this many eval samples (-1 = all)."})
    validation_split_percentage: float = field(
        default=0.0,
        metadata={"help": "Percent of the training data held out for evaluation when there is no validation dir."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    model_max_length: int = field(
        default=1024, metadata={"help": "Maximum tokens per sample; longer conversations are cut at turn boundaries."}
    )
    template_name: str | None = field(
        default=None,
        metadata={
            "help": "Conversation template (see `python template.py --list`). Default: the tokenizer's own chat "
            "template if it has one, else vicuna."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Replace the template's default system text (not its wrapper)."}
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also train on system/user/template tokens (default: assistant turns only)."}
    )
    max_invalid_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Bad records a file may have and still be trained on: up to this fraction of its records are "
            "skipped with a report (log + output_dir/invalid_samples.txt); more stops the run. A file with fewer "
            "than 1/fraction records (100 at the default) may have none."
        },
    )
    strict_data: bool = field(
        default=False,
        metadata={"help": "Any bad record (including a conversation ending with an unanswered user turn) stops the run."},
    )
    skip_invalid_samples: bool = field(
        default=False,
        metadata={
            "help": "Skip every bad record and unreadable file whatever their number (no --max_invalid_fraction "
            "limit); they are counted and listed in output_dir/invalid_samples.txt."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-run preprocessing even when cached."})

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.validation_split_percentage < 100.0:
            problems.append(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")
        if self.model_max_length <= 0:
            problems.append(f"--model_max_length must be positive, got {self.model_max_length}.")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            problems.append(f"--max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction}.")
        if self.strict_data and self.skip_invalid_samples:
            problems.append("--strict_data and --skip_invalid_samples contradict each other: pass one.")
        if self.train_file_dir is None and self.dataset_name is None:
            problems.append("no training data: pass --train_file_dir DIR (or --dataset_name NAME).")
        if problems:
            raise ConfigError(problems)


@dataclass
class RunArguments:
    """What to do with an existing output directory, and with a diverging run."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir that is not being resumed (old files may be replaced)."},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "A NaN/inf loss or gradient norm: stop (exit 3, naming the step, the last finite loss and "
                          "the last good checkpoint) or skip the update (weights unchanged). See docs/reliability.md.",
                  "choices": ["stop", "skip"]},
    )


# Spellings that were removed in favour of one flag: the old one is an error naming the new one
# (docs/configuration.md, "One spelling per flag").
RENAMED_FLAGS = {
    "neft_alpha": "--neftune_noise_alpha",  # TRL's/transformers' spelling
    "flash_attn": "--attn_implementation flash_attention_2",  # transformers' spelling, one flag for every kernel
    "dataset_num_proc": "--preprocessing_num_workers",  # one flag in every stage (PT has no TRL config)
}


def _refuse_renamed(names: list[str], where: str) -> None:
    old = [name for name in names if name in RENAMED_FLAGS]
    if old:
        raise ConfigError([f"{where}--{name} was removed: use {RENAMED_FLAGS[name]} (same meaning)." for name in old])


def flag_spelling(args: list[str] | None, dataclass_type: type, name: str) -> str:
    """How the command line ``args`` (default ``sys.argv[1:]``) spelled the flag of ``dataclass_type``'s field
    ``name``: an alias the user typed (``--base_model`` for ``model_name_or_path``), else the canonical ``--name``.
    Error messages name it, so they speak of the flag the user actually used."""
    spec = next(f for f in fields(dataclass_type) if f.name == name)
    spellings = {f"--{name}", f"--{name.replace('_', '-')}", *_as_list(spec.metadata.get("aliases", []))}
    given = [a.split("=", 1)[0] for a in (sys.argv[1:] if args is None else args)]
    used = [a for a in given if a in spellings]
    return used[-1] if used else f"--{name}"


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_optional_bool(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return annotation.replace(" ", "") in ("bool|None", "None|bool", "Optional[bool]", "typing.Optional[bool]")
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {bool, type(None)}


def _file_args(path: str) -> dict[str, Any]:
    """Read a .json/.yaml file of arguments."""
    try:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".json"):
                data = json.load(fh)
            else:
                data = yaml.safe_load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the arguments file: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an arguments file must hold a mapping of flag names to values.")
    return data


def parse_args(dataclass_types: list[type], args: list[str] | None = None, stage_defaults: dict | None = None,
               required: tuple[str, ...] = ()):
    """Parse flags (or one .json/.yaml file plus overriding flags) into instances of ``dataclass_types``.

    Pure: flags/file -> dataclasses, nothing else (no environment variable, process group or allocator setting;
    :func:`medtrain.runtime.start_run` does those). Fields that several dataclasses declare (e.g.
    ``trust_remote_code`` in ModelArguments and TRL's configs) become one flag whose value every dataclass receives.
    On a machine without CUDA, ``use_cpu`` defaults to True (without it torchrun on CPU silently trains each rank
    alone) and bf16/gradient checkpointing default off. A removed spelling (see :data:`RENAMED_FLAGS`) is an error
    that names its replacement. ``required``: fields that are optional in a shared dataclass but this command
    cannot do without (merge_peft_adapter.py's --lora_model): argparse requires and `--help` marks them.
    """
    args = list(sys.argv[1:] if args is None else args)
    _refuse_renamed([a.split("=", 1)[0][2:] for a in args if a.startswith("--")], "")
    parser = HfArgumentParser(dataclass_types, conflict_handler="resolve")
    known = {f.name for dc in dataclass_types for f in fields(dc) if f.init}
    if set(required) - known:
        raise ValueError(f"required={sorted(set(required) - known)}: no such field")  # a programming error
    for action in parser._actions:
        if action.dest in required:
            action.required = True
    # TRL declares switches such as bf16 as `bool | None`, for which HfArgumentParser wants a value ("--bf16 True");
    # accept the bare flag ("--bf16") as for every other boolean switch.
    optional_bools = {f.name for dc in dataclass_types for f in fields(dc) if f.init and _is_optional_bool(f.type)}
    for action in parser._actions:
        if action.dest in optional_bools and action.option_strings and action.nargs is None:
            action.nargs, action.const = "?", True
    defaults: dict[str, Any] = {}
    if not _cuda_available():
        # TRL configs default bf16 and gradient checkpointing on (STACK-NOTES trap 2). None lets transformers resolve
        # the deprecated gradient_checkpointing alias to activation_checkpointing=False without a warning, while an
        # explicit --gradient_checkpointing still takes effect.
        defaults.update(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=None)
    defaults.update(report_to=["tensorboard"])
    if "model_max_length" in known:
        # The trainer's max_length is derived from --model_max_length by finalize(); None here tells an explicit
        # --max_length (checked there) from the config class's own default.
        defaults.update(max_length=None)
    defaults.update(stage_defaults or {})
    file_args: dict[str, Any] = {}
    if args and args[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(args[0]):
        file_args = _file_args(args[0])
        _refuse_renamed(list(file_args), f"{args[0]}: ")
        # a key may be a field's alias, as its flag may (`base_model:` = `model_name_or_path:` for generation)
        aliases = {alias.lstrip("-").replace("-", "_"): f.name for dc in dataclass_types for f in fields(dc)
                   if f.init for alias in _as_list(f.metadata.get("aliases", []))}
        file_args = {aliases.get(key, key): value for key, value in file_args.items()}
        unknown = sorted(set(file_args) - known)
        if unknown:
            raise ConfigError(
                f"{args[0]}: unknown argument(s) {', '.join(unknown)}. Remove them or check the spelling "
                f"(`python <script> --help` lists every flag)."
            )
        defaults.update(file_args)
        args = args[1:]
    given = given_precision_flags(args, file_args)
    if not _cuda_available() and "torch_dtype" in known and given and "torch_dtype" not in given:
        # --bf16/--fp16 without --torch_dtype: 'auto' would mean "choose the precision for this CPU"
        # (medtrain.hardware); the flags chose it, so the weights load as they always did on CPU: float32
        defaults["torch_dtype"] = "float32"
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    # Required fields given in a file are satisfied through set_defaults.
    for action in parser._actions:
        if action.required and action.dest in defaults:
            action.required = False
    namespace, unknown_flags = parser.parse_known_args(args=args)
    if unknown_flags:
        raise ConfigError(f"unknown flag(s) {' '.join(unknown_flags)}. Check the spelling: `--help` lists every flag.")
    # Unlike HfArgumentParser.parse_args_into_dataclasses, a field shared by several dataclasses goes to each.
    values = vars(namespace)
    if isinstance(values.get("deepspeed"), str) and values["deepspeed"]:
        read_deepspeed_config(values["deepspeed"])  # a missing/bad file is one clear error, not TrainingArguments'
    parsed = []
    for dataclass_type in dataclass_types:
        names = {f.name for f in fields(dataclass_type) if f.init}
        try:
            parsed.append(dataclass_type(**{k: v for k, v in values.items() if k in names}))
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            # transformers lists DeepSpeed values that contradict the flags one per line: keep them all
            keep = lines if "DeepSpeed config values" in lines[0] else lines[:1]
            raise ConfigError(" ".join(keep)) from None
    return parsed


def check_arguments(model_args: ModelArguments, lora_args: LoraArguments, training_args: Any) -> None:
    """Refuse flag combinations that cannot work, all problems at once, before anything is loaded or written.

    Launch, DeepSpeed and precision rules live in :func:`medtrain.distributed.distributed_problems`.
    """
    problems = []
    cuda = _cuda_available()
    if model_args.quantized and not lora_args.use_peft:
        problems.append("--load_in_4bit/--load_in_8bit train through LoRA only: drop --use_peft False or the quantization.")
    device_count = 0
    if cuda:
        import torch

        device_count = torch.cuda.device_count()
    problems.extend(distributed_problems(model_args, lora_args, training_args, cuda=cuda, device_count=device_count))
    if not cuda and not getattr(training_args, "use_cpu", True):
        problems.append("--use_cpu False on a machine without a GPU: leave use_cpu on (see docs/distributed.md).")
    if lora_args.peft_path and not lora_args.use_peft:
        problems.append("--peft_path continues a LoRA adapter: it needs --use_peft True.")
    if problems:
        raise ConfigError(problems)


def finalize(model_args: ModelArguments, lora_args: LoraArguments, data_args: Any, training_args: Any,
             checks: tuple[Callable[[], None], ...] = (), reference_ratio: bool = False) -> HardwarePlan:
    """Derive the trainer's fields from ours once, then check everything; every problem in one ConfigError.

    Runs once per stage, right after :func:`parse_args`; afterwards nothing reassigns a field of these objects
    (SFT's batch plan gives the trainer a copy: :meth:`medtrain.efficiency.BatchPlan.trainer_args`). Derived here:

    - length: the trainer's ``max_length`` is ``--model_max_length`` (one length for tokenisation, the model's RoPE
      factor and the trainer). ``--max_length`` given with another value is an error, in every stage.
    - worker processes: TRL's ``dataset_num_proc`` is ``--preprocessing_num_workers`` (``--dataset_num_proc`` itself
      is refused by :func:`parse_args`: one spelling).
    - NEFTune (``--neftune_noise_alpha``, TRL's spelling) and packing/padding-free are checked here and applied by
      the batch plan once the model is loaded (whether packing is exact depends on the model's attention).
    - precision and launch: :func:`check_arguments` (CPU defaults are set by :func:`parse_args`).
    - hardware (:func:`medtrain.hardware.finalize_hardware`, returned for the stage to log): the precision default,
      one rule for every stage (bf16 autocast on CPUs with fast bf16 matmul, bf16 frozen base weights under LoRA,
      else fp32), ``--low_memory``, and ``--cpu_paths`` (our CPU paths off on CUDA runs unless asked).

    ``checks`` are the stage's own cross-checks (each raises ConfigError); their problems join the list.
    ``reference_ratio``: the stage's loss rests on policy/reference log-prob differences (DPO, KTO, PPO, GRPO): fp32
    stays its CPU default (:func:`medtrain.hardware.choose_precision`).
    """
    problems: list[str] = []
    model_max_length = getattr(data_args, "model_max_length", None)
    derive_length = model_max_length is not None and hasattr(training_args, "max_length")
    if derive_length and training_args.max_length not in (None, model_max_length):
        problems.append(f"--max_length {training_args.max_length} differs from --model_max_length {model_max_length}: "
                        "the trainer's max_length is derived from --model_max_length; pass only --model_max_length.")
    alpha = getattr(training_args, "neftune_noise_alpha", None)
    if alpha is not None and alpha <= 0:
        problems.append(f"--neftune_noise_alpha must be positive, got {alpha}.")
    if getattr(training_args, "packing", False) and getattr(training_args, "packing_strategy", "bfd") != "bfd":
        problems.append(f"--packing_strategy {training_args.packing_strategy}: conversations are packed whole "
                        "(bfd); splitting them across rows is not supported.")
    # the stage's checks see the flags as given
    for check in (lambda: check_arguments(model_args, lora_args, training_args), *checks):
        try:
            check()
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    # derived once, here
    if derive_length:
        training_args.max_length = model_max_length
    if hasattr(training_args, "dataset_num_proc") and getattr(data_args, "preprocessing_num_workers", None):
        training_args.dataset_num_proc = data_args.preprocessing_num_workers
    return finalize_hardware(model_args, lora_args, training_args, cuda=cuda_run(training_args),
                             reference_ratio=reference_ratio)


def peek_arg(name: str, default: Any, args: list[str] | None = None) -> Any:
    """The value of one flag from the same sources as :func:`parse_args` (an arguments file, then flags), without
    parsing the rest: the first pass of a two-pass parse, for a stage whose dataclasses depend on one choice
    (``ppo_training.py``: ``--rl_algo`` picks the trainer's config class). The full parse validates the value."""
    args = list(sys.argv[1:] if args is None else args)
    value = default
    if args and args[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(args[0]):
        value = _file_args(args[0]).get(name, value)
        args = args[1:]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None)
    given = getattr(parser.parse_known_args(args)[0], name)
    return value if given is None else given
