"""Checkpoint files: written whole, holding tensors and plain data only, read without running code.

A checkpoint is a dict of a fold's weights, configs, store fingerprint, split and (``last.pt``)
optimizer state, RNG state and log rows. :func:`save_checkpoint` converts it with
:func:`plain` and writes it under a temporary name, renamed when complete, so the file is
always whole. :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``: a file
that would need code to load is refused, and nothing in it runs. :func:`check_checkpoint`
refuses a checkpoint of another run format or model weight layout, naming the file.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cmarr.extract.base import first_line
from cmarr.extract.files import durable_replace

from .errors import TrainError
from .run_dir import RUN_FORMAT


class CheckpointError(TrainError):
    """A checkpoint file that cannot be read (``detail`` says why), or that would need code to
    load (``unsafe``: refused, nothing in it run)."""

    def __init__(self, path: str | Path, detail: str, unsafe: bool = False):
        self.path, self.detail, self.unsafe = str(path), detail, unsafe
        super().__init__(f"{path}: {detail}" if unsafe else f"{path}: cannot be read ({detail})")


#: Why a checkpoint that would need code to load is refused (``CheckpointError.unsafe``).
UNSAFE_CHECKPOINT = ("not a cm-arr checkpoint, or one that needs code to load (it holds objects other than "
                     "tensors and plain data); nothing in it was run")


def plain(obj: Any) -> Any:
    """``obj`` as data that ``torch.load(weights_only=True)`` reads back without running code:
    tensors, dicts, lists, tuples, strings, numbers, bools and None. NumPy arrays become lists,
    NumPy scalars numbers, dataclasses dicts, paths strings; anything else is a ``TypeError``
    (a checkpoint field this module should convert)."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {(k if type(k) in (str, int) else plain(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return plain(obj.value)
    for base in (int, float, str):  # other subclasses: their plain value
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    raise TypeError(f"a checkpoint field of type {type(obj).__name__} is not plain data")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors and plain data only,
    so a file whose unpickling would run code (a crafted pickle) is refused before anything
    in it runs. ``CheckpointError`` naming the file when it cannot be read, needs code, or is
    not a dict of a cm-arr checkpoint's fields."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(path, f"UnpicklingError: {first_line(e)}") from None
        operand = re.search(r"Unsupported operand (\d+)", str(e))
        if operand:  # bytes that are no checkpoint pickle at all (junk, a damaged or foreign file)
            raise CheckpointError(path, f"not a cm-arr checkpoint: unsupported pickle operand {operand.group(1)}; "
                                  "nothing in it was run") from None
        raise CheckpointError(path, UNSAFE_CHECKPOINT, unsafe=True) from None  # it names code to run
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(path, f"{type(e).__name__}: {first_line(e)}") from None
    if not isinstance(ck, dict) or not {"model", "model_config"} <= set(ck):
        raise CheckpointError(path, "not a cm-arr-train checkpoint: no model or model_config")
    return ck


def check_checkpoint(ck: Mapping[str, Any], path: str | Path) -> None:
    """``TrainError`` naming ``path`` when the checkpoint ``ck`` was written in another run
    format (``RUN_FORMAT``) or holds model weights in another layout than this version's."""
    from cmarr.model import CMARR

    found = ck.get("format")
    if found != RUN_FORMAT:
        raise TrainError(f"{path}: is a checkpoint of run format {found or 1}, this version reads format "
                         f"{RUN_FORMAT}; retrain, or use the cm-arr version that wrote it")
    if ck.get("model_format") != CMARR.STATE_FORMAT:
        raise TrainError(f"{path}: holds model weights in layout {ck.get('model_format')}, this version reads "
                         f"layout {CMARR.STATE_FORMAT}; retrain, or use the cm-arr version that wrote it")


def save_checkpoint(obj: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` of ``plain(obj)`` under a temporary name, fsynced and renamed: ``path``
    is always whole. A failed write (disk full, ...) leaves no partial file and is a
    ``TrainError``; the last checkpoint that was written stays the resume point."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    obj = plain(obj)  # loads with weights_only=True: reading a checkpoint never runs code
    try:
        torch.save(obj, tmp)
        durable_replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise TrainError(f"{path}: cannot be written ({type(e).__name__}: {first_line(e)}); "
                         "free space (or fix the folder) and run the same command again to resume") from None
    finally:
        tmp.unlink(missing_ok=True)
