"""The errors of a training run, and the signal an interruption came from.

A :class:`TrainError` is a run that cannot proceed; its message names the file or setting
and what to do (``cm-arr-train`` prints it as one line, exit status 2). A
:class:`TrainInterrupted` is Ctrl-C or SIGTERM during a run; it says where each fold stopped.
"""
from __future__ import annotations

import signal

from cmarr.extract.interrupts import Terminated


class TrainError(Exception):
    """A run that cannot proceed (mismatched resume, bad folds, non-finite loss...)."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a run; ``str(e)`` says where each fold stopped, and
    ``signum`` which signal it was. Rerunning the same command resumes."""

    def __init__(self, where: str = "", signum: int = signal.SIGINT):
        super().__init__(where)
        self.signum = int(signum)


def signal_number(e: BaseException) -> int:
    """The signal an interruption came from: SIGTERM for ``cmarr.extract.interrupts.Terminated``
    (raised by ``sigterm_interrupts``, which the CLIs install), else SIGINT (Ctrl-C)."""
    return int(getattr(e, "signum", signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))
