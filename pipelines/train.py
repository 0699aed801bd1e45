"""Training and evaluation of CM-ARR under the leave-one-session-out protocol (Sec. 4.2).

:class:`FoldRecipe` trains one fold in named stages: ``setup`` (split, model, optimizer,
data pipeline, resume), ``train_epoch``, ``evaluate``, ``save_checkpoint``, ``resume``, and
``fit`` which runs them. :func:`run_training` runs the requested folds and writes RUN_DIR:

    RUN_DIR/config.yaml          the resolved TrainConfig (+ the model config it gives)
    RUN_DIR/fold<k>/log.csv      one row per epoch: losses, validation WAR/UAR, selection,
                                 diagnostics (:data:`DIAGNOSTIC_COLUMNS`)
    RUN_DIR/fold<k>/best.pt      best epoch on validation: weights, configs, store provenance
    RUN_DIR/fold<k>/last.pt      the resume point (weights, optimizer, RNG, log), every epoch
    RUN_DIR/fold<k>/metrics.json test metrics of best.pt under the seven conditions
    RUN_DIR/metrics.json         per fold and condition WAR, UAR, confusion; mean/std; Avg
    RUN_DIR/results.md           Table 2 layout

Checkpoints hold tensors and plain data only (:func:`plain`) and are read with
``torch.load(weights_only=True)`` (:func:`load_checkpoint`): a file that would need code to
load is refused, and nothing in it runs. A fold being trained is locked (:class:`FoldLock`,
``fold<k>/lock``, removed when the fold ends). Ctrl-C or SIGTERM (``cmarr.extract.base.sigterm_interrupts``)
stops a run with :class:`TrainInterrupted`, which says where each fold stopped; rerunning
the same command resumes.

Choices the paper leaves open, made here (config fields in brackets):

- Epoch selection on validation only [data.validation, protocol.select_metric,
  protocol.select_conditions]; the test part is evaluated once, with the best checkpoint.
- Training conditions [protocol.train_conditions] via :func:`data.sample_conditions`.
- Evaluation: each test utterance is scored under each of the seven conditions; inputs of
  modalities that are not available are filled with NaN [data.fill_absent], so a model that
  read them would produce NaN. An utterance that lacks a modality of the condition in the
  store (e.g. no face) is scored with the modalities it has, and counted as ``n_reduced``;
  one with no input at all in a condition (e.g. no face under {v}) is not scored there and
  is counted as ``n_no_input``. Both counts are in metrics.json and results.md.
- A final training batch of a single utterance is dropped for that epoch (the contrastive
  losses need pairs; shuffling makes it a different utterance every epoch).
- Adam [optim.optimizer]; bf16 autocast on CUDA [optim.amp]; resident pooled tensors on CUDA
  [data.pipeline].
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import yaml

from cmarr.extract.base import durable_replace

from .config import ConfigError, TrainConfig, load_config, with_overrides
from .data import (CONDITION_MASKS, CONDITION_NAMES, LABELS, MODALITIES, Batch, ResidentData, ResidentSubset, StoreData,
                   condition_available, eager_loader, fill_value, hide_unavailable,
                   resolve_train_conditions, sample_conditions)
from .stacked import StackedFolds, stack_groups
from .metrics import MISSING_CONDITIONS, build_metrics, paper_reference, score, with_average, write_results
from .validation import FoldSplit, SplitError, split_fold


class TrainError(Exception):
    """A run that cannot proceed (mismatched resume, bad folds, non-finite loss...)."""


class CheckpointError(TrainError):
    """A checkpoint file that cannot be read (``detail`` says why), or that would need code to
    load (``unsafe``: refused, nothing in it run)."""

    def __init__(self, path: str | Path, detail: str, unsafe: bool = False):
        self.path, self.detail, self.unsafe = str(path), detail, unsafe
        super().__init__(f"{path}: {detail}" if unsafe else f"{path}: cannot be read ({detail})")


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a run; ``str(e)`` says where each fold stopped, and
    ``signum`` which signal it was. Rerunning the same command resumes."""

    def __init__(self, where: str = "", signum: int = signal.SIGINT):
        super().__init__(where)
        self.signum = int(signum)


# ----------------------------------------------------------------------------------------
# helpers


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
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"device {setting!r} requested but CUDA is not available")
        if setting == "cuda" and dist.enabled:
            setting = f"cuda:{dist.local_rank}"
    return torch.device(setting)


