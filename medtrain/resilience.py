"""Surviving the faults of real clusters: preemption signals, non-finite losses, failed writes.

Every stage gets the same protection from one call, :func:`resilience_callbacks`, passed to its Trainer::

    trainer = SomeTrainer(..., callbacks=[*resilience_callbacks(run_args), *other_callbacks])

(``run_args`` is the stage's :class:`medtrain.arguments.RunArguments`, which carries ``--on_nonfinite``). A stage
with its own loop (PPO, ``medtrain/ppo/trainer.py``) uses :data:`STOP` and :func:`check_gradients` directly.

Exit statuses (``medtrain.entrypoint.run_main`` maps the exceptions below to them):

* ``75`` (EX_TEMPFAIL, "temporary failure, retry"): preempted by SIGTERM/SIGINT. The current optimizer step was
  finished and a complete checkpoint written; rerun the same command with ``--resume_from_checkpoint auto``. Not 143
  (128 + SIGTERM): a shell reports 143 for a process *killed* by SIGTERM too, so a scheduler could not tell "saved,
  requeue me" from "died without saving". Kubernetes ``podFailurePolicy`` / wrapper scripts can match 75.
* ``3``: training diverged (non-finite loss or gradient norm) with ``--on_nonfinite stop``; resuming as-is would
  diverge again (lower the learning rate, check the data, use fp32/bf16 instead of fp16).
* ``74`` (EX_IOERR): a checkpoint or model could not be written (disk full, quota, read-only, I/O error).
* ``2``: bad input or flags (medtrain/errors.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Iterator

from transformers import TrainerCallback

from .checkpoints import MARKER, CompleteCheckpointCallback, latest_complete_checkpoint, list_checkpoints, read_marker
from .errors import RunStopped

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 74
NONFINITE_MODES = ["stop", "skip"]


class Preempted(RunStopped):
    exit_status = EXIT_PREEMPTED
    label = "preempted"


class Diverged(RunStopped):
    exit_status = EXIT_DIVERGED


class WriteFailed(RunStopped):
    exit_status = EXIT_WRITE_FAILED


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT


class StopRequest:
    """A stop asked for by SIGTERM/SIGINT, acted on at the next optimizer-step boundary.

    The first signal only sets a flag; the training loop finishes its step, every rank agrees (:meth:`agreed`, one
    all_reduce), a checkpoint is written and the process exits 75. A second signal exits at once (the default action
    of that signal): nothing half-written is marked complete, so the last complete checkpoint stays the one resumed.
    A repeat of the same signal within ``dedup_s`` seconds counts as the same request: torchrun forwards the signal it
    receives to its workers, and Slurm or a terminal's Ctrl-C signal every process of the job, so a worker often gets
    the same stop twice within milliseconds.
    """

    def __init__(self, dedup_s: float = 2.0):
        self.dedup_s = dedup_s
        self.signum: int | None = None
        self._at = 0.0
        self._installed: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGINT for a training loop starting now (main thread only; elsewhere a no-op).
        Idempotent. A stop requested in an earlier loop of this process (a notebook, a test) is forgotten: before
        this call the signals had their default action, so nothing of this run can have been asked to stop."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self.reset()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._installed[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._installed.items():
            signal.signal(sig, previous)
        self._installed = {}

    def reset(self) -> None:
        self.signum, self._at = None, 0.0

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
            print(f"received {name}: finishing the current optimizer step, then writing a checkpoint and exiting "
                  f"(status {EXIT_PREEMPTED}); send it again to exit at once without saving", file=sys.stderr,
                  flush=True)
            return
        if signum == self.signum and now - self._at < self.dedup_s:
            return  # the launcher forwarding the same stop
        print(f"received {name} again: exiting now without saving; the last complete checkpoint is untouched",
              file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, device: Any = None) -> bool:
        """Whether any rank was asked to stop: an all_reduce(MAX) of the flag when a process group is open, so every
        rank leaves the loop after the same step and none waits in a collective for one that left (one 4-byte
        all_reduce per optimizer step: see docs/reliability.md for its cost)."""
        flag = 1 if self.requested else 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            tensor = torch.tensor([flag], dtype=torch.int32, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = int(tensor.item())
        return bool(flag)

    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"


STOP = StopRequest()


def preempted_message(signame: str, step: int, checkpoint: str) -> str:
    return (f"stopped by {signame} after optimizer step {step}; complete checkpoint {checkpoint}. Resume with the same "
            f"command plus --resume_from_checkpoint auto (exit status {EXIT_PREEMPTED}).")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGINT -> finish the step, save a checkpoint (the COMPLETE marker is written by the callback before
    this one), raise :class:`Preempted` on every rank once rank 0 has marked it."""

    def __init__(self, stop: StopRequest = STOP):
        self.stop = stop
        self.stopping = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.install()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agreed(args.device):
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            _barrier()  # rank 0 has written the marker: no rank exits (and makes torchrun kill rank 0) before that
            end_write()
            self.stop.uninstall()
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            raise Preempted(preempted_message(self.stop.signal_name(), state.global_step, path))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # Training is over: give SIGTERM/SIGINT back (a signal during the final save now ends the process; the
        # checkpoints stay intact), and leave a host process (a notebook, pytest) its own Ctrl-C.
        self.stop.uninstall()
        return control


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def gradients_finite(parameters: Any) -> bool | None:
    """Whether every gradient of ``parameters`` is finite (None: no gradient to look at, e.g. ZeRO keeps them in
    its own buffers). One fused norm over the gradients, the same work as gradient clipping: a NaN or inf anywhere
    makes the total norm non-finite."""
    import torch

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)))


