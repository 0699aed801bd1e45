"""A training run: the requested folds of the leave-one-session-out protocol (Sec. 4.2),
trained, tested and summarised into RUN_DIR (:mod:`.run_dir`).

:func:`run_training` resolves the config (defaults -> YAML -> flags), checks the store and
every fold's data before any fold trains, and trains the folds one after another in this
process (:class:`.fold.FoldRecipe`), as concurrent processes (``jobs > 1``, :mod:`.jobs`), or
under torchrun with distributed data parallel (every rank trains the same folds; rank 0
writes the files). A fold being trained is locked (:func:`.run_dir.lock_fold`). Ctrl-C or
SIGTERM (``cmarr.extract.interrupts.sigterm_interrupts``) stops a run with
:class:`.errors.TrainInterrupted`, which says where each fold stopped; rerunning the same
command resumes. The run's summary covers every finished fold of RUN_DIR.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config import TrainConfig, load_config, with_overrides
from .data import StoreData
from .errors import TrainError, TrainInterrupted, signal_number
from .fold import FoldRecipe, check_fold_data, model_config_for, summary_writer_class
from .jobs import run_jobs
from .metrics import write_results
from .run_dir import (
    check_same_processes,
    collect_fold_results,
    finished_folds,
    lock_fold,
    store_fingerprint,
    summary_document,
    write_run_config,
)
from .runtime import EpochClock, init_distributed, resolve_device
from .validation import SplitError


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


def check_store_folds(data: StoreData) -> None:
    """``TrainError`` naming each session or speaker of the store that spans several folds:
    a fold would test on speakers it also trains on (the leak leave-one-session-out exists
    to prevent)."""
    from cmarr.extract.corpora.manifest import fold_leaks

    leaks = fold_leaks(data.table)
    if leaks:
        raise TrainError(f"{data.path}: {'; '.join(leaks)}; give every utterance of a session its session's fold "
                         "(in the manifest, then extract again)")


def where_stopped(fold: int, recipe: FoldRecipe | None, later: Sequence[int], epochs: int, run_dir: Path) -> str:
    """Where an interrupted fold stopped, for the message of ``TrainInterrupted``."""
    last = run_dir / f"fold{fold}" / "last.pt"
    if recipe is None:
        parts = [f"fold {fold} stopped while being set up"]
    elif recipe.saved >= epochs:
        parts = [f"fold {fold} stopped after its {epochs} epochs, while its best checkpoint was tested"]
    else:
        kept = (f"epochs 1-{recipe.saved} are saved in {last}" if recipe.saved > 1 else
                f"epoch 1 is saved in {last}" if recipe.saved == 1 else "none saved yet")
        parts = [f"fold {fold} stopped in epoch {recipe.saved + 1} of {epochs} ({kept})"]
    if later:
        parts.append(f"fold{'s' if len(later) > 1 else ''} {', '.join(map(str, later))} not started")
    return "; ".join(parts) + ". Run the same command again to resume"


def run_training(features_path: str | Path, config: TrainConfig | str | Path | None = None,
                 variant: str | None = None, out_dir: str | Path = "runs/cm-arr",
                 folds: Sequence[int] | None = None, device: str | None = None, seed: int | None = None,
                 epochs: int | None = None, overrides: Mapping[str, Any] | None = None, jobs: int = 1,
                 data: StoreData | None = None, log: Callable[[str], None] | None = print,
                 epoch_lines: bool = True) -> dict[str, Any]:
    """Train and evaluate the requested folds; write RUN_DIR; return the metrics document.

    ``jobs > 1`` runs folds as that many concurrent processes (``cm-arr-train --folds k``
    into the same RUN_DIR) and combines their results; on a machine with several GPUs (and
    device "auto" or "cuda") each process gets the visible GPU with the fewest running folds.
    Under torchrun every rank trains the same folds with distributed data parallel; rank 0
    writes the files. ``data``: the store already read (``features_path`` then only names it).
    ``log`` receives the run's messages; ``epoch_lines=False`` leaves out the per-epoch lines
    (``cm-arr-train --quiet``). The ETAs of those lines count every fold this process trains.
    """
    log = log or (lambda s: None)
    cfg = resolve_config(config, variant=variant, folds=folds, device=device, seed=seed, epochs=epochs,
                         overrides=overrides)
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--out {run_dir}: is a file, not a directory")
    if jobs < 1:
        raise TrainError(f"--jobs {jobs}: must be >= 1")
    if cfg.log.tensorboard:
        summary_writer_class()  # a missing package is found before anything trains
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
    store = store_fingerprint(data)
    if dist.main:
        write_run_config(run_dir, cfg, mcfg.to_dict(), store)
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
        run_jobs(features_path, run_dir, todo, jobs, log, gpus=torch.cuda.device_count() if spread else 0,
                 device=cfg.device)
    else:
        resident = None
        clock = EpochClock(len(todo) * cfg.optim.epochs)  # a resumed fold takes off what it trained
        for i, k in enumerate(todo):
            lock = lock_fold(run_dir, k) if dist.main else None
            recipe = None
            try:
                recipe = FoldRecipe(cfg, data, k, run_dir, dev, dist, log=log if dist.main else None, clock=clock,
                                    epoch_lines=epoch_lines).setup(resident)
                resident = getattr(recipe, "res_full", None)  # one copy for the folds of this process
                recipe.fit()
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (extract.interrupts.sigterm_interrupts): say where
                raise TrainInterrupted(where_stopped(k, recipe, todo[i + 1:], cfg.optim.epochs, run_dir),
                                       signal_number(e)) from None
            finally:
                if lock is not None:
                    lock.release()
    missing = [k for k in wanted if not (run_dir / f"fold{k}" / "metrics.json").exists()]
    if missing:
        raise TrainError(f"{run_dir}: folds {missing} produced no metrics")
    # the run's summary covers every finished fold of RUN_DIR (those of other --folds runs into it too)
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