def _seed(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


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


#: Why a checkpoint that would need code to load is refused (``CheckpointError.unsafe``).
UNSAFE_CHECKPOINT = ("not a cm-arr checkpoint, or one that needs code to load (it holds objects other than "
                     "tensors and plain data: written by another program, or by cm-arr 0.1.0 before checkpoints "
                     "were plain data); nothing in it was run")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors and plain data only,
    so a file whose unpickling would run code (a crafted pickle) is refused before anything
    in it runs. ``CheckpointError`` naming the file when it cannot be read, needs code, or is
    not a dict of a cm-arr checkpoint's fields."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(path, f"UnpicklingError: {_first_line(e)}") from None
        operand = re.search(r"Unsupported operand (\d+)", str(e))
        if operand:  # bytes that are no checkpoint pickle at all (junk, a damaged or foreign file)
            raise CheckpointError(path, f"not a cm-arr checkpoint: unsupported pickle operand {operand.group(1)}; "
                                  "nothing in it was run") from None
        raise CheckpointError(path, UNSAFE_CHECKPOINT, unsafe=True) from None  # it names code to run
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(path, f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(ck, dict) or not {"model", "model_config"} <= set(ck):
        raise CheckpointError(path, "not a cm-arr-train checkpoint: no model or model_config")
    return ck


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, fsynced and renamed: ``path`` is always whole.
    A failed write (disk full, ...) leaves no partial file and is a ``TrainError``; the
    last checkpoint that was written stays the resume point."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    obj = plain(obj)  # loads with weights_only=True: reading a checkpoint never runs code
    try:
        torch.save(obj, tmp)
        durable_replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise TrainError(f"{path}: cannot be written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); "
                         "free space (or fix the folder) and run the same command again to resume") from None
    finally:
        tmp.unlink(missing_ok=True)


class FoldLock:
    """Exclusive right to train one fold into its folder: ``flock`` on ``fold<k>/lock``,
    held while the fold trains. A second process on the same fold (a rerun while the first
    still runs, or left-over ``--jobs`` processes) is refused instead of writing the same
    checkpoints. The kernel drops the lock of a killed process.

    The holder removes the file when it releases the lock (still holding it), so a finished
    or interrupted run leaves none. A process that opened the file just before it was
    removed may then get a lock on the removed file: it checks that the path still names
    the file it locked, and otherwise tries again on the new one, so two processes never
    both hold "the" lock of a fold."""

    def __init__(self, folder: Path, fold: int):
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "lock"
        while True:
            self._f = open(self.path, "a+")
            try:
                fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.seek(0)
                holder = self._f.read().strip() or "another process"
                self._f.close()
                raise TrainError(f"{folder}: fold {fold} is being trained by {holder}; wait for it to end, or stop "
                                 "it (a rerun resumes from its last checkpoint)") from None
            try:
                same = os.path.samestat(os.fstat(self._f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            self._f.close()  # locked a file its holder had just removed: lock the current one
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        if not self._f.closed:
            try:  # while held, and only the file this process locked (not one made after it was removed)
                if os.path.samestat(os.fstat(self._f.fileno()), os.stat(self.path)):
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._f.close()  # closing drops the flock


def model_config_for(cfg: TrainConfig, dims: Mapping[str, int]):
    """The CMARRConfig of a run: the variant's row of Table 3, then ``cfg.model`` overrides."""
    from cmarr.model import CMARRConfig

    try:
        return CMARRConfig.for_variant(cfg.variant, **{"dims": dict(dims), "num_classes": len(LABELS), **dict(cfg.model)})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model config: {e}") from None


def store_fingerprint(data: StoreData) -> dict[str, Any]:
    """What identifies the store a run trained on: its utterance ids, its table (ids, labels,
    folds, speakers) and the sha256 of each modality's frames (as the store records them)."""
    ids = "\n".join(data.ids).encode()
    table = "\n".join(f"{u}\t{y}\t{k}\t{s}" for u, y, k, s in zip(data.ids, data.labels, data.folds, data.speakers))
    corpora = sorted(set(data.table["corpus"].astype(str))) if "corpus" in data.table else []
    counts = {lab: int((data.labels == i).sum()) for i, lab in enumerate(LABELS)}
    return {"path": str(data.path), "n_utterances": len(data), "utterance_ids_sha256": hashlib.sha256(ids).hexdigest(),
            "table_sha256": hashlib.sha256(table.encode()).hexdigest(),
            "dims": dict(data.dims), "frames_sha256": dict(data.checksums),
            "corpus": corpora[0] if len(corpora) == 1 else None, "label_counts": counts, "folds": data.fold_ids}


def store_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """How the store fingerprint ``new`` differs from ``old`` (None: the same store). A field
    that one of them lacks (written by an older version, or a store in memory) is not compared."""
    if old.get("utterance_ids_sha256") != new.get("utterance_ids_sha256"):
        return "its utterance ids differ"
    if old.get("table_sha256") and new.get("table_sha256") and old["table_sha256"] != new["table_sha256"]:
        return "its labels, folds or speakers differ"
    a, b = old.get("frames_sha256") or {}, new.get("frames_sha256") or {}
    changed = sorted(m for m in set(a) & set(b) if a[m] and b[m] and a[m] != b[m])
    if changed or (a and b and set(a) != set(b)):
        return f"its {', '.join(changed) or 'modalities'} features differ (frames_sha256)"
    return None


def _comparable(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A config without the keys that may differ between jobs of one run (folds, device, how
    many folds a process trains together)."""
    d = json.loads(json.dumps(cfg_dict))
    d.get("protocol", {}).pop("folds", None)
    d.get("optim", {}).pop("stack_folds", None)
    d.pop("device", None)
    return d


# ----------------------------------------------------------------------------------------
# one fold


def check_model_format(ck: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose weights are laid out differently from this version's model."""
    from cmarr.model import CMARR

    found = ck.get("model_format", 1)  # checkpoints without the field hold per-modality layers
    if found != CMARR.STATE_FORMAT:
        raise TrainError(f"{path}: holds model weights in layout {found}, this version reads layout "
                         f"{CMARR.STATE_FORMAT}; retrain, or use the version that wrote it")


def compile_with(fn, o):
    """``torch.compile(fn)`` as the optim config ``o`` says (its mode is inductor's; other
    backends take none), with static shapes."""
    if o.compile_backend == "inductor":
        return torch.compile(fn, mode=o.compile_mode, dynamic=False)
    return torch.compile(fn, backend=o.compile_backend, dynamic=False)


DIAG_TERMS: tuple[str, ...] = ("udcl", "spcl", "rec", "nll", "cls")

#: The diagnostic columns of ``fold<k>/log.csv`` (written by :meth:`FoldRecipe.end_epoch`,
#: before the last column ``seconds``; ``<t>`` is a loss term udcl, spcl, rec, nll, cls and
#: ``<m>`` a modality speech, text, video). An empty cell = does not apply to the model; "nan"
#: = applies, but there was nothing to measure (e.g. no validation row lacks the modality).
#:
#: - ``wloss_<t>``: the epoch's mean training loss term weighted by its Eq. 14 weight
#:   (alpha, beta, lambda_rec, 1 for L_cls, nll_weight), i.e. its share of ``loss_total``
#:   (``loss_<t>`` is the unweighted term).
#: - ``gradnorm_<t>``: L2 norm of the gradient of the *weighted* term with respect to the
#:   shared layers (:meth:`cmarr.model.CMARR.shared_parameters`: ``inp``, UMC, projection
#:   ``proj``, those trained), measured once per epoch after training on one fixed training
#:   batch (the first ``optim.batch_size`` utterances of the fold's training part, a fixed
#:   draw of training conditions), with dropout off, in float32, by one
#:   ``torch.autograd.grad`` per term; 0 = the term does not reach them (e.g. the detached
#:   likelihood, or L_rec with the default detaches). Empty where the term's weight is 0.
#: - ``x_norm_<m>``, ``x_var_<m>``: the scale of ``X_m`` (the projection, Sec. 3.2) on the
#:   validation part (inputs of the full condition, rows where ``m`` exists): mean L2 norm of a
#:   step's d-vector, and the variance of each of the d channels over rows and steps,
#:   averaged over channels.
#: - ``rec_cos_<m>``, ``rec_mse_<m>``: ``X^_m`` against ``X_m`` on validation, over the six
#:   missing conditions' rows where ``m`` exists but is not an input (each such row once per
#:   condition): cosine similarity of each step's d-vectors averaged over steps, and the mean
#:   squared error over steps and channels (Eq. 9's "mean"), both averaged over those rows.
#:   Empty for the baseline (``reconstruction=False``: ``X^_m`` is not a reconstruction).
#: - ``triv_cos_<m>``, ``triv_mse_<m>``: the same for the trivial reconstruction, the mean of
#:   the available modalities' ``X_n`` (per step) in that row.
#:
#: The stacked path (:mod:`.stacked`) writes the same columns: they are measured in
#: :meth:`FoldRecipe.end_epoch` on the fold's own model, after its weights are synced.
DIAGNOSTIC_COLUMNS: tuple[str, ...] = (
    *(f"wloss_{t}" for t in DIAG_TERMS), *(f"gradnorm_{t}" for t in DIAG_TERMS),
    *(f"x_{s}_{m}" for s in ("norm", "var") for m in MODALITIES),
    *(f"{k}_{s}_{m}" for k in ("rec", "triv") for s in ("cos", "mse") for m in MODALITIES))


def term_weights(mcfg) -> dict[str, float]:
    """The Eq. 14 weight of each loss term (plus ``nll_weight``), as :func:`total_loss` uses them."""
    return {"udcl": mcfg.alpha, "spcl": mcfg.beta, "rec": mcfg.lambda_rec, "nll": mcfg.nll_weight, "cls": 1.0}


def _cell(v: float) -> float:
    return float(f"{v:.6g}")


class ValDiagnostics:
    """Accumulates the validation-side diagnostics (``x_*``, ``rec_*``, ``triv_*`` of
    :data:`DIAGNOSTIC_COLUMNS`) over the batches of one :meth:`FoldRecipe.predict` pass, from
    the model's ``internals`` (no extra model call).

    The target ``X_m`` of a row is taken from the same utterance's row of the full condition
    "svt" in the same call (``X_m`` depends on modality ``m``'s input only, so it is the same
    in every row where ``m`` is an input); without "svt" among the conditions nothing is
    accumulated (NaN). Sums are kept on the device in float64 (one host copy per pass);
    the per-row statistics are computed in float32.
    """

    N_SUMS = 7  # per modality: norm sum, steps, rec cos, rec mse, triv cos, triv mse, target rows

    def __init__(self, reconstruction: bool):
        self.reconstruction = reconstruction
        self.sums = None  # (3, N_SUMS)
        self.ch_sum = self.ch_sq = None  # (3, d) channel sums and sums of squares over rows and steps

    def add(self, X: torch.Tensor, x_hat: torch.Tensor, avail: torch.Tensor, sample: torch.Tensor,
            svt_row: torch.Tensor) -> None:
        """X, x_hat (3, R, S, d): the model's internals for R stacked rows; avail (R, 3) their
        inputs; sample (R,) the utterance of each row in the batch; svt_row (B,) the row of
        each utterance under "svt" (-1 = none)."""
        X, x_hat = X.float(), x_hat.float()
        n, R, S, d = X.shape
        if self.sums is None:
            self.sums = X.new_zeros(n, self.N_SUMS, dtype=torch.float64)
            self.ch_sum = X.new_zeros(n, d, dtype=torch.float64)
            self.ch_sq = X.new_zeros(n, d, dtype=torch.float64)
        svt = svt_row[svt_row >= 0]
        a = avail.T  # (3, R)
        zero = X.new_zeros(())
        # scale of X_m: the full-condition rows where m exists
        xs, ps = X[:, svt], a[:, svt]  # (3, R', S, d), (3, R')
        xs = torch.where(ps[:, :, None, None], xs, zero).double()
        self.sums[:, 0] += xs.norm(dim=-1).sum(dim=(1, 2))
        self.sums[:, 1] += ps.sum(dim=1).double() * S
        self.ch_sum += xs.sum(dim=(1, 2))
        self.ch_sq += xs.pow(2).sum(dim=(1, 2))
        # reconstruction: rows where m is not an input but exists (an input under "svt")
        t = svt_row[sample]  # (R,)
        has_t = t >= 0
        tc = t.clamp(min=0)
        target = ~a & a[:, tc] & has_t  # (3, R)
        true = X[:, tc]  # (3, R, S, d)
        triv = torch.where(a[:, :, None, None], X, zero).sum(dim=0) / a.sum(dim=0).clamp(min=1)[:, None, None]
        for j, est in ((2, x_hat), (4, triv.expand_as(X))):
            cos = torch.nn.functional.cosine_similarity(est, true, dim=-1).mean(dim=-1)  # (3, R)
            mse = (est - true).pow(2).mean(dim=(-1, -2))  # (3, R)
            self.sums[:, j] += torch.where(target, cos, zero).double().sum(dim=1)
            self.sums[:, j + 1] += torch.where(target, mse, zero).double().sum(dim=1)
        self.sums[:, 6] += target.sum(dim=1).double()

    def columns(self) -> dict[str, Any]:
        nan = float("nan")
        out: dict[str, Any] = {}
        if self.sums is None:
            vals = [[nan] * self.N_SUMS] * len(MODALITIES)
            var = [nan] * len(MODALITIES)
        else:
            vals = self.sums.tolist()
            n = self.sums[:, 1:2].clamp(min=1)
            var = torch.where(self.sums[:, 1] > 0, (self.ch_sq / n - (self.ch_sum / n) ** 2).mean(dim=1),
                              torch.full_like(self.sums[:, 1], nan)).tolist()
        for i, m in enumerate(MODALITIES):
            v = vals[i]
            out[f"x_norm_{m}"] = _cell(v[0] / v[1]) if v[1] > 0 else nan
            out[f"x_var_{m}"] = _cell(var[i]) if var[i] == var[i] else nan
        for kind, j in (("rec", 2), ("triv", 4)):
            for stat, k in (("cos", 0), ("mse", 1)):
                for i, m in enumerate(MODALITIES):
                    rows = vals[i][6]
                    if kind == "rec" and not self.reconstruction:
                        out[f"{kind}_{stat}_{m}"] = ""
                    else:
                        out[f"{kind}_{stat}_{m}"] = _cell(vals[i][j + k] / rows) if rows > 0 else nan
        return out


class FoldRecipe:
    """Trains and evaluates one fold. Stages: setup, train_epoch, evaluate, save_checkpoint, resume."""

    def __init__(self, cfg: TrainConfig, data: StoreData, fold: int, run_dir: str | Path,
                 device: torch.device, dist: DistInfo = DistInfo(), log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.data = data
        self.fold = int(fold)
        self.dir = Path(run_dir) / f"fold{self.fold}"
        self.device = device
        self.dist = dist
        self.log = log or (lambda s: None)
        self.epoch = 0  # epochs completed
        self.saved = 0  # epochs completed and in last.pt (what a rerun resumes from)
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.rows: list[dict[str, Any]] = []

    # ---- setup ----------------------------------------------------------------------
    def setup(self, resident: ResidentData | None = None) -> "FoldRecipe":
        """``resident``: the pooled tensors of every row of the store on this device, shared
        by the folds of one process (built here when not given and the pipeline is resident)."""
        from cmarr.model import CMARR

        cfg, data = self.cfg, self.data
        self.split: FoldSplit = check_fold_data(cfg, data, self.fold)  # found now, not after the fold has trained
        self.mcfg = model_config_for(cfg, data.dims)
        self.mode = resolve_train_conditions(cfg.protocol.train_conditions, self.mcfg.train_missing)
        torch.manual_seed(_seed(cfg.seed, self.fold, 0))
        self.model = CMARR(self.mcfg).to(self.device)
        self.net = self.model
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.compiled = self._maybe_compile()
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        extra = {"fused": True} if self.device.type in ("cuda", "cpu") else {}  # one kernel for all parameters
        self.optimizer = opt_cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **extra)
        self.amp = (o.amp == "bf16") or (o.amp == "auto" and self.device.type == "cuda")
        self.fill = fill_value(cfg.data.fill_absent)
        pipeline = cfg.data.pipeline
        if pipeline == "auto":
            pipeline = "resident" if self.device.type == "cuda" or cfg.optim.stack_folds > 1 else "eager"
        self.pipeline = pipeline
        if pipeline == "resident":
            self.res_full = resident or resident_data(data, self.mcfg.seq_len, self.device, self.fill)
            self.res = {name: ResidentSubset(self.res_full, getattr(self.split, name))
                        for name in ("train", "val", "test")}
            self.train_index = self.res["train"].rows
        self.resume()
        return self

    def _maybe_compile(self):
        c = self.cfg.optim.compile
        if c == "on" or (c == "auto" and self.device.type == "cuda"):
            o = self.cfg.optim
            # static shapes: a fold has at most two batch sizes (full, last), each its own graph,
            # rather than one dynamic-shape graph serving every step after the first remainder
            return compile_with(self.net, o)
        return self.net

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- training -------------------------------------------------------------------
    def _train_order(self, epoch: int) -> torch.Tensor:
        """Positions in the training part, in this rank's order for ``epoch`` (seeded by seed,
        fold, epoch)."""
        n = len(self.split.train)
        g = torch.Generator()
        g.manual_seed(_seed(self.cfg.seed, self.fold, epoch, 1))
        order = torch.randperm(n, generator=g)
        if self.dist.enabled:  # same permutation on every rank, padded to a multiple of the world size
            pad = (-n) % self.dist.world
            order = torch.cat([order, order[:pad]])[self.dist.rank::self.dist.world]
        return order

    def train_rows(self, epoch: int):
        """Resident pipeline: the store rows of each training batch of ``epoch``, as device
        tensors (a final batch of one utterance is dropped)."""
        bs = self.cfg.optim.batch_size
        rows = self.train_index[self._train_order(epoch).to(self.device)]
        for s in range(0, len(rows), bs):
            if len(rows[s:s + bs]) >= 2:
                yield rows[s:s + bs]

    def _train_batches(self, epoch: int):
        """Batches of this rank for ``epoch``."""
        bs = self.cfg.optim.batch_size
        if self.pipeline == "resident":
            for rows in self.train_rows(epoch):
                yield self.res_full.batch(rows)
        else:
            order = self._train_order(epoch)
            idx = self.split.train[order.numpy()]
            loader = eager_loader(self.data, idx, bs, shuffle=False, seed=0, fill=self.fill,
                                  num_workers=self.cfg.data.num_workers)
            for b in loader:
                if len(b) >= 2:
                    yield b.to(self.device, non_blocking=True)

    def train_step(self, b: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One optimisation step on batch ``b``; returns the (detached) loss terms."""
        available = sample_conditions(b.present, self.mode, gen)  # (B, 3)
        if self.compiled is not self.net and self.cfg.optim.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last step's graph outputs may be reused
        with self._autocast():
            # value checks are a host sync per step (and would split a compiled graph): only for
            # eager batches; resident batches were checked once when built, and conditions
            # come from sample_conditions, a non-empty subset of what is present
            out = self.compiled(b.feats, b.masks, available, present=b.present, labels=b.labels,
                                validate=self.compiled is self.net and self.pipeline != "resident",
                                pooled=self.pipeline == "resident")
        loss = out.losses["total"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        return {k: v.detach() for k, v in out.losses.items()}

    def condition_generator(self, epoch: int) -> torch.Generator:
        """Generator of the training conditions of ``epoch`` (seeded by seed, fold, epoch, rank)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_seed(self.cfg.seed, self.fold, epoch, 2, self.dist.rank))
        return gen

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this fold's training part; returns mean losses."""
        from cmarr.model import LOSS_NAMES

        self.net.train()
        gen = self.condition_generator(epoch)
        names = (*LOSS_NAMES, "total")
        sums = torch.zeros(len(names), device=self.device)
        steps = 0
        for b in self._train_batches(epoch):
            losses = self.train_step(b, gen)
            sums += torch.stack([losses[k].float() for k in names])  # stays on the device: no sync per step
            steps += 1
        vals = (sums / max(steps, 1)).tolist()
        self.check_loss(epoch, vals[-1])
        return {f"loss_{k}": v for k, v in zip(names, vals)} | {"steps": steps}

    def check_loss(self, epoch: int, value: float) -> None:
        if not np.isfinite(value):
            raise TrainError(f"fold {self.fold}, epoch {epoch}: the training loss is not finite ({value})")

    # ---- diagnostics ----------------------------------------------------------------
    def diagnostic_batch(self) -> tuple[Batch, torch.Tensor] | None:
        """The fixed training batch of the gradient norms and its conditions: the first
        ``optim.batch_size`` utterances of the training part (store order), conditions drawn
        by a generator of their own (seed, fold), so the training RNG is not touched. None when
        the training part has fewer than two utterances."""
        if getattr(self, "_diag_batch", None) is None:
            rows = self.split.train[:self.cfg.optim.batch_size]
            if len(rows) < 2:
                return None
            if self.pipeline == "resident":
                b = self.res_full.batch(self.train_index[:len(rows)])
            else:
                b = next(iter(eager_loader(self.data, rows, len(rows), shuffle=False, seed=0, fill=self.fill)))
                b = b.to(self.device)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_seed(self.cfg.seed, self.fold, 0, 3))
            self._diag_batch = (b, sample_conditions(b.present, self.mode, gen))
        return self._diag_batch

    def gradient_norms(self) -> dict[str, Any]:
        """``gradnorm_<t>`` of :data:`DIAGNOSTIC_COLUMNS`: the norm of the gradient each
        weighted loss term sends into the shared layers, on :meth:`diagnostic_batch`."""
        weights = term_weights(self.mcfg)
        out: dict[str, Any] = {f"gradnorm_{k}": "" if weights[k] == 0 else float("nan") for k in DIAG_TERMS}
        found = self.diagnostic_batch()
        model = self.model  # unwrapped (no DDP hooks); no autocast: float32
        params = list(model.shared_parameters().values())
        if found is None or not params:
            return out
        b, available = found
        was = model.training
        model.eval()  # no dropout: deterministic, and the global RNG is not drawn from
        try:
            with torch.enable_grad():
                losses = model(b.feats, b.masks, available, present=b.present, labels=b.labels, validate=False,
                               pooled=self.pipeline == "resident").losses
                terms = [k for k in DIAG_TERMS if weights[k] > 0]
                norms = []
                for i, k in enumerate(terms):
                    loss = weights[k] * losses[k]
                    if not loss.requires_grad:
                        norms.append(torch.zeros((), device=self.device))
                        continue
                    grads = torch.autograd.grad(loss, params, retain_graph=i < len(terms) - 1, allow_unused=True)
                    sq = [g.float().pow(2).sum() for g in grads if g is not None]
                    norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=self.device))
        finally:
            model.train(was)
        for k, v in zip(terms, torch.stack(norms).tolist()):
            out[f"gradnorm_{k}"] = _cell(v)
        return out

    # ---- evaluation -----------------------------------------------------------------
    def _eval_batches(self, part: str):
        bs = self.cfg.optim.eval_batch_size
        if self.pipeline == "resident":
            yield from self.res[part].batches(bs)
        else:
            idx = getattr(self.split, part)
            for b in eager_loader(self.data, idx, bs, shuffle=False, seed=0, fill=self.fill,
                                  num_workers=self.cfg.data.num_workers):
                yield b.to(self.device, non_blocking=True)

    @torch.no_grad()
    def predict(self, part: str, conditions: Sequence[str] = CONDITION_NAMES,
                diag: ValDiagnostics | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, int, int]]:
        """Predictions on ``part`` ("val" / "test") per condition: (labels, preds, n_no_input,
        n_reduced) (see the module docstring).

        All conditions of a batch go through the model in one call (rows stacked), with the
        inputs of unavailable modalities filled with NaN. ``diag``: also accumulate the
        validation diagnostics from the same call."""
        model = self.model  # unwrapped: every rank holds the same weights
        model.eval()
        ys = {c: [] for c in conditions}
        ps = {c: [] for c in conditions}
        skipped = {c: 0 for c in conditions}
        reduced = {c: 0 for c in conditions}
        for b in self._eval_batches(part):
            avail = [condition_available(b.present, c) for c in conditions]  # each (B, 3)
            ok = [a.any(dim=1) for a in avail]
            for c, a, k in zip(conditions, avail, ok):
                skipped[c] += int((~k).sum())
                reduced[c] += int((k & (a != condition_available(torch.ones_like(b.present), c)).any(dim=1)).sum())
            avail_all = torch.cat([a[k] for a, k in zip(avail, ok)])  # (B', 3)
            feats = {m: torch.cat([b.feats[m][k] for k in ok]) for m in MODALITIES}
            masks = {m: torch.cat([b.masks[m][k] for k in ok]) for m in MODALITIES}
            feats = hide_unavailable(feats, avail_all, self.fill)  # NaN: a leak would show
            with self._autocast():
                out = model(feats, masks, avail_all, present=avail_all, pooled=self.pipeline == "resident",
                            internals=diag is not None)
            logits = out.logits
            if diag is not None and "svt" in conditions:
                B = len(b.labels)
                sample = torch.cat([torch.arange(B, device=avail_all.device)[k] for k in ok])  # (B',)
                start = sum(int(k.sum()) for c, k in zip(conditions, ok) if conditions.index(c) < conditions.index("svt"))
                k_svt = ok[conditions.index("svt")]
                svt_row = torch.full((B,), -1, dtype=torch.long, device=avail_all.device)
                svt_row[k_svt] = start + torch.arange(int(k_svt.sum()), device=avail_all.device)
                diag.add(out.internals["X"], out.internals["x_hat"], avail_all, sample, svt_row)
            pred = logits.float().argmax(dim=1).cpu().numpy()
            if not torch.isfinite(logits).all():
                raise TrainError(f"fold {self.fold}: non-finite logits in evaluation (a missing input leaked?)")
            s = 0
            for c, k in zip(conditions, ok):
                n = int(k.sum())
                ps[c].append(pred[s:s + n])
                ys[c].append(b.labels[k].cpu().numpy())
                s += n
        return {c: (np.concatenate(ys[c]) if ys[c] else np.zeros(0, np.int64),
                    np.concatenate(ps[c]) if ps[c] else np.zeros(0, np.int64), skipped[c], reduced[c])
                for c in conditions}

    def evaluate(self, part: str = "val", diag: ValDiagnostics | None = None) -> dict[str, dict[str, Any]]:
        """WAR, UAR, confusion per condition on ``part``, plus "avg" over the six missing ones
        (``diag``: see :meth:`predict`)."""
        out = {}
        for c, (y, p, skipped, reduced) in self.predict(part, diag=diag).items():
            if len(y) == 0:
                raise TrainError(f"fold {self.fold}: no {part} utterance has any input under condition {c}")
            out[c] = score(y, p, len(LABELS), skipped, reduced)
        return with_average(out)

    def selection_score(self, val: Mapping[str, Mapping[str, Any]]) -> float:
        p = self.cfg.protocol
        conds = {"all": CONDITION_NAMES, "missing": MISSING_CONDITIONS, "full": ("svt",)}[p.select_conditions]
        return float(np.mean([val[c][p.select_metric] for c in conds]))

    # ---- checkpoints ----------------------------------------------------------------
    def _checkpoint(self, kind: str, val: Mapping[str, Any] | None = None) -> dict[str, Any]:
        ck = {
            "kind": kind, "fold": self.fold, "epoch": self.epoch, "variant": self.cfg.variant,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_format": type(self.model).STATE_FORMAT,
            "model_config": self.mcfg.to_dict(), "train_config": self.cfg.to_dict(),
            "provenance": self.data.provenance, "store": store_fingerprint(self.data),
            "labels": list(LABELS), "modalities": list(MODALITIES),
            "split": {k: [self.data.ids[i] for i in getattr(self.split, k)] for k in ("train", "val", "test")},
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "processes": self.dist.world,  # optim.batch_size is per process: a step saw batch_size x this
        }
        if val is not None:
            ck["val_metrics"] = {c: {k: v for k, v in m.items()} for c, m in val.items()}
        if kind == "last":
            ck["optimizer"] = self.optimizer.state_dict()
            ck["rng"] = {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            ck["rows"] = self.rows
        return ck

    def save_checkpoint(self, kind: str, val: Mapping[str, Any] | None = None) -> Path | None:
        if not self.dist.main:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{kind}.pt"
        _atomic_save(self._checkpoint(kind, val), path)
        return path

    def resume(self) -> bool:
        """Continue from ``last.pt`` when it exists (same config and store required)."""
        path = self.dir / "last.pt"
        if not path.exists():
            return False
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:  # damaged, or not ours: say which and how to go on
            raise TrainError(f"{e}; remove it to restart the fold") from None
        check_model_format(ck, path)
        if _comparable(ck["train_config"]) != _comparable(self.cfg.to_dict()):
            raise TrainError(f"{path}: was made with another config; use another --out or the same config")
        diff = store_difference(ck["store"], store_fingerprint(self.data))
        if diff:
            raise TrainError(f"{path}: was made from another store than {self.data.path} ({diff}); "
                             "use another --out")
        split = {k: [self.data.ids[i] for i in getattr(self.split, k)] for k in ("train", "val", "test")}
        if ck.get("split") is not None and ck["split"] != split:
            raise TrainError(f"{path}: was trained on another train/validation/test split of fold {self.fold} "
                             "(a validation rule of an earlier version?); its epochs were selected on other "
                             "utterances: use another --out")
        if "processes" in ck and int(ck["processes"]) != self.dist.world:  # unknown in older checkpoints
            raise TrainError(f"{path}: was trained with {ck['processes']} process(es), this run has "
                             f"{self.dist.world}; optim.batch_size is per process, so a step would change size "
                             "mid-fold: resume with the same number of processes")
        try:
            self.model.load_state_dict(ck["model"])
        except (RuntimeError, ValueError) as e:
            raise TrainError(f"{path}: its weights do not fit this run's model ({str(e).splitlines()[0]}); "
                             "use another --out") from None
        self.optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.epoch = self.saved = int(ck["epoch"])
        self.best_score = float(ck["best_score"])
        self.best_epoch = int(ck["best_epoch"])
        self.rows = list(ck["rows"])
        self.log(f"fold {self.fold}: resumed after epoch {self.epoch} from {path}")
        return True

    def _write_log(self) -> None:
        if not self.dist.main or not self.rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        cols = list(dict.fromkeys(k for r in self.rows for k in r))  # rows of an older version may lack some
        if "seconds" in cols:
            cols.append(cols.pop(cols.index("seconds")))
        tmp = self.dir / f"log.csv.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols, restval="")
                w.writeheader()
                w.writerows(self.rows)
            os.replace(tmp, self.dir / "log.csv")
        finally:  # interrupted or failed: no partial file left beside the log
            tmp.unlink(missing_ok=True)

    # ---- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, select on validation, evaluate the best on test."""
        while self.epoch < self.cfg.optim.epochs:
            t0 = time.perf_counter()
            losses = self.train_epoch(self.epoch + 1)
            self.end_epoch(self.epoch + 1, losses, t0=t0)
        return self.test_best()

    def end_epoch(self, epoch: int, losses: Mapping[str, float], t0: float, seconds_before: float = 0.0) -> None:
        """After training epoch ``epoch``: validate, select, checkpoint, log. The log's
        seconds are ``seconds_before`` plus the time since ``t0``."""
        epochs = self.cfg.optim.epochs
        grads = self.gradient_norms()
        diag = ValDiagnostics(self.mcfg.reconstruction)
        val = self.evaluate("val", diag=diag)
        sel = self.selection_score(val)
        self.epoch = epoch
        improved = sel > self.best_score
        if improved:
            self.best_score, self.best_epoch = sel, epoch
            self.save_checkpoint("best", val)
        row = {"epoch": epoch, **{k: round(v, 6) for k, v in losses.items() if k != "steps"},
               "steps": losses["steps"],
               "val_war_avg": round(val["avg"]["war"], 6), "val_uar_avg": round(val["avg"]["uar"], 6),
               "val_war_full": round(val["svt"]["war"], 6), "val_uar_full": round(val["svt"]["uar"], 6),
               "val_select": round(sel, 6), "best": int(improved)}
        weights = term_weights(self.mcfg)
        row |= {f"wloss_{k}": round(weights[k] * losses[f"loss_{k}"], 6) for k in DIAG_TERMS}
        row |= grads | diag.columns()
        row["seconds"] = round(seconds_before + time.perf_counter() - t0, 3)
        self.rows.append(row)
        self._write_log()
        self.save_checkpoint("last")
        self.saved = epoch
        self.log(f"fold {self.fold} epoch {epoch}/{epochs}: loss {losses['loss_total']:.4f} "
                 f"val UAR avg {val['avg']['uar']:.4f} full {val['svt']['uar']:.4f}{' *' if improved else ''}")

    def test_best(self) -> dict[str, Any]:
        """Load ``best.pt`` and score the test part under the seven conditions (once)."""
        path = self.dir / "best.pt"
        if self.dist.enabled:
            torch.distributed.barrier()
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:  # missing, damaged or not ours: the fold cannot be tested from it
            what = e if e.unsafe else f"{path}: cannot be read ({e.detail.split(':')[0]})"
            raise TrainError(f"{what}; fold {self.fold}'s best checkpoint is lost: remove {self.dir} and run the "
                             "same command again to train the fold again") from None
        check_model_format(ck, path)
        self.model.load_state_dict(ck["model"])
        test = self.evaluate("test")
        result = {"fold": self.fold, "best_epoch": int(ck["epoch"]), "val_score": float(ck["best_score"]),
                  "n_train": len(self.split.train), "n_val": len(self.split.val), "n_test": len(self.split.test),
                  "processes": self.dist.world, "conditions": test}
        if self.dist.main:
            tmp = self.dir / f"metrics.json.tmp-{os.getpid()}"
            try:
                tmp.write_text(json.dumps(result, indent=1))
                os.replace(tmp, self.dir / "metrics.json")
            finally:
                tmp.unlink(missing_ok=True)
        if self.dist.enabled:
            torch.distributed.barrier()  # the other ranks read the fold's metrics.json next
        return result


# ----------------------------------------------------------------------------------------
# a whole run


def resident_data(data: StoreData, steps: int, device: torch.device, fill: float) -> ResidentData:
    """Every row of ``data`` pooled to ``steps`` steps on ``device`` (the resident pipeline)."""
    return ResidentData(data, np.arange(len(data.ids)), steps, device, fill)


def resolve_config(config: TrainConfig | str | Path | None = None, *, variant: str | None = None,
                   folds: Sequence[int] | None = None, device: str | None = None, seed: int | None = None,
                   epochs: int | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults -> YAML (or a TrainConfig) -> these arguments (CLI flags)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    flags = {"variant": variant, "protocol.folds": list(folds) if folds else None, "device": device,
             "seed": seed, "optim.epochs": epochs}
    # a flag left out is None; an override's None is a value (refused unless its key takes null)
    flags = {k: v for k, v in flags.items() if v is not None}
    return with_overrides(cfg, {**flags, **dict(overrides or {})})


#: What a fold's metrics.json holds (written by ``FoldRecipe.test_best``).
FOLD_RESULT_KEYS = ("fold", "best_epoch", "n_train", "n_val", "n_test", "conditions")


def read_fold_result(p: Path) -> dict[str, Any]:
    """A fold's ``metrics.json``, checked; ``TrainError`` naming the file when it is not one."""
    try:
        r = json.loads(Path(p).read_text())
        lacking = [k for k in FOLD_RESULT_KEYS if k not in r] if isinstance(r, dict) else list(FOLD_RESULT_KEYS)
        if lacking:
            raise KeyError(", ".join(lacking))
        int(r["fold"])
        if not isinstance(r["conditions"], dict) or not r["conditions"]:
            raise ValueError("no conditions")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{p}: not a fold's metrics.json ({type(e).__name__}: {e}); remove it and run the same "
                         "cm-arr-train command again: the fold is tested again from its best checkpoint") from None
    return r


def finished_folds(run_dir: Path) -> list[int]:
    """The folds of ``run_dir`` that have a ``fold<k>/metrics.json``."""
    out = []
    for p in Path(run_dir).glob("fold*/metrics.json"):
        k = p.parent.name[len("fold"):]
        if k.isdigit():
            out.append(int(k))
    return sorted(out)


def collect_fold_results(run_dir: Path, folds: Sequence[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for k in folds:
        p = Path(run_dir) / f"fold{k}" / "metrics.json"
        if p.exists():
            out[k] = read_fold_result(p)
    return out


def check_same_processes(results: Mapping[Any, Mapping[str, Any]], where: str) -> None:
    """Folds trained with different numbers of processes saw different batches per step
    (``optim.batch_size`` is per process): not one protocol, so not averaged together."""
    procs = {k: int(r["processes"]) for k, r in results.items() if "processes" in r}  # unknown in older files
    if len(set(procs.values())) > 1:
        raise TrainError(f"{where}: folds trained with different numbers of processes (optim.batch_size is per "
                         f"process): {', '.join(f'fold {k}: {n}' for k, n in sorted(procs.items()))}; train them "
                         "alike before combining them")


def summary_document(cfg: TrainConfig, fold_results: Mapping[int, Mapping[str, Any]], store: Mapping[str, Any],
                     model_config: Mapping[str, Any]) -> dict[str, Any]:
    per_fold = {k: r["conditions"] for k, r in fold_results.items()}
    extra = {"variant": cfg.variant, "best_epochs": {str(k): r["best_epoch"] for k, r in fold_results.items()},
             "sizes": {str(k): {s: r[f"n_{s}"] for s in ("train", "val", "test")} for k, r in fold_results.items()},
             "store": dict(store), "config": cfg.to_dict(), "model_config": dict(model_config)}
    paper = paper_reference(store.get("corpus"), store.get("label_counts"), cfg.variant)
    if paper is not None:
        extra["paper"] = paper
    return build_metrics(per_fold, LABELS, extra)


def read_run_yaml(path: Path) -> dict:
    """A RUN_DIR YAML file that must be a mapping; ``TrainError`` naming it otherwise."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise TrainError(f"{path}: cannot be read ({str(e).splitlines()[0]}); this RUN_DIR's record of its "
                         "settings is damaged: restore it or use another --out") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise TrainError(f"{path}: expected a mapping, found a {type(doc).__name__} (damaged?); restore it or use "
                         "another --out")
    return doc


def _write_config(run_dir: Path, cfg: TrainConfig, model_cfg: Mapping[str, Any], store: Mapping[str, Any]) -> None:
    """Write RUN_DIR/config.yaml (the resolved TrainConfig, usable as ``--config``) and
    RUN_DIR/model_config.yaml (the CMARRConfig it gives and the store it ran on), or check
    that existing ones match (resume, concurrent fold jobs)."""
    path = run_dir / "config.yaml"
    side = run_dir / "model_config.yaml"
    if path.exists():
        old = read_run_yaml(path)
        if _comparable(old) != _comparable(cfg.to_dict()):
            raise TrainError(f"{run_dir}: holds a run with another config (see its config.yaml); use another --out")
        if side.exists():
            old_side = read_run_yaml(side)
            old_store = old_side.get("store", {})
            if not isinstance(old_store, dict):
                raise TrainError(f"{side}: 'store' is not a mapping (damaged?); remove the file to rewrite it")
            diff = store_difference(old_store, store)
            if diff:
                raise TrainError(f"{run_dir}: holds a run on another store than {store['path']} ({diff}); "
                                 "use another --out")
            if set(store) - set(old_store):  # written by an earlier version: add the fields it lacks
                _write_atomic(side, yaml.safe_dump({**old_side, "store": {**store, **old_store}}, sort_keys=False))
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for p, text in ((side, yaml.safe_dump({"model": dict(model_cfg), "store": dict(store)}, sort_keys=False)),
                    (path, "# resolved configuration of this run: cm-arr-train --config THIS_FILE reruns it\n"
                           + cfg.to_yaml())):
        _write_atomic(p, text)


def _write_atomic(p: Path, text: str) -> None:
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)


def run_training(features_path: str | Path, config: TrainConfig | str | Path | None = None,
                 variant: str | None = None, out_dir: str | Path = "runs/cm-arr",
                 folds: Sequence[int] | None = None, device: str | None = None, seed: int | None = None,
                 epochs: int | None = None, overrides: Mapping[str, Any] | None = None, jobs: int = 1,
                 data: StoreData | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train and evaluate the requested folds; write RUN_DIR; return the metrics document.

    ``jobs > 1`` runs folds as that many concurrent processes (``cm-arr-train --folds k``
    into the same RUN_DIR) and combines their results; on a machine with several GPUs (and
    device "auto" or "cuda") each process gets the visible GPU with the fewest running folds.
    Under torchrun every rank trains the same folds with distributed data parallel; rank 0
    writes the files.
    """
    log = log or (lambda s: None)
    cfg = resolve_config(config, variant=variant, folds=folds, device=device, seed=seed, epochs=epochs,
                         overrides=overrides)
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--out {run_dir}: is a file, not a directory")
    if jobs < 1:
        raise TrainError(f"--jobs {jobs}: must be >= 1")
    if data is None:
        data = StoreData(features_path, load=cfg.data.load)  # refuses altered frames and NaN/Inf ones
    check_store_folds(data)
    all_folds = data.fold_ids
    wanted = list(cfg.protocol.folds) or all_folds
    for k in wanted:
        if k not in all_folds:
            raise SplitError(f"{data.path}: fold {k} has no test utterances (the store's folds are "
                             f"{', '.join(map(str, all_folds))})")
    dist = init_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dev = resolve_device(cfg.device, dist)
    mcfg = model_config_for(cfg, data.dims)
    if dist.enabled and cfg.optim.stack_folds > 1:
        raise TrainError("optim.stack_folds > 1 does not run under torchrun (distributed data parallel); use 1")
    store = store_fingerprint(data)
    if dist.main:
        _write_config(run_dir, cfg, mcfg.to_dict(), store)
    todo = []
    for k in wanted:
        if (run_dir / f"fold{k}" / "metrics.json").exists():
            log(f"fold {k}: already done in {run_dir / f'fold{k}'}")
        else:
            todo.append(k)
    for k in todo:  # every fold's data problems found now, not after the folds before it have trained
        check_fold_data(cfg, data, k)
    if jobs > 1 and len(todo) > 1 and not dist.enabled:
        spread = dev.type == "cuda" and cfg.device in ("auto", "cuda")  # not pinned to one GPU
        _run_jobs(features_path, run_dir, todo, jobs, log, gpus=torch.cuda.device_count() if spread else 0,
                  stack=cfg.optim.stack_folds, device=cfg.device)
    else:
        resident = None
        groups = stack_groups(todo, cfg.optim.stack_folds)
        for g, group in enumerate(groups):
            locks = [FoldLock(run_dir / f"fold{k}", k) for k in group] if dist.main else []
            recipes = []
            try:
                for k in group:
                    recipes.append(FoldRecipe(cfg, data, k, run_dir, dev, dist, log=log if dist.main else None)
                                   .setup(resident))
                    resident = getattr(recipes[-1], "res_full", None)  # one copy for the folds of this process
                if len(recipes) == 1:
                    recipes[0].fit()
                else:
                    log(f"folds {', '.join(map(str, group))}: trained together (optim.stack_folds)")
                    StackedFolds(recipes).fit()
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (extract.base.sigterm_interrupts): say where
                later = [k for rest in groups[g + 1:] for k in rest]
                raise TrainInterrupted(where_stopped(group, recipes, later, cfg.optim.epochs, run_dir),
                                       signal_number(e)) from None
            finally:
                for lock in locks:
                    lock.release()
    missing = [k for k in wanted if not (run_dir / f"fold{k}" / "metrics.json").exists()]
    if missing:
        raise TrainError(f"{run_dir}: folds {missing} produced no metrics")
    # the run's summary covers every finished fold of RUN_DIR (earlier --folds runs into it too)
    done = finished_folds(run_dir)
    results = collect_fold_results(run_dir, done)
    check_same_processes(results, str(run_dir))
    if set(done) != set(wanted):
        log(f"summary over folds {', '.join(map(str, done))}: every finished fold in {run_dir}")
    summary_cfg = with_overrides(cfg, {"protocol.folds": done})
    metrics = summary_document(summary_cfg, results, store, mcfg.to_dict())
    if dist.main:
        write_results(run_dir, metrics, title=f"{cfg.variant} on {Path(features_path).name}")
    return metrics


def where_stopped(group: Sequence[int], recipes: Sequence[FoldRecipe], later: Sequence[int], epochs: int,
                  run_dir: Path) -> str:
    """Where an interrupted group of folds stopped, for the message of ``TrainInterrupted``."""
    parts = []
    for k, r in zip(group, [*recipes, *[None] * (len(group) - len(recipes))]):
        if r is None:
            parts.append(f"fold {k} stopped while being set up")
        elif r.saved >= epochs:
            parts.append(f"fold {k} stopped after its {epochs} epochs, while its best checkpoint was tested")
        else:
            kept = (f"epochs 1-{r.saved} are saved in {run_dir / f'fold{k}' / 'last.pt'}" if r.saved > 1 else
                    f"epoch 1 is saved in {run_dir / f'fold{k}' / 'last.pt'}" if r.saved == 1 else "none saved yet")
            parts.append(f"fold {k} stopped in epoch {r.saved + 1} of {epochs} ({kept})")
    if later:
        parts.append(f"fold{'s' if len(later) > 1 else ''} {', '.join(map(str, later))} not started")
    return "; ".join(parts) + ". Run the same command again to resume"


def signal_number(e: BaseException) -> int:
    """The signal an interruption came from: SIGTERM for ``cmarr.extract.base.Terminated``
    (raised by ``sigterm_interrupts``, which the CLIs install), else SIGINT (Ctrl-C)."""
    from cmarr.extract.base import Terminated

    return int(getattr(e, "signum", signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))


def check_store_folds(data: StoreData) -> None:
    """``TrainError`` naming each session or speaker of the store that spans several folds:
    a fold would test on speakers it also trains on (the leak leave-one-session-out exists
    to prevent)."""
    from cmarr.extract.manifest import fold_leaks

    leaks = fold_leaks(data.table)
    if leaks:
        raise TrainError(f"{data.path}: {'; '.join(leaks)}; give every utterance of a session its session's fold "
                         "(in the manifest, then extract again)")


def check_fold_data(cfg: TrainConfig, data: StoreData, fold: int) -> FoldSplit:
    """The split of ``fold``, after checking that its validation and test parts have some
    input under each of the seven conditions (``TrainError`` naming the store otherwise)."""
    split = split_fold(data.folds, data.labels, data.speakers, fold, cfg.data.validation,
                       cfg.data.val_fraction, cfg.seed, where=str(data.path))
    for part in ("val", "test"):
        have = data.present[getattr(split, part)]  # (n, 3)
        for c, mask in zip(CONDITION_NAMES, CONDITION_MASKS):
            if len(have) and not (have & np.asarray(mask, dtype=bool)).any():
                raise TrainError(f"{data.path}: fold {fold}: no {part} utterance has any input under "
                                 f"condition {c} (the store has none of its modalities for them)")
    return split


def job_env(base: Mapping[str, str], gpu: int | None) -> dict[str, str]:
    """The environment of a fold process: with ``gpu`` (an index among the visible GPUs),
    ``CUDA_VISIBLE_DEVICES`` narrowed to that one GPU (kept in the terms of an existing
    ``CUDA_VISIBLE_DEVICES`` list)."""
    env = dict(base)
    if gpu is not None:
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if visible else str(gpu)
    return env


#: Set in the environment of a ``--jobs`` fold process: the pid of the process that started it.
JOB_PARENT_ENV = "CMARR_JOB_PARENT"


def die_with_job_parent(env: Mapping[str, str] = os.environ) -> None:
    """In a fold process started by ``--jobs`` (``JOB_PARENT_ENV`` set): end this process
    with SIGTERM when that parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so that
    no fold keeps training unseen while a rerun starts it again. Called first thing by
    ``cm-arr-train``; a parent already gone ends it at once."""
    parent = env.get(JOB_PARENT_ENV)
    if not parent:
        return
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except Exception:
        return  # not Linux: the fold locks still refuse a second copy
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_jobs(features_path, run_dir: Path, folds: Sequence[int], jobs: int, log, gpus: int = 0,
              stack: int = 1, device: str = "auto") -> None:
    """Run ``cm-arr-train --folds k`` processes, ``jobs`` at a time, into ``run_dir``; with
    ``gpus > 1``, each on the GPU with the fewest running processes. With ``stack > 1`` a
    process trains a group of that many folds together (``optim.stack_folds``). ``device``
    and ``stack`` are this run's (config.yaml may hold an earlier run's). The fold processes
    end when this one ends, however it ends."""
    pending = [",".join(map(str, g)) for g in stack_groups(folds, stack)]
    running: list[tuple[str, subprocess.Popen, int | None]] = []
    failed = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                k = pending.pop(0)
                gpu = None
                if gpus > 1:
                    load = [sum(g == i for _, _, g in running) for i in range(gpus)]
                    gpu = load.index(min(load))
                cmd = [sys.executable, "-m", "cmarr.pipelines.train_cli", "--features", str(features_path),
                       "--config", str(run_dir / "config.yaml"), "--folds", str(k), "--out", str(run_dir),
                       "--quiet", "--stack-folds", str(stack), "--device", str(device)]
                what = f"folds {k}" if "," in k else f"fold {k}"
                log(f"{what}: started as a separate process" + (f" on GPU {gpu}" if gpu is not None else ""))
                env = {**job_env(os.environ, gpu), JOB_PARENT_ENV: str(os.getpid())}
                running.append((k, subprocess.Popen(cmd, env=env), gpu))
            time.sleep(0.2)
            for k, p, g in list(running):
                if p.poll() is not None:
                    running.remove((k, p, g))
                    if p.returncode != 0:
                        failed.append(k)
                    log(f"{'folds' if ',' in k else 'fold'} {k}: process ended ({p.returncode})")
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the fold processes are stopped below and say where
        stopped = ", ".join(k for k, _, _ in running) or "(none)"
        later = f"; fold{'s' if len(pending) > 1 or ',' in ''.join(pending) else ''} {', '.join(pending)} not started" \
            if pending else ""
        raise TrainInterrupted(f"the processes of folds {stopped} were stopped (each says where above){later}. "
                               "Run the same command again to resume", signal_number(e)) from None
    finally:  # interrupted (Ctrl-C, an error): the fold processes stop too; a rerun resumes them
        for _, p, _ in running:
            if p.poll() is None:
                p.terminate()
        for _, p, _ in running:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    if failed:
        raise TrainError(f"{run_dir}: the processes of folds {failed} failed (see their output above)")


# ----------------------------------------------------------------------------------------
# representations for the t-SNE figure (Fig. 5)


def collect_reps(checkpoint: str | Path, store: str | Path | StoreData, fold: int | None = None,
                 condition: str = "t", part: str = "test", device: str = "cpu",
                 batch_size: int = 256) -> dict[str, np.ndarray]:
    """Pooled real and reconstructed representations of one fold's ``part`` under ``condition``.

    Returns ``{"labels": (N,), "utterance_ids": (N,), "real_<m>": (N, d), "recon_<m>": (N, d),
    "recon_mask": (N, 3), "present_mask": (N, 3)}``: ``real_m`` is the pooled ``X_m`` of the
    true features (NaN where the store lacks ``m``), ``recon_m`` the pooled reconstruction
    ``X^_m`` where ``m`` was not available under ``condition`` (else NaN). Utterances with no
    input in the condition are left out (their count is ``n_no_input``). ``fold`` (optional)
    is checked against the checkpoint's fold; the split is the one stored in the checkpoint.
    Unlike evaluation, the true features of unavailable modalities are passed in (as
    ``present``) so that ``real_m`` can be compared with ``recon_m`` (Fig. 5); the logits
    are not used.
    """
    from cmarr.model import CMARR, CMARRConfig

    ck = load_checkpoint(checkpoint)
    check_model_format(ck, checkpoint)
    if fold is not None and int(fold) != int(ck["fold"]):
        raise TrainError(f"{checkpoint}: is the checkpoint of fold {ck['fold']}, not fold {fold}")
    if condition not in CONDITION_NAMES:
        raise TrainError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITION_NAMES)}")
    data = store if isinstance(store, StoreData) else StoreData(store)
    diff = store_difference(ck["store"], store_fingerprint(data))
    if diff:
        raise TrainError(f"{checkpoint}: was trained on another store than {data.path} ({diff})")
    mdict = dict(ck["model_config"])
    model = CMARR(CMARRConfig(**mdict)).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    ids = ck["split"][part]
    pos = {u: i for i, u in enumerate(data.ids)}
    idx = np.array([pos[u] for u in ids], dtype=np.int64)
    out: dict[str, list] = {"labels": [], "utterance_ids": [], "recon_mask": [], "present_mask": []}
    for m in MODALITIES:
        out[f"real_{m}"], out[f"recon_{m}"] = [], []
    n_no_input = 0
    fill = fill_value(TrainConfig().data.fill_absent)
    with torch.no_grad():
        for b in eager_loader(data, idx, batch_size, shuffle=False, seed=0, fill=fill):
            b = b.to(device)
            avail = condition_available(b.present, condition)
            ok = avail.any(dim=1)
            n_no_input += int((~ok).sum())
            feats = {m: b.feats[m][ok] for m in MODALITIES}
            masks = {m: b.masks[m][ok] for m in MODALITIES}
            res = model(feats, masks, avail[ok], present=b.present[ok], reps=True).reps
            out["labels"].append(b.labels[ok].cpu().numpy())
            out["utterance_ids"].append(np.array([data.ids[i] for i in b.index[ok].cpu().numpy()]))
            out["recon_mask"].append(res["recon_mask"].cpu().numpy())
            out["present_mask"].append(res["present_mask"].cpu().numpy())
            for m in MODALITIES:
                out[f"real_{m}"].append(res["real"][m].float().cpu().numpy())
                out[f"recon_{m}"].append(res["recon"][m].float().cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays["n_no_input"] = np.array(n_no_input)
    return arrays
