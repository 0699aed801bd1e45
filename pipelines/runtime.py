"""Where and how a run computes: the device, torchrun's processes, seeds, ``torch.compile``,
and the clock behind the ETAs of the per-epoch lines (:class:`EpochClock`).

Every random draw of a run (initial weights, batch order, training conditions, the
diagnostics' batch) comes from a generator seeded by :func:`derive_seed` of the run's seed
and the draw's place (fold, epoch, stream), so a fold gives the same numbers whatever ran
before it in the process.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import OptimConfig
from .errors import TrainError


@dataclass(frozen=True)
class DistInfo:
    """torchrun environment: world size 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(setting: str, dist: DistInfo = DistInfo()) -> torch.device:
    """The device of ``setting`` (auto | cpu | cuda | cuda:N); under torchrun, "cuda" is this
    rank's GPU. ``TrainError`` when CUDA is asked for and not available."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"device {setting!r} requested but CUDA is not available")
        if setting == "cuda" and dist.enabled:
            setting = f"cuda:{dist.local_rank}"
    return torch.device(setting)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from the run's seed and the place of a draw (fold, epoch, stream)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def compile_with(fn: Callable[..., Any], o: OptimConfig) -> Callable[..., Any]:
    """``torch.compile(fn)`` as the optim config ``o`` says (its mode is inductor's; other
    backends take none), with static shapes."""
    if o.compile_backend == "inductor":
        return torch.compile(fn, mode=o.compile_mode, dynamic=False)
    return torch.compile(fn, backend=o.compile_backend, dynamic=False)


class EpochClock:
    """The measured epoch times of a run in this process, and the ETAs they give.

    ``left``: the epochs of the run still to train in this process: every requested fold's
    epochs, less those a resumed fold had already trained (:meth:`skip`), less each epoch
    measured (:meth:`record`). The estimate of an epoch to come is the mean of the epochs
    measured so far in this process, over every fold: the folds of one run train the same
    model on parts of one store, so their epochs cost about the same, and a mean over all of
    them settles as the run goes on (the first epoch, slowed by warm-up or compilation, weighs
    less and less). One process's folds only: the folds of ``--jobs`` processes are not counted.
    """

    def __init__(self, epochs_left: int):
        self.left = int(epochs_left)
        self.seconds: list[float] = []

    def skip(self, epochs: int) -> None:
        """``epochs`` of the run were trained before this process (a resumed fold)."""
        self.left -= int(epochs)

    def record(self, seconds: float) -> None:
        """One epoch took ``seconds``."""
        self.seconds.append(float(seconds))
        self.left -= 1

    def eta(self, epochs: int | None = None) -> float:
        """Seconds to train ``epochs`` more (default: the rest of the run); NaN before any epoch is measured."""
        if not self.seconds:
            return float("nan")
        n = self.left if epochs is None else epochs
        return max(n, 0) * sum(self.seconds) / len(self.seconds)


def format_duration(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h07m`` (``?`` when not known)."""
    if seconds != seconds:  # NaN: nothing measured yet
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
