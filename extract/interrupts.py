"""SIGTERM as an interruption, and blocks it must not break into.

Batch schedulers and ``kill`` stop a job with SIGTERM. Under ``sigterm_interrupts`` it
raises ``Terminated`` (a ``KeyboardInterrupt``), so an extraction or a training run cleans
up as after Ctrl-C: finished work is committed and a rerun resumes from it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers and ``kill`` send), raised in the main thread while
    ``sigterm_interrupts`` is in force: an interruption like Ctrl-C, so the same cleanup runs
    (an extraction commits its finished utterances; a rerun resumes from them)."""


_held = {"depth": 0, "pending": None}  # main thread only: see interrupts_held


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, the first SIGTERM raises ``Terminated`` in the main thread (at the
    end of an ``interrupts_held`` block when it comes during one); later ones are ignored, so
    that they do not interrupt the cleanup (committing what is finished) that the first one
    set off; a scheduler's SIGKILL still ends the process. The previous handler is restored
    on leaving. Outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        e = Terminated(f"signal {signum} (SIGTERM)")
        if _held["depth"]:
            _held["pending"] = e
            return
        raise e

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """A block that a SIGTERM (``sigterm_interrupts``) must not break into, such as HDF5
    calling back into Python to write a file (an exception there leaves the HDF5 library in
    a broken state): ``Terminated`` is raised when the block ends instead. Only the main
    thread is affected (signal handlers run there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"]:
            raise_held()


def raise_held() -> None:
    """Raise a SIGTERM held by ``interrupts_held``, if one came: called where the block can
    stop cleanly (between HDF5 calls), so that a long write is not finished in vain."""
    pending = _held["pending"]
    if pending is not None and threading.current_thread() is threading.main_thread():
        _held["pending"] = None
        raise pending
