"""One fold of the leave-one-session-out protocol (Sec. 4.2), trained and evaluated in named stages.

:class:`FoldRecipe`: ``setup`` (split, model, optimizer, data pipeline, resume),
``train_epoch``, ``end_epoch`` (validation, selection, checkpoints, log), ``test_best``, and
``fit``, which runs them. What it writes into ``RUN_DIR/fold<k>/`` is listed in
:mod:`.run_dir`; the log's columns are the losses, validation WAR/UAR, the selection score
and :data:`.diagnostics.DIAGNOSTIC_COLUMNS`.

Choices the paper leaves open, made here (config fields in brackets):

- Epoch selection on validation only [data.validation, protocol.select_metric,
  protocol.select_conditions]; the test part is evaluated once, with the best checkpoint.
- Training conditions [protocol.train_conditions] via :func:`.conditions.sample_conditions`.
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
- TensorBoard event files beside log.csv, one run per fold in ``RUN_DIR/tensorboard/fold<k>/``
  [log.tensorboard].

Each epoch ends with one line (``log``; ``cm-arr-train`` prints it on stderr unless
``--quiet``): the fold and epoch, the mean training loss, the validation UAR averaged over the
six missing conditions and under the full one, ``*`` when the epoch is the new best (its
weights were saved as ``best.pt``), the epoch's wall seconds (training, validation and its
checkpoints) and the ETAs of the fold and of the run (:class:`.runtime.EpochClock`).
"""
from __future__ import annotations

import contextlib
import csv
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cmarr.extract.base import LABELS, MODALITIES
from cmarr.model import CMARR, LOSS_NAMES, CMARRConfig

from .checkpoint import CheckpointError, check_checkpoint, load_checkpoint, save_checkpoint
from .conditions import (
    CONDITION_MASKS,
    CONDITION_NAMES,
    FULL_CONDITION,
    MISSING_CONDITIONS,
    condition_available,
    resolve_train_conditions,
    sample_conditions,
)
from .config import ConfigError, TrainConfig
from .data import Batch, ResidentData, ResidentSubset, StoreData, eager_loader, fill_value, hide_unavailable
from .diagnostics import DIAG_TERMS, ValDiagnostics, gradient_norms, term_weights
from .errors import TrainError
from .metrics import score, with_average
from .run_dir import RUN_FORMAT, run_identity, store_difference, store_fingerprint, write_fold_result
from .runtime import DistInfo, EpochClock, compile_with, derive_seed, format_duration
from .validation import FoldSplit, split_fold


def model_config_for(cfg: TrainConfig, dims: Mapping[str, int]) -> CMARRConfig:
    """The CMARRConfig of a run: the variant's row of Table 3, then ``cfg.model`` overrides."""
    try:
        return CMARRConfig.for_variant(cfg.variant, **{"dims": dict(dims), "num_classes": len(LABELS),
                                                       **dict(cfg.model)})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model config: {e}") from None


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


