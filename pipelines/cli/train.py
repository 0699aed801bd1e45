"""``cm-arr-train``: train and evaluate CM-ARR (or a Table 3 variant) on a feature store.

    cm-arr-train --features FEATS.h5 [--config CONFIG.yaml] [--folds 1,2,...]
                 [--variant cm-arr|baseline|no-udcl|no-spcl|no-attention|point|baseline-missing]
                 [--out RUN_DIR] [--device auto|cpu|cuda] [--seed N] [--epochs N]
                 [--jobs N] [--set optim.lr=1e-4 ...] [--quiet] [--version]

Writes RUN_DIR (see :mod:`cmarr.pipelines.run_dir`) and prints the Table 2 layout at the end.
While it trains, each epoch ends with a line on stderr (loss, validation UAR, ``*`` for a new
best epoch, the epoch's seconds and the ETAs of the fold and the run; see
:mod:`cmarr.pipelines.fold`); ``--quiet`` leaves those lines out, not the table. Under
``torchrun --nproc-per-node N -m cmarr.pipelines.cli.train ...`` it trains with distributed
data parallel. Rerunning with the same RUN_DIR resumes an interrupted run.

Exit status, as in :mod:`cmarr.cli`: 0 done; 2 bad input (store, config, ``--set``, RUN_DIR),
one line; 130 / 143 (128 + the signal number) for Ctrl-C / SIGTERM, with a line saying which
fold and epoch it stopped at. 1 (problems found in the data) is not used: every data problem
is found before the first fold trains and is bad input.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from cmarr.cli import EXIT_CODES_HELP, EXIT_SIGNAL_BASE, EXIT_USAGE, fail, version_option

from ..config import packaged_configs

app = typer.Typer(add_completion=False, help="Train and evaluate CM-ARR on a feature store.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def parse_folds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        folds = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"--folds {text!r}: expected comma-separated fold numbers, e.g. 1,2,3") from None
    if not folds or any(f < 1 for f in folds):
        raise typer.BadParameter(f"--folds {text!r}: folds are 1-based")
    if len(set(folds)) != len(folds):
        raise typer.BadParameter(f"--folds {text!r}: names a fold more than once")
    return folds


@app.command(epilog=EXIT_CODES_HELP)
def train(
    features: Path = typer.Option(
        ..., "--features",
        help="Feature store (HDF5) made by cm-arr-extract features (shards joined with cm-arr-features merge)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help=f"YAML config: a path, or a packaged one by name ({', '.join(packaged_configs())})."),
    folds: Optional[str] = typer.Option(None, "--folds", help="Comma-separated folds to run (default: all)."),
    variant: Optional[str] = typer.Option(
        None, "--variant",
        help="cm-arr | baseline | no-udcl | no-spcl | no-attention | point (Table 3) | baseline-missing "
             "(the baseline trained on random missing conditions, as CM-ARR is)"),
    out_dir: Path = typer.Option(Path("runs/cm-arr"), "--out", help="RUN_DIR for config, logs, checkpoints, metrics."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="The run's seed (overrides the config's): initial weights, validation split, batch "
                               "order, training conditions."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override optim.epochs."),
    jobs: int = typer.Option(
        1, "--jobs", help="Run folds as this many concurrent processes (spread over the visible GPUs)."),
    set_: List[str] = typer.Option([], "--set", help="Override any config key: --set optim.lr=1e-4"),
    quiet: bool = typer.Option(False, "--quiet", help="No per-epoch lines (the results table is still printed)."),
    version: Optional[bool] = version_option("cm-arr-train"),
) -> None:
    """Train and evaluate CM-ARR (or a Table 3 variant) on a feature store: the requested
    folds into RUN_DIR, then print the Table 2 layout. Rerun the same command to resume."""
    from cmarr.extract.interrupts import sigterm_interrupts
    from cmarr.extract.store import StoreError

    from ..config import VARIANT_NAMES, ConfigError, parse_set_option
    from ..data import DataError
    from ..errors import TrainError, TrainInterrupted, signal_number
    from ..jobs import JOB_PARENT_ENV, die_with_job_parent
    from ..metrics import rich_table
    from ..train import run_training
    from ..validation import SplitError

    die_with_job_parent()  # a --jobs fold process ends with the process that started it
    try:
        fold_list = parse_folds(folds)
        overrides = dict(parse_set_option(s) for s in set_)
        if variant is not None:
            if variant not in VARIANT_NAMES:
                raise ConfigError(f"--variant {variant!r}: choose one of {', '.join(VARIANT_NAMES)}")
        with sigterm_interrupts():  # a scheduler's SIGTERM stops the run as Ctrl-C does
            metrics = run_training(features, config=config, variant=variant, out_dir=out_dir, folds=fold_list,
                                   device=device, seed=seed, epochs=epochs, overrides=overrides, jobs=jobs,
                                   log=lambda s: err.print(s, highlight=False), epoch_lines=not quiet)
    except (ConfigError, DataError, SplitError, StoreError, TrainError, typer.BadParameter) as e:
        fail(str(e), EXIT_USAGE, err)
    except KeyboardInterrupt as e:  # Ctrl-C (SIGINT) or SIGTERM: where it stopped; 128 + the signal number
        where = (str(e) if isinstance(e, TrainInterrupted) else "") or \
            "Run the same command again to resume (finished folds and saved epochs are kept)"
        err.print(f"[bold yellow]interrupted:[/] {where}", highlight=False)
        raise typer.Exit(EXIT_SIGNAL_BASE + signal_number(e)) from None
    # the table: rank 0 only under torchrun; not by a --jobs fold process (the command that started it prints the run's)
    if os.environ.get("RANK", "0") == "0" and not os.environ.get(JOB_PARENT_ENV):
        out.print(rich_table(metrics, title=f"{metrics['variant']}: WAR / UAR (%) on {features.name}"))
        out.print(f"results in {out_dir}/ (metrics.json, results.md, config.yaml, fold*/)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
