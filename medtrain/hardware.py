"""What the run's hardware decides: the default precision, and which training paths a device gets.

Precision (:func:`choose_precision`), one rule for every training stage. On a CPU with bf16 matmul instructions
(AMX-BF16 or AVX512-BF16) a run that names no precision trains in bf16, except in the stages whose loss rests on
policy/reference log-prob differences (DPO, KTO, PPO, GRPO: ``reference_ratio``, fp32, see :func:`choose_precision`):

- LoRA/QLoRA (the default): the frozen base weights load in bf16 and the step runs under bf16 autocast. What trains
  (the adapter, ``modules_to_save`` such as a reward score head or resized embeddings) stays fp32, and so do its
  gradients and the optimizer state (:func:`medtrain.modeling.apply_lora`); the losses' softmax/log-sum-exp is fp32.
- Full fine-tuning (``--use_peft False``): the weights are what trains, so they load in fp32 and only the step runs
  under bf16 autocast (AdamW updates below about 2**-8 of a weight, bf16's rounding unit, would vanish on bf16
  weights, and the optimizer state would be bf16 too).

Measured whole SFT steps (SmolLM2-135M, LoRA, 4 packed rows of 512 tokens, bench/bench_precision.py): ~2x fp32 with
autocast on a 2-core AMX Xeon; 1.49x on an idle 2-core AMD EPYC with AVX512-BF16 and no AMX (7.33 s vs 10.94 s median
of 3, 2026-12-07, first-step loss +0.08%). Without either instruction set torch emulates bf16, so it trains in fp32,
as before. ``MEDTRAIN_CPU_BF16=1``/``0`` replaces the detection. Any precision flag (``--torch_dtype``, ``--bf16``,
``--fp16``) or a DeepSpeed config turns the automatic choice off and is used as given: ``--torch_dtype float32 --bf16
False`` is the plain fp32 run. GPU runs keep the usual transformers/TRL behaviour (``--torch_dtype auto`` = bf16
where the GPU supports it).

Paths (:func:`cpu_paths_enabled`). The fused LoRA branch, the fused supervised-token loss, per-sequence attention
for packed rows, DPO's shared-prompt rows and the allocator settings were written and measured on CPUs only; no CUDA
run has exercised them. Until one has, CUDA runs take the standard PEFT/transformers/TRL paths (packed rows with sdpa's block mask, or
FlashAttention-2 padding-free rows); ``--cpu_paths on`` turns ours on for a GPU run too, ``off`` turns them off on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError

logger = logging.getLogger(__name__)

BF16_ENV = "MEDTRAIN_CPU_BF16"  # "1"/"0": skip the detection and treat bf16 matmul as fast/slow (tests set 0)
CPU_PATHS = ("auto", "on", "off")


# --- CPU bf16 capability ---------------------------------------------------------------------------------------------


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_fast(flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether bf16 training is fast on this CPU, and why: with AMX-BF16 or AVX512-BF16 it is (whole steps measured
    ~2x and 1.49x fp32, see the module docstring); without bf16 instructions torch emulates bf16 (slow).
    ``MEDTRAIN_CPU_BF16=1``/``0`` in the environment replaces the detection (e.g. the test suite pins fp32)."""
    override = os.environ.get(BF16_ENV, "").strip().lower()
    if override in ("0", "1"):
        return override == "1", f"{BF16_ENV}={override}"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return True, "the CPU has AMX-BF16"
    if "avx512_bf16" in flags:
        return True, "the CPU has AVX512-BF16 (no AMX): a whole SFT step measured 1.49x fp32 (docs/efficiency.md)"
    return False, "the CPU has no bf16 matmul instructions (AMX-BF16/AVX512-BF16): bf16 would be emulated"


# --- the precision default --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    torch_dtype: str  # for ModelArguments.torch_dtype
    bf16: bool  # autocast (TrainingArguments.bf16)
    automatic: bool  # chosen here (True) or as the flags gave it (False)
    reason: str

    def describe(self) -> str:
        mode = {("bfloat16", True): "bf16 (bf16 frozen weights + bf16 autocast; fp32 adapter and optimizer state)",
                ("float32", True): "bf16 autocast over fp32 weights (trained weights and optimizer state fp32)",
                ("float32", False): "fp32"}.get((self.torch_dtype, self.bf16),
                                                f"--torch_dtype {self.torch_dtype} --bf16 {self.bf16}")
        how = "default" if self.automatic else "as given"
        return f"precision {mode} ({how}: {self.reason})"


REFERENCE_RATIO_REASON = (
    "but this stage's loss rests on small log-prob differences between the policy and a reference or old policy, "
    "and in bf16 the rounding outweighed the training signal (DPO bench: 10 steps' reward margin -0.046 in bf16 vs "
    "+0.012 in fp32, docs/efficiency.md); --torch_dtype bfloat16 --bf16 True opts in")


