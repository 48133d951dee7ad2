"""User-facing errors: one clear message (what, where, the fix), no traceback.

Stage scripts wrap ``main`` with :func:`medtrain.entrypoint.run_main`; anything raised as a :class:`UserError`
is printed as ``error: <message>`` and the process exits with status 2. This module imports nothing from medtrain,
so every other module can import it.
"""

from __future__ import annotations



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


class RunStopped(Exception):
    """Training stopped on purpose before the end (preempted, diverged, a failed write): the message says what
    survives and what to do; :func:`medtrain.entrypoint.run_main` exits with ``exit_status`` (see
    medtrain/resilience.py)."""

    exit_status = 1
    label = "error"
