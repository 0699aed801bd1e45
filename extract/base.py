"""The contract every per-modality extractor follows, and what all of ``cmarr.extract`` shares.

An extractor turns manifest rows (one row per utterance, see
``cmarr.extract.corpora.manifest``) into per-utterance frame matrices. It never writes files
itself: the orchestration in ``cmarr.extract.features`` hands its results to a
``StoreWriter``. Also here: the labels and modalities every store and model uses, the
errors that name a file or an option, and ``run_ahead``, which runs an extractor ahead of
the code storing its results.

Legend: ``T`` frames of one utterance, ``D`` feature width of the modality.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd

#: The four emotion classes every store and model uses, in label-index order.
LABELS: tuple[str, ...] = ("ang", "hap", "neu", "sad")
#: The three modalities, in the order of every model input and store group.
MODALITIES: tuple[str, ...] = ("speech", "text", "video")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Result:
    """What an extractor yields for one utterance.

    Exactly one of ``matrix`` and ``error`` is set. ``matrix`` is ``[T, D]`` (any float
    dtype; the writer casts to the store dtype). ``meta`` holds what is needed to read the
    matrix: ``frame_rate`` (frames/s) or ``frame_times`` (seconds, ``[T]``), ``tokens``
    (text word pieces), ``face_mask`` and ``frame_times`` of every sampled frame (video).
    ``error`` is a one-line reason (e.g. ``"unreadable wav: <path>: <why>"``); the
    modality is then missing for that utterance and the reason is recorded in the store
    (``meta`` may then say what was tried, e.g. video's ``sampled_frames``; it is not stored).
    """

    utterance_id: str
    matrix: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Extractor:
    """Base of the speech, text and video extractors."""

    modality: str = ""
    dim: int = 0

    def provenance(self) -> dict[str, Any]:
        """How the features are made: model id/revision or checkpoint sha256, layer, rates,
        tokenizer, detector settings, batching policy. Library versions, the manifest hash,
        the project version and the time are added by the writer."""
        raise NotImplementedError

    def extract(self, rows: pd.DataFrame, root: Path) -> Iterator[Result]:
        """Yield one ``Result`` per row of ``rows`` (in any order, each id exactly once).
        Media paths in ``rows`` are relative to ``root``."""
        raise NotImplementedError


T = TypeVar("T")


def run_ahead(items: Iterable[T], depth: int = 2, group: int = 64, setup: Callable[[], None] | None = None,
              name: str = "cmarr-extract") -> Iterator[T]:
    """Iterate ``items`` in a worker thread that runs ahead of the caller.

    An extractor's iterator does the model work (on a GPU: preparing a batch, the forward
    pass, copying the result back); the caller stores the results. Run side by side, the
    device is not idle while results are written. Items come in order. They are handed over
    in groups: at once while the caller waits, else gathered (up to ``group``) while it is
    busy, so that the hand-over costs little per item; at most ``depth`` groups wait. An
    exception in the worker is raised here with its own traceback; when the caller stops
    early (an error, Ctrl-C, ``close()``), the worker stops after the item it is computing.
    ``setup`` runs first in the worker (e.g. ``torch.cuda.set_device``: the current device
    is per thread).
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        pending: list = []
        try:
            if setup is not None:
                setup()
            for item in items:
                pending.append(item)
                if len(pending) >= group or q.empty():  # the caller waits (or will soon): hand over now
                    if not put(("items", pending)):
                        return
                    pending = []
            if pending and not put(("items", pending)):
                return
            put(("done", None))
        except BaseException as e:  # handed to the caller, raised there (after what came before it)
            if pending and not put(("items", pending)):
                return
            put(("error", e))

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield from value
    finally:
        stop.set()


class PathError(Exception):
    """A problem with one file or folder. ``str(e) == f"{path}: {problem}"``; ``path`` and
    ``problem`` are kept for callers that format their own message."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ExtractError(Exception):
    """A setup problem that stops an extraction before it starts (missing checkpoint, model
    path that does not load, ...). ``str(e)`` names the file or option and the problem.
    Per-utterance problems are not raised: they become ``Result.error``."""
