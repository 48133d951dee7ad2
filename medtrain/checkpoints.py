"""Checkpoints that are only used when completely and correctly written, and ``--resume_from_checkpoint auto``.

Trainer writes ``checkpoint-N/`` file by file; a job killed mid-save leaves a directory that looks like a
checkpoint but is not one, and a checkpoint copied half-way (or truncated by a full disk, or altered later) looks
complete too. :class:`CompleteCheckpointCallback` writes a ``COMPLETE`` marker once every rank has finished a save.
The marker is a manifest: JSON with the step and, per file, its size and sha256. Only marked checkpoints whose files
still match their manifest are resumed from; ``auto`` reports and skips the others. Markers written before the
manifest existed (one line ``global_step=N``) are still accepted, with a note that they cannot be verified.

Cost of the hashes (measured, see docs/reliability.md): sha256 reads every byte once, ~0.5-2 GB/s per core; files
are hashed in parallel threads (hashlib releases the GIL). A LoRA checkpoint (MBs) costs milliseconds; a 7B
full-training checkpoint (~85 GB with Adam state) about a minute, on rank 0 while the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

from transformers import TrainerCallback

from .errors import ConfigError

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
MANIFEST_FORMAT = 1
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 8 << 20  # 8 MiB reads: large enough that hashlib runs without the GIL most of the time


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(path: str) -> list[str]:
    """Every regular file under ``path`` (relative, sorted), the marker and its temporary file excluded."""
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel not in (MARKER, MARKER + ".tmp"):
                found.append(rel)
    return sorted(found)


def build_manifest(path: str, workers: int | None = None) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file in checkpoint ``path``."""
    names = _files(path)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(lambda rel: sha256_file(os.path.join(path, rel)), names))
    return {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": digest}
            for rel, digest in zip(names, digests)}


def write_marker(path: str, global_step: int) -> dict:
    """Write ``path/COMPLETE`` with the manifest of the files now in ``path``; atomic (temporary file, fsync,
    rename), so a crash never leaves a half-written marker. Returns the marker's content."""
    record = {"format": MANIFEST_FORMAT, "global_step": int(global_step), "files": build_manifest(path)}
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(path, MARKER))
    try:  # make the rename itself durable
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return record


def read_marker(path: str) -> dict | None:
    """The marker's manifest, or None for an old-style marker (``global_step=N``, no file list)."""
    with open(os.path.join(path, MARKER), encoding="utf-8") as fh:
        text = fh.read()
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def verify_checkpoint(path: str) -> list[str]:
    """What is wrong with checkpoint ``path``: missing marker, or files missing/truncated/altered since the marker
    was written. Empty when it is complete and intact (an old-style marker is trusted, with a logged note)."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        return [f"no {MARKER} marker (the job likely died while saving)"]
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return ["no trainer_state.json"]
    try:
        manifest = read_marker(path)
    except OSError as err:
        return [f"unreadable {MARKER} marker: {err}"]
    if manifest is None:
        logger.info("%s: old-style %s marker without a file manifest; its files cannot be verified", path, MARKER)
        return []
    problems = []
    for rel, expected in sorted(manifest["files"].items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            problems.append(f"{rel} is missing")
            continue
        size = os.path.getsize(file)
        if size != expected.get("size"):
            problems.append(f"{rel} has {size} bytes, the marker recorded {expected.get('size')} (truncated or replaced)")
        elif sha256_file(file) != expected.get("sha256"):
            problems.append(f"{rel} was altered after the checkpoint was written (sha256 differs)")
    return problems


class CompleteCheckpointCallback(TrainerCallback):
    """Mark ``checkpoint-N`` complete once Trainer's save (model, optimizer, scheduler, RNG, state) returned on
    every rank (each rank writes its own RNG state and, under DeepSpeed, its shards: rank 0 waits for them)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.save_total_limit == 1 and state.is_world_process_zero:
            logger.warning("--save_total_limit 1: Trainer deletes the previous checkpoint before the new one is marked "
                           "complete, so a crash while marking it leaves no complete checkpoint; 2 avoids that")
        return control

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                write_marker(path, state.global_step)
        return control


def is_complete(path: str) -> bool:
    """Marked complete and its files match the marker's manifest."""
    return not verify_checkpoint(path)


def list_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` directories in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """Newest complete and intact checkpoint; newer incomplete or damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        logger.warning("skipping %s: %s", path, "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
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
    problems = verify_checkpoint(path)
    if problems and not os.path.isfile(os.path.join(path, MARKER)):
        raise ConfigError(
            f"--resume_from_checkpoint {path}: the checkpoint is incomplete (no {MARKER} marker; the job died while "
            "saving). Use an earlier checkpoint or --resume_from_checkpoint auto."
        )
    if problems:
        raise ConfigError(
            f"--resume_from_checkpoint {path}: the checkpoint is damaged: {'; '.join(problems[:3])}. Use an earlier "
            "checkpoint or --resume_from_checkpoint auto (which skips damaged ones)."
        )
    return path
