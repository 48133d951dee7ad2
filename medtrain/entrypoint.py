"""The ``__main__`` wrapper of every script: user errors become one line and exit status 2; a stopped run
(preempted 75, diverged 3, failed write 74: medtrain/resilience.py) one line and its own status.

Kept apart from :mod:`medtrain.errors` (which every module imports) because ending a torchrun process needs
:mod:`medtrain.distributed`, which itself imports the errors: with ``run_main`` in ``errors.py`` the two imported
each other.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from .distributed import exit_distributed_process
from .errors import RunStopped, UserError


def run_main(main: Callable[[], Any]) -> Any:
    """Run ``main``; report a :class:`~medtrain.errors.UserError` as ``error: <message>`` on stderr and exit 2, a
    :class:`~medtrain.errors.RunStopped` (or a failed write, mapped by ``as_run_stopped``) with its own status.

    Under torchrun (a process group is open) the process ends here once ``main`` returns: see
    :func:`medtrain.distributed.exit_distributed_process`.
    """
    try:
        result = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as err:  # a write failure (disk full, quota) becomes a RunStopped naming the path
        # local: only on failure; resilience imports transformers, which light scripts (template.py) never load
        from .resilience import as_run_stopped

        stopped = err if isinstance(err, RunStopped) else as_run_stopped(err)
        if stopped is None:
            raise
        print(f"{stopped.label}: {stopped}", file=sys.stderr, flush=True)
        exit_distributed_process(stopped.exit_status)  # under torchrun: ends here, without the teardown race
        sys.exit(stopped.exit_status)
    exit_distributed_process(result if isinstance(result, int) else 0)
    return result
