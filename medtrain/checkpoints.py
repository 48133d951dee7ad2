"""Checkpoints that are only used when completely written, and ``--resume_from_checkpoint auto``.

Trainer writes ``checkpoint-N/`` file by file; a job killed mid-save leaves a directory that looks like a
checkpoint but is not one. :class:`CompleteCheckpointCallback` writes a ``COMPLETE`` marker after Trainer has
finished a save; only marked checkpoints are resumed from.
"""

from __future__ import annotations

import logging
import os
import re

from transformers import TrainerCallback

from .errors import ConfigError

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointCallback(TrainerCallback):
    """Mark ``checkpoint-N`` complete once Trainer's save (model, optimizer, scheduler, RNG, state) returned."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                with open(os.path.join(path, MARKER), "w", encoding="utf-8") as fh:
                    fh.write(f"global_step={state.global_step}\n")
        return control


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(os.path.join(path, "trainer_state.json"))


def list_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` directories in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint; incomplete newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        logger.warning("skipping %s: incompletely written (no %s marker); the job likely died while saving", path, MARKER)
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """Turn ``--resume_from_checkpoint`` (a path, ``auto``/``latest``, or True) into a checkpoint path or None."""
    if resume_from_checkpoint in (None, "", "False", "false", False):
        return None
    if str(resume_from_checkpoint).lower() in ("auto", "latest", "true"):
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            logger.warning("--resume_from_checkpoint auto: no complete checkpoint in %s; starting fresh", output_dir)
        else:
            logger.info("resuming from %s", path)
        return path
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise ConfigError(f"--resume_from_checkpoint {path}: no such checkpoint directory.")
    if not is_complete(path):
        raise ConfigError(
            f"--resume_from_checkpoint {path}: the checkpoint is incomplete (no {MARKER} marker; the job died while "
            "saving). Use an earlier checkpoint or --resume_from_checkpoint auto."
        )
    return path
