"""The ``__main__`` wrapper of every script: user errors become one line and exit status 2.

Kept apart from :mod:`medtrain.errors` (which every module imports) because ending a torchrun process needs
:mod:`medtrain.distributed`, which itself imports the errors: with ``run_main`` in ``errors.py`` the two imported
each other.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from .distributed import exit_distributed_process
from .errors import UserError


def run_main(main: Callable[[], Any]) -> Any:
    """Run ``main``; report a :class:`~medtrain.errors.UserError` as ``error: <message>`` on stderr and exit 2.

    Under torchrun (a process group is open) the process ends here once ``main`` returns: see
    :func:`medtrain.distributed.exit_distributed_process`.
    """
    try:
        result = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    exit_distributed_process(result if isinstance(result, int) else 0)
    return result