def summary_writer_class() -> type:
    """torch's TensorBoard ``SummaryWriter`` (for ``log.tensorboard``); ``TrainError`` when the
    tensorboard package is not installed, so that a run finds out before it trains."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("log.tensorboard is on, but the tensorboard package is not installed: pip install "
                         "tensorboard, or --set log.tensorboard=false") from None
    return SummaryWriter


def resident_data(data: StoreData, steps: int, device: torch.device, fill: float) -> ResidentData:
    """Every row of ``data`` pooled to ``steps`` steps on ``device`` (the resident pipeline)."""
    return ResidentData(data, np.arange(len(data.ids)), steps, device, fill)


class FoldRecipe:
    """Trains and evaluates one fold. Stages: setup, train_epoch, evaluate, save_checkpoint, resume.

    ``log`` receives the fold's messages (resumed, per-epoch lines); ``epoch_lines=False``
    leaves out the per-epoch lines. ``clock``: the run's :class:`.runtime.EpochClock`, shared
    by the folds of one process so that the run's ETA counts the folds still to come (default:
    a clock of this fold alone)."""

    def __init__(self, cfg: TrainConfig, data: StoreData, fold: int, run_dir: str | Path,
                 device: torch.device, dist: DistInfo = DistInfo(), log: Callable[[str], None] | None = None,
                 clock: EpochClock | None = None, epoch_lines: bool = True):
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
        self.clock = clock or EpochClock(cfg.optim.epochs)
        self.epoch_lines = epoch_lines
        self._tb = None  # the TensorBoard writer (log.tensorboard), opened at the first epoch logged

    # ---- setup ----------------------------------------------------------------------
    def setup(self, resident: ResidentData | None = None) -> "FoldRecipe":
        """``resident``: the pooled tensors of every row of the store on this device, shared
        by the folds of one process (built here when not given and the pipeline is resident)."""
        cfg, data = self.cfg, self.data
        self.split: FoldSplit = check_fold_data(cfg, data, self.fold)  # found now, not after the fold has trained
        self.mcfg = model_config_for(cfg, data.dims)
        self.mode = resolve_train_conditions(cfg.protocol.train_conditions, self.mcfg.train_missing)
        torch.manual_seed(derive_seed(cfg.seed, self.fold, 0))
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
            pipeline = "resident" if self.device.type == "cuda" else "eager"
        self.pipeline = pipeline
        if pipeline == "resident":
            self.res_full = resident or resident_data(data, self.mcfg.seq_len, self.device, self.fill)
            self.res = {name: ResidentSubset(self.res_full, getattr(self.split, name))
                        for name in ("train", "val", "test")}
            self.train_index = self.res["train"].rows
        self.resume()
        self.clock.skip(self.epoch)
        return self

    def _maybe_compile(self) -> Callable[..., Any]:
        """The training step's model: ``torch.compile``d as ``optim.compile`` says, else the model."""
        c = self.cfg.optim.compile
        if c == "on" or (c == "auto" and self.device.type == "cuda"):
            o = self.cfg.optim
            # static shapes: a fold has at most two batch sizes (full, last), each its own graph,
            # rather than one dynamic-shape graph serving every step after the first remainder
            return compile_with(self.net, o)
        return self.net

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``optim.amp`` asks for it, else nothing."""
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- training -------------------------------------------------------------------
    def _train_order(self, epoch: int) -> torch.Tensor:
        """Positions in the training part, in this rank's order for ``epoch`` (seeded by seed,
        fold, epoch)."""
        n = len(self.split.train)
        g = torch.Generator()
        g.manual_seed(derive_seed(self.cfg.seed, self.fold, epoch, 1))
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
        gen.manual_seed(derive_seed(self.cfg.seed, self.fold, epoch, 2, self.dist.rank))
        return gen

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this fold's training part; returns mean losses."""
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
        if not np.isfinite(vals[-1]):
            raise TrainError(f"fold {self.fold}, epoch {epoch}: the training loss is not finite ({vals[-1]})")
        return {f"loss_{k}": v for k, v in zip(names, vals)} | {"steps": steps}

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
            gen.manual_seed(derive_seed(self.cfg.seed, self.fold, 0, 3))
            self._diag_batch = (b, sample_conditions(b.present, self.mode, gen))
        return self._diag_batch

    def gradient_norms(self) -> dict[str, Any]:
        """``gradnorm_<t>`` of :data:`.diagnostics.DIAGNOSTIC_COLUMNS` on :meth:`diagnostic_batch`,
        measured on the unwrapped model (no DDP hooks), without autocast (float32)."""
        b, available = self.diagnostic_batch() or (None, None)
        return gradient_norms(self.model, b, available, term_weights(self.mcfg), pooled=self.pipeline == "resident")

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
            if diag is not None and FULL_CONDITION in conditions:
                B = len(b.labels)
                sample = torch.cat([torch.arange(B, device=avail_all.device)[k] for k in ok])  # (B',)
                full = conditions.index(FULL_CONDITION)
                start = sum(int(k.sum()) for c, k in zip(conditions, ok) if conditions.index(c) < full)
                k_svt = ok[full]
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
        """The validation score that picks the best epoch (``protocol.select_metric`` averaged
        over ``protocol.select_conditions``)."""
        p = self.cfg.protocol
        conds = {"all": CONDITION_NAMES, "missing": MISSING_CONDITIONS, "full": (FULL_CONDITION,)}[p.select_conditions]
        return float(np.mean([val[c][p.select_metric] for c in conds]))

    # ---- checkpoints ----------------------------------------------------------------
    def _checkpoint(self, kind: str, val: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fields of ``best.pt`` / ``last.pt`` (``last`` adds the optimizer, RNG and log)."""
        ck = {
            "kind": kind, "fold": self.fold, "epoch": self.epoch, "variant": self.cfg.variant,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "format": RUN_FORMAT, "model_format": type(self.model).STATE_FORMAT,
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
        """Write ``fold<k>/<kind>.pt`` whole (rank 0 only); its path."""
        if not self.dist.main:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{kind}.pt"
        save_checkpoint(self._checkpoint(kind, val), path)
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
        check_checkpoint(ck, path)
        if run_identity(ck["train_config"]) != run_identity(self.cfg.to_dict()):
            raise TrainError(f"{path}: was made with another config; use another --out or the same config")
        diff = store_difference(ck["store"], store_fingerprint(self.data))
        if diff:
            raise TrainError(f"{path}: was made from another store than {self.data.path} ({diff}); "
                             "use another --out")
        split = {k: [self.data.ids[i] for i in getattr(self.split, k)] for k in ("train", "val", "test")}
        if ck["split"] != split:
            raise TrainError(f"{path}: was trained on another train/validation/test split of fold {self.fold}; "
                             "its epochs were selected on other utterances: use another --out")
        if int(ck["processes"]) != self.dist.world:
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
        """Write ``fold<k>/log.csv`` (one row per epoch so far) whole (rank 0 only)."""
        if not self.dist.main or not self.rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"log.csv.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
                w.writeheader()
                w.writerows(self.rows)
            os.replace(tmp, self.dir / "log.csv")
        finally:  # interrupted or failed: no partial file left beside the log
            tmp.unlink(missing_ok=True)

    # ---- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, select on validation, evaluate the best on test."""
        try:
            while self.epoch < self.cfg.optim.epochs:
                t0 = time.perf_counter()
                losses = self.train_epoch(self.epoch + 1)
                self.end_epoch(self.epoch + 1, losses, t0=t0)
        finally:  # interrupted too: what was logged is on disk
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return self.test_best()

    def end_epoch(self, epoch: int, losses: Mapping[str, float], t0: float) -> None:
        """After training epoch ``epoch``: validate, select, checkpoint, log (the log's seconds
        are the time since ``t0``)."""
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
               "val_war_full": round(val[FULL_CONDITION]["war"], 6),
               "val_uar_full": round(val[FULL_CONDITION]["uar"], 6),
               "val_select": round(sel, 6), "best": int(improved)}
        weights = term_weights(self.mcfg)
        row |= {f"wloss_{k}": round(weights[k] * losses[f"loss_{k}"], 6) for k in DIAG_TERMS}
        row |= grads | diag.columns()
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.rows.append(row)
        self._write_log()
        self.save_checkpoint("last")
        self.saved = epoch
        self.write_tensorboard(epoch, row, val)
        took = time.perf_counter() - t0
        self.clock.record(took)
        if self.epoch_lines:
            self.log(f"fold {self.fold} epoch {epoch}/{epochs}: loss {losses['loss_total']:.4f} "
                     f"val UAR avg {val['avg']['uar']:.4f} full {val[FULL_CONDITION]['uar']:.4f}"
                     f"{' *' if improved else '  '} | {took:.1f} s, ETA fold "
                     f"{format_duration(self.clock.eta(epochs - epoch))}, run {format_duration(self.clock.eta())}")

    def write_tensorboard(self, epoch: int, row: Mapping[str, Any], val: Mapping[str, Mapping[str, Any]]) -> None:
        """Log epoch ``epoch`` to the fold's TensorBoard run when ``log.tensorboard`` is on (rank
        0): the loss columns of ``row`` (log.csv's), WAR and UAR of ``val`` per condition, the
        selection score, the learning rate and the epoch's seconds; see
        :class:`.config.LogConfig`. The writer is opened at the first epoch this process logs,
        with ``purge_step`` at that epoch: events a previous process logged from there on
        (epochs trained again after a resume) are dropped by TensorBoard's reader."""
        if not (self.cfg.log.tensorboard and self.dist.main):
            return
        if self._tb is None:
            self._tb = summary_writer_class()(log_dir=str(self.dir.parent / "tensorboard" / f"fold{self.fold}"),
                                              purge_step=epoch)
        tb = self._tb
        for k, v in row.items():
            if k.startswith(("loss_", "wloss_")) and v is not None and v != "":
                tb.add_scalar(f"train/{k}", float(v), epoch)
        for c, m in val.items():
            tb.add_scalar(f"val_war/{c}", float(m["war"]), epoch)
            tb.add_scalar(f"val_uar/{c}", float(m["uar"]), epoch)
        tb.add_scalar("val/select", float(row["val_select"]), epoch)
        tb.add_scalar("optim/lr", float(self.optimizer.param_groups[0]["lr"]), epoch)
        tb.add_scalar("time/epoch_seconds", float(row["seconds"]), epoch)
        tb.flush()  # a kill loses no logged epoch

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
        check_checkpoint(ck, path)
        self.model.load_state_dict(ck["model"])
        test = self.evaluate("test")
        result = {"fold": self.fold, "best_epoch": int(ck["epoch"]), "val_score": float(ck["best_score"]),
                  "n_train": len(self.split.train), "n_val": len(self.split.val), "n_test": len(self.split.test),
                  "processes": self.dist.world, "conditions": test}
        if self.dist.main:
            write_fold_result(self.dir, result)
        if self.dist.enabled:
            torch.distributed.barrier()  # the other ranks read the fold's metrics.json next
        return result
