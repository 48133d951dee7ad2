"""User-facing errors: one clear message (what, where, the fix), no traceback.

Stage scripts wrap ``main`` with :func:`run_main`; anything raised as a :class:`UserError`
is printed as ``error: <message>`` and the process exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(Exception):
    """An error caused by the user's input or flags, reported without a traceback."""


class ConfigError(UserError):
    """Bad or conflicting flags. ``problems`` lists every problem found, reported at once."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(UserError):
    """A bad data record, located as ``file:line: field: message``."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        if field:
            where += f"{field}: "
        super().__init__(where + message)


def run_main(main: Callable[[], Any]) -> Any:
    """Run ``main``; report a :class:`UserError` as one line on stderr and exit 2.

    Under torchrun (a process group is open) the process ends here once ``main`` returns: see
    :func:`exit_distributed_process`.
    """
    try:
        result = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    exit_distributed_process(result if isinstance(result, int) else 0)
    return result


def exit_distributed_process(status: int = 0) -> None:
    """End a process that has an open torch.distributed group (no-op without one): wait for non-daemon threads,
    run the ``atexit`` handlers, flush stdio, then ``os._exit(status)`` without the interpreter's teardown.

    Gloo's worker threads drop the tensors of a finished collective after the caller has its result; when that
    last reference falls during interpreter finalization, taking the GIL ends the thread and libstdc++ aborts the
    process (``terminate called without an active exception``, SIGABRT, ~5% of 2-rank CPU runs under load), so
    torchrun reports a run that trained and saved as failed. ``destroy_process_group`` does not close the gap: the
    group lives on in the DDP wrapper. Skipping finalization does: every file the stages write is closed by then,
    and what atexit flushes (logging, tensorboard, temporary directories) still runs.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import atexit
    import os
    import threading

    for thread in threading.enumerate():  # what a normal exit waits for
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(status)