def drop_gradients(parameters: Any) -> None:
    """Set every gradient to None: torch optimizers then leave those parameters *and their state* (Adam moments,
    step count) untouched, so the step is a true no-op (zero gradients would still move weights through momentum
    and weight decay)."""
    for p in parameters:
        p.grad = None


def _optimizer_params(optimizer: Any) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def diverged_message(step: int, what: str, last_loss: tuple[int, float] | None, output_dir: str) -> str:
    last = f"last finite logged loss {last_loss[1]:.6g} at step {last_loss[0]}" if last_loss else "no finite loss logged yet"
    checkpoint = latest_complete_checkpoint(output_dir) if output_dir else None
    good = f"last good checkpoint {checkpoint}" if checkpoint else "no complete checkpoint yet"
    return (f"training diverged at optimizer step {step}: {what}; {last}; {good}. Nothing was updated with it. Lower "
            "the learning rate, check the data, or use fp32/bf16 (not fp16); resume from that checkpoint with "
            "--resume_from_checkpoint, or pass --on_nonfinite skip to skip such steps (exit status "
            f"{EXIT_DIVERGED}).")


class NonFiniteCallback(TrainerCallback):
    """``--on_nonfinite stop``: a non-finite gradient (what a NaN/inf loss produces) stops training *before* the
    optimizer step, with the step, the last finite loss and the last good checkpoint. ``skip``: the update is
    dropped (weights and optimizer state unchanged, the LR schedule still advances) and counted in a warning.

    Gradients are checked in ``on_pre_optimizer_step`` (after clipping, before the update); under DDP they are
    already averaged, so every rank takes the same decision without a collective. Where the gradients are not
    visible (DeepSpeed ZeRO keeps them in its buffers) the logged ``grad_norm``/``loss`` is checked instead, at the
    logging steps. With ``--fp16`` the loss scaler handles overflowing steps itself (it skips them and lowers the
    scale), so only the logged values are checked.
    """

    def __init__(self, mode: str = "stop"):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        self.mode = mode
        self.skipped = 0
        self.blind = False  # gradients not visible here (DeepSpeed ZeRO, fp16 scaler): logged values are checked
        self.last_loss: tuple[int, float] | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or getattr(args, "fp16", False):
            self.blind = True
            return control
        params = _optimizer_params(optimizer)
        finite = gradients_finite(params)
        self.blind = finite is None
        if finite is not False:
            return control
        step = state.global_step + 1
        if self.mode == "stop":
            STOP.uninstall()
            raise Diverged(diverged_message(step, "non-finite loss or gradient norm (NaN/inf gradients)",
                                            self.last_loss, args.output_dir))
        drop_gradients(params)
        self.skipped += 1
        logger.warning("step %d: non-finite loss or gradient norm; skipped the update (--on_nonfinite skip; %d "
                       "step(s) skipped so far)", step, self.skipped)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self.last_loss = (state.global_step, float(loss))
        # fp16: an inf gradient norm is the loss scaler's routine overflow step (it skips it), not divergence
        keys = ("loss",) if getattr(args, "fp16", False) else ("loss", "grad_norm")
        bad = [k for k in keys if isinstance(logs.get(k), float) and not math.isfinite(logs[k])]
        if bad and (self.mode == "stop" or self.blind) and not self.skipped:
            # only reached where gradients were not visible above (DeepSpeed) or with fp16's loss scaler: a step
            # cannot be skipped there, so even --on_nonfinite skip stops
            STOP.uninstall()
            raise Diverged(diverged_message(state.global_step, f"logged {' and '.join(bad)} non-finite "
                                            f"({loss=}, {grad_norm=})", self.last_loss, args.output_dir))
        return control


# ----------------------------------------------------------------------------------------------------------------
# Failed writes: disk full, quota, read-only filesystem, I/O errors

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
_WRITE_TEXTS = ("no space left", "disk quota", "storagefull", "file write failed", "read-only file system",
                "input/output error", "errno 28", "os error 28")
_writing: list[tuple[str, str, int | None]] = []  # (path, what, bytes it needs) of the writes in progress


