"""Run set-up every stage shares: process-level settings, logging, seeding, the output directory guard, the
environment report. :func:`start_run` is the one place a stage changes its process (environment variables, malloc,
DeepSpeed communication); importing medtrain or parsing flags changes nothing. The end of a run (train, save,
evaluate, record results) is medtrain/outputs.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import datasets
import torch
import transformers
from transformers import set_seed

from .allocator import apply_allocator_settings
from .checkpoints import resolve_resume
from .distributed import (
    default_single_process_env,
    local_world_size_from_env,
    read_deepspeed_config,
    start_deepspeed_comm,
    summarize_deepspeed,
)
from .errors import ConfigError
from .hardware import cuda_run

logger = logging.getLogger("medtrain")


def setup_logging(training_args: Any) -> None:
    """Library logs at INFO on the main process, WARNING on the others."""

    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level, force=True)
    transformers.utils.logging.set_verbosity(logging.WARNING if level == logging.INFO else logging.ERROR)
    datasets.utils.logging.set_verbosity(logging.WARNING)
    datasets.disable_progress_bars() if level != logging.INFO else None


def prepare_output_dir(training_args: Any, overwrite_output_dir: bool = False) -> str | None:
    """Refuse to write into a non-empty ``output_dir`` unless resuming or ``--overwrite_output_dir``.

    Returns the checkpoint to resume from (``--resume_from_checkpoint`` resolved, ``auto`` included). Runs before
    anything is written so a refused or failed start leaves an existing directory untouched.
    """
    output_dir = training_args.output_dir
    resume = resolve_resume(training_args.resume_from_checkpoint, output_dir)
    non_empty = os.path.isdir(output_dir) and any(
        name not in ("logs",) for name in os.listdir(output_dir)
    )
    auto = str(training_args.resume_from_checkpoint).lower() in ("auto", "latest", "true")
    if non_empty and resume is None and not overwrite_output_dir and not (auto and training_args.process_index != 0):
        raise ConfigError(
            f"output_dir {output_dir} exists and is not empty. Resume with --resume_from_checkpoint auto, "
            "choose another --output_dir, or pass --overwrite_output_dir to write into it anyway."
        )
    return resume


def describe_environment(training_args: Any) -> dict:
    """What this launch uses: ranks and nodes, backend, device, precision, DeepSpeed stage, global batch."""

    world_size = training_args.world_size
    deepspeed = training_args.deepspeed
    zero_stage = summarize_deepspeed(read_deepspeed_config(deepspeed)).stage if deepspeed else None
    info = {
        "world_size": world_size,
        "process_index": training_args.process_index,
        "local_rank": training_args.local_process_index,
        # torchrun sets GROUP_RANK to the node rank; nodes = world / processes per node
        "nnodes": max(1, world_size // max(1, local_world_size_from_env())),
        "node_rank": int(os.environ.get("GROUP_RANK", "0") or 0),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '')}" if "MASTER_ADDR" in os.environ else None,
        "device": str(training_args.device),
        "backend": (torch.distributed.get_backend() if torch.distributed.is_available() and torch.distributed.is_initialized() else None),
        "use_cpu": training_args.use_cpu,
        "bf16": training_args.bf16,
        "fp16": training_args.fp16,
        "deepspeed": deepspeed,
        "zero_stage": zero_stage,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "global_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * world_size,
    }
    logger.info("environment: %s", json.dumps(info))
    return info


def apply_process_settings(training_args: Any) -> dict:
    """Environment variables, malloc, and DeepSpeed's communication layer, in the order a stage needs them.

    1. ``--deepspeed`` outside a launcher: the environment of a one-process torchrun (rank 0 of 1, a free port);
       without it DeepSpeed looks for MPI ("No module named 'mpi4py'").
    2. CPU allocator settings (medtrain/allocator.py), before the first tensor of the run; CPU runs only (they were
       never measured in a process driving a GPU; see medtrain/hardware.py).
    3. tensorboard events to ``output_dir/logs`` (transformers 5 removed TrainingArguments.logging_dir).
    4. DeepSpeed's comm layer on gloo (CPU), before any model is loaded: ZeRO-3 partitions weights while loading.
    """
    launched_alone = default_single_process_env() if training_args.deepspeed else False
    if cuda_run(training_args):  # never measured with a GPU in the process: CUDA runs keep the defaults
        allocator = {"huge_pages": False, "keep_freed_memory": False}
    else:
        allocator = apply_allocator_settings()
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(training_args.output_dir, "logs")
    deepspeed_comm = start_deepspeed_comm(training_args)
    return dict(allocator, single_process_env=launched_alone, deepspeed_comm=deepspeed_comm)


def start_run(training_args: Any, overwrite_output_dir: bool = False) -> str | None:
    """Process settings, logging, seeding, the output-dir guard and the environment report, in the order every
    stage needs; called after :func:`medtrain.arguments.finalize` and before any tokenizer, data or model.

    Seeding happens here, before any model is built, because LoRA and reward heads are randomly initialised
    before Trainer seeds itself; without it two runs (or a run and its resume) start from different adapters.
    Returns the checkpoint to resume from, if any.
    """
    settings = apply_process_settings(training_args)
    setup_logging(training_args)
    logger.info("process settings: %s", json.dumps(settings))
    set_seed(training_args.seed)
    resume = prepare_output_dir(training_args, overwrite_output_dir)
    describe_environment(training_args)
    return resume