def choose_precision(torch_dtype: str, bf16: bool, fp16: bool, flags_given: bool, cuda: bool, full_weights: bool,
                     fast: Callable[[], tuple[bool, str]] = cpu_bf16_fast,
                     reference_ratio: bool = False) -> Precision:
    """The run's precision. ``flags_given``: the user passed --torch_dtype, --bf16 or --fp16 (flag or file), or a
    DeepSpeed config. ``full_weights``: the base weights themselves train (``--use_peft False``).
    ``reference_ratio``: the stage's loss is built on log-prob differences between the policy and a reference or
    old policy (DPO, KTO, PPO/RLOO/GRPO), which bf16 rounding swamps: fp32 stays its CPU default.

    Automatic only for a CPU run without precision flags: where :func:`cpu_bf16_fast` says bf16 matmul is fast, bf16
    autocast over bf16 frozen weights (LoRA) or over fp32 weights (full fine-tuning: trained weights stay fp32);
    fp32 elsewhere. GPU runs and explicit flags are returned unchanged.
    """
    if cuda:
        return Precision(torch_dtype, bf16, False, "GPU run: transformers/TRL defaults")
    if flags_given or fp16:
        return Precision(torch_dtype, bf16, False, "precision flags given")
    ok, why = fast()
    if not ok:
        return Precision("float32", False, True, why)
    if reference_ratio:
        return Precision("float32", False, True, f"{why}, {REFERENCE_RATIO_REASON}")
    if full_weights:
        return Precision("float32", True, True, why + "; full fine-tuning: the trained weights stay fp32; "
                         "--torch_dtype float32 --bf16 False for fp32")
    return Precision("bfloat16", True, True, why + "; --torch_dtype float32 --bf16 False for fp32")


PRECISION_FLAGS = ("torch_dtype", "bf16", "fp16")


def given_precision_flags(args: list[str], file_args: dict[str, Any] | None = None) -> set[str]:
    """The precision flags (:data:`PRECISION_FLAGS`) named on the command line ``args`` or in an arguments file."""
    names = {a[2:].split("=", 1)[0].replace("-", "_") for a in args if a.startswith("--")}
    return (names | set(file_args or {})) & set(PRECISION_FLAGS)


# --- training paths per device ------------------------------------------------------------------------------------


def cpu_paths_enabled(setting: str, cuda: bool) -> bool:
    """Whether our CPU training paths (fused LoRA branch, fused loss, per-sequence attention, allocator settings) run:
    ``auto`` = on for CPU runs, off for CUDA runs (never checked on a GPU); ``on``/``off`` as said."""
    if setting not in CPU_PATHS:
        raise ConfigError(f"--cpu_paths {setting!r}: choose one of {', '.join(CPU_PATHS)}.")
    if setting == "auto":
        return not cuda
    return setting == "on"


def describe_cpu_paths(enabled: bool, cuda: bool) -> str:
    if enabled:
        return ("our CPU paths on (fused LoRA branch, fused loss, per-sequence attention, DPO shared-prompt rows, "
                "allocator settings)"
                + ("; NOT yet validated on a GPU" if cuda else ""))
    return ("standard PEFT/transformers/TRL paths" + (" (CUDA run: ours never ran on a GPU; --cpu_paths on to try "
                                                      "them)" if cuda else " (--cpu_paths off)"))


# --- applied once per run ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwarePlan:
    precision: Precision
    cpu_paths: bool
    cuda: bool
    low_memory: bool

    def describe(self) -> str:
        memory = "; memory mode (--low_memory): gradient checkpointing on" if self.low_memory else ""
        return f"{self.precision.describe()}; {describe_cpu_paths(self.cpu_paths, self.cuda)}{memory}"


def cuda_run(training_args: Any) -> bool:
    """Whether this run trains on a CUDA device (a GPU is present and ``--use_cpu`` is off)."""
    import torch

    return bool(torch.cuda.is_available()) and not getattr(training_args, "use_cpu", False)


def finalize_hardware(model_args: Any, lora_args: Any, training_args: Any, cuda: bool,
                      fast: Callable[[], tuple[bool, str]] = cpu_bf16_fast,
                      reference_ratio: bool = False) -> HardwarePlan:
    """Derive the precision, the memory mode and the training paths into the parsed arguments, once per run.

    Sets ``model_args.torch_dtype`` (never 'auto' afterwards on CPU), ``training_args.bf16`` together with the
    ``mixed_precision`` TrainingArguments derived from it, ``model_args.cpu_paths`` ('on'/'off'),
    ``lora_args.fused_lora`` (off where our paths are off) and, for ``--low_memory``, gradient checkpointing.
    Every stage uses the same rule (:func:`choose_precision`; ``reference_ratio``: see there). A DeepSpeed config
    decides precision itself: it counts as given.
    """
    given = model_args.torch_dtype != "auto" or bool(getattr(training_args, "deepspeed", None))
    bf16, fp16 = bool(getattr(training_args, "bf16", False)), bool(getattr(training_args, "fp16", False))
    full_weights = lora_args is None or not lora_args.use_peft
    if model_args.low_memory and not given and not cuda:
        # bf16 frozen weights are the memory saving; weights that train stay fp32 (see choose_precision)
        precision = Precision("float32" if full_weights else "bfloat16", True, True, "--low_memory")
    else:
        precision = choose_precision(model_args.torch_dtype, bf16, fp16, given, cuda, full_weights, fast,
                                     reference_ratio)
    model_args.torch_dtype = precision.torch_dtype
    if precision.bf16 != bf16:
        training_args.bf16 = precision.bf16
        # TrainingArguments.__post_init__ derived mixed_precision from bf16; the Trainer's accelerator reads it
        training_args.mixed_precision = "bf16" if precision.bf16 else "no"
    if model_args.low_memory:
        for name in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(training_args, name):
                setattr(training_args, name, True)
    paths = cpu_paths_enabled(model_args.cpu_paths, cuda)
    model_args.cpu_paths = "on" if paths else "off"
    if not paths and lora_args is not None:
        lora_args.fused_lora = False
    return HardwarePlan(precision, paths, cuda, bool(model_args.low_memory))
