"""The contract every per-modality extractor follows.

An extractor turns manifest rows (one row per utterance, see ``cmarr.extract.manifest``)
into per-utterance frame matrices. It never writes files itself: the orchestration in
``cmarr.extract.features`` hands its results to a ``StoreWriter``.

Legend: ``T`` frames of one utterance, ``D`` feature width of the modality.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd


@dataclass
class Result:
    """What an extractor yields for one utterance.

    Exactly one of ``matrix`` and ``error`` is set. ``matrix`` is ``[T, D]`` (any float
    dtype; the writer casts to the store dtype). ``meta`` holds what is needed to read the
    matrix: ``frame_rate`` (frames/s) or ``frame_times`` (seconds, ``[T]``), ``tokens``
    (text word pieces), ``face_mask`` and ``frame_times`` of every sampled frame (video).
    ``error`` is a one-line reason (e.g. ``"unreadable wav: <path>: <why>"``); the
    modality is then missing for that utterance and the reason is recorded in the store.
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


def durable_replace(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished file ``tmp`` to ``dst`` so that after a crash or power loss ``dst``
    is either the old file or the complete new one: the data reach the disk (fsync) before
    the rename, and the rename itself is flushed with the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the file itself is safe
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