@contextlib.contextmanager
def writing(path: str, what: str, needs: int | None = None) -> Iterator[None]:
    """Mark a write in progress, so a failure inside is reported naming ``path``, the free space and ``needs``."""
    _writing.append((path, what, needs))
    try:
        yield
    except Exception as err:
        stopped = as_run_stopped(err)
        if stopped is None or isinstance(err, RunStopped):
            raise
        raise stopped from err
    finally:
        if (path, what, needs) in _writing:
            _writing.remove((path, what, needs))


def begin_write(path: str, what: str, needs: int | None = None) -> None:
    end_write()
    _writing.append((path, what, needs))


def end_write() -> None:
    _writing.clear()


def tree_size(path: str, files: list[str] | None = None) -> int:
    """Bytes of the regular files under ``path`` (or of the named ``files`` in it)."""
    if files is not None:
        return sum(os.path.getsize(os.path.join(path, f)) for f in files if os.path.isfile(os.path.join(path, f)))
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def newest_marked_checkpoint(output_dir: str) -> str | None:
    """Newest checkpoint with a COMPLETE marker, *not* verified: cheap enough to call at every save (estimating what
    the next checkpoint needs must not re-hash the previous one)."""
    for path in reversed(list_checkpoints(output_dir)):
        if os.path.isfile(os.path.join(path, MARKER)):
            return path
    return None


def checkpoint_size(path: str | None) -> int | None:
    if not path:
        return None
    try:
        manifest = read_marker(path)
    except OSError:
        manifest = None
    if manifest:
        return sum(int(f.get("size", 0)) for f in manifest["files"].values())
    return tree_size(path)


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_space(path: str) -> int | None:
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or "/").free
    except OSError:
        return None


def is_write_failure(err: BaseException) -> bool:
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return True
        if e is not None and any(text in str(e).lower() for text in _WRITE_TEXTS):
            return True
    return False


def as_run_stopped(err: BaseException) -> RunStopped | None:
    """A :class:`WriteFailed` naming the path being written, the free space and what it needs, when ``err`` is a
    failed write (disk full, quota, read-only, I/O error); None otherwise. A half-written checkpoint directory (no
    COMPLETE marker) is removed, giving its space back; it would never be resumed from anyway."""
    if isinstance(err, RunStopped):
        return err
    if not is_write_failure(err):
        return None
    path, what, needs = _writing[-1] if _writing else (getattr(err, "filename", None) or "?", "output", None)
    free = free_space(path) if path != "?" else None
    removed = ""
    if what == "checkpoint" and os.path.isdir(path) and not os.path.exists(os.path.join(path, MARKER)):
        shutil.rmtree(path, ignore_errors=True)
        removed = " The half-written checkpoint was removed (it had no COMPLETE marker)."
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    parts = [f"could not write the {what} {path}: {reason}.",
             f"Free space there: {human(free)}; it needs about {human(needs)}." if needs
             else f"Free space there: {human(free)}.", removed.strip()]
    output_dir = os.path.dirname(path) if what == "checkpoint" else path
    last = latest_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last:
        parts.append(f"The last complete checkpoint {last} is intact: free space, then resume with "
                     "--resume_from_checkpoint auto.")
    elif what == "checkpoint" or what == "final model":
        parts.append("No complete checkpoint exists yet.")
    parts.append(f"(exit status {EXIT_WRITE_FAILED})")
    _writing.clear()
    return WriteFailed(" ".join(p for p in parts if p))


class WriteTargetCallback(TrainerCallback):
    """Tells :func:`as_run_stopped` what Trainer is writing: ``checkpoint-N`` while it saves one (needing about the
    size of the previous checkpoint), the output dir once training ended (the final model the stage saves next)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            previous = newest_marked_checkpoint(args.output_dir)
            begin_write(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), "checkpoint",
                        checkpoint_size(previous))
        return control

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        end_write()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        previous = newest_marked_checkpoint(args.output_dir)
        weights = None
        if previous:
            weights = tree_size(previous, [f for f in os.listdir(previous) if f.endswith((".safetensors", ".bin"))])
        begin_write(args.output_dir, "final model", weights or None)
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        end_write()
        return control


# ----------------------------------------------------------------------------------------------------------------
# The one call every Trainer-based stage makes


def resilience_callbacks(run_args: Any) -> list[TrainerCallback]:
    """The callbacks that make a Trainer-based stage survive faults, in the order they must run: COMPLETE marker +
    manifest (its ``on_save`` runs before preemption's, which exits), non-finite checks (``run_args.on_nonfinite``),
    preemption, write-target tracking (its ``on_step_end`` sees the save preemption asked for). New stages (ORPO, KTO, GRPO, ...) pass ``callbacks=[*resilience_callbacks(run_args)]``
    to their trainer and run under ``run_main``; tests/test_resilience.py checks every stage script does."""
    return [CompleteCheckpointCallback(), NonFiniteCallback(getattr(run_args, "on_nonfinite", "stop")),
            PreemptionCallback(), WriteTargetCallback()]
