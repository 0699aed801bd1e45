"""``cm-arr-results``: combine per-fold RUN_DIRs into one result, or draw a run's figures.

    cm-arr-results RUN_DIR_A RUN_DIR_B ... --out COMBINED_DIR [--overwrite] [--allow-unfinished]
    cm-arr-results RUN_DIR ... --plots [--tsne [--tsne-fold K] [--features STORE.h5]]

Combine (``--out``): what may be combined and what is written, :mod:`cmarr.pipelines.combine`.
Plots (``--plots``): each RUN_DIR's confusion matrices and training curves, with ``--tsne``
the t-SNE of Fig. 5, into ``RUN_DIR/plots/`` (:func:`cmarr.pipelines.plots.write_run_plots`,
the writers the demo uses). Every RUN_DIR is checked before any figure is drawn.

Exit status, as in :mod:`cmarr.cli`: 0 done; 2 bad input or usage (a RUN_DIR that is not one,
has no finished fold or cannot be combined, an unusable ``--out``), one line; 130 / 143 for
Ctrl-C / SIGTERM (files are written whole: what is there is complete). 1 (problems found in
the data) is not used.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from cmarr.cli import EXIT_CODES_HELP, EXIT_SIGNAL_BASE, EXIT_USAGE, fail, version_option

from ..combine import CombineError, combine_runs
from ..config import ConfigError
from ..errors import TrainError, signal_number
from ..metrics import rich_table

app = typer.Typer(add_completion=False,
                  help="Combine cm-arr-train RUN_DIRs into one result, or draw a RUN_DIR's figures.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@app.command(epilog=EXIT_CODES_HELP)
def results(run_dirs: List[Path] = typer.Argument(..., help="RUN_DIRs written by cm-arr-train."),
            out_dir: Optional[Path] = typer.Option(
                None, "--out", help="Combine: where to write metrics.json and results.md."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Combine: replace results already in --out."),
            allow_unfinished: bool = typer.Option(False, "--allow-unfinished",
                                                  help="Combine: use the finished folds even if a RUN_DIR "
                                                       "has unfinished ones."),
            plots: bool = typer.Option(False, "--plots",
                                       help="Draw each RUN_DIR's confusion matrices (full and missing conditions) "
                                            "and training curves into RUN_DIR/plots/."),
            tsne: bool = typer.Option(False, "--tsne",
                                      help="With --plots: also the t-SNE of reconstructed against real "
                                           "representations (Fig. 5) of one fold's test part (minutes on a "
                                           "full IEMOCAP session)."),
            tsne_fold: Optional[int] = typer.Option(None, "--tsne-fold",
                                                    help="With --tsne: the fold to draw (default: the first "
                                                         "finished one)."),
            features: Optional[Path] = typer.Option(None, "--features",
                                                    help="With --tsne: the feature store the run trained on, "
                                                         "if it moved (default: the path recorded in "
                                                         "RUN_DIR/model_config.yaml)."),
            version: Optional[bool] = version_option("cm-arr-results")) -> None:
    """Combine the finished folds of RUN_DIRs (of one config and store; several seeds as
    repeats) into one metrics.json and results.md and print the table (--out), or draw each
    RUN_DIR's figures into RUN_DIR/plots/ (--plots)."""
    if plots == (out_dir is not None):
        fail("give --out COMBINED_DIR to combine RUN_DIRs, or --plots to draw each RUN_DIR's figures (one at a time)",
             EXIT_USAGE, err)
    if not plots:
        used = [f for f, on in (("--tsne", tsne), ("--tsne-fold", tsne_fold is not None),
                                ("--features", features is not None)) if on]
        if used:
            fail(f"{', '.join(used)}: only with --plots", EXIT_USAGE, err)
        return combine(run_dirs, out_dir, overwrite, allow_unfinished)
    used = [f for f, on in (("--overwrite", overwrite), ("--allow-unfinished", allow_unfinished)) if on]
    used += [f for f, on in (("--tsne-fold", tsne_fold is not None), ("--features", features is not None))
             if on and not tsne]
    if used:
        fail(f"{', '.join(used)}: not with --plots{'' if tsne else ' alone (add --tsne)'}", EXIT_USAGE, err)
    draw(run_dirs, tsne, tsne_fold, features)


def combine(run_dirs: List[Path], out_dir: Path, overwrite: bool, allow_unfinished: bool) -> None:
    """Combine mode (``--out``)."""
    from cmarr.extract.interrupts import sigterm_interrupts

    try:
        with sigterm_interrupts():
            metrics = combine_runs(run_dirs, out_dir, overwrite=overwrite, allow_unfinished=allow_unfinished)
    except (CombineError, ConfigError, TrainError) as e:
        fail(str(e), EXIT_USAGE, err)
    except OSError as e:  # --out cannot be created or written
        fail(f"{e.filename or out_dir}: {e.strerror or e}", EXIT_USAGE, err)
    except KeyboardInterrupt as e:  # metrics.json is replaced whole: an old one or the new one is there
        err.print(f"[bold yellow]interrupted:[/] {out_dir} was not completed; run the same command again "
                  "(with --overwrite)", highlight=False)
        raise typer.Exit(EXIT_SIGNAL_BASE + signal_number(e)) from None
    seeds = metrics.get("seeds")
    out.print(rich_table(metrics, title=f"{metrics['variant']}: WAR / UAR (%), {len(metrics['folds'])} folds"
                                        + (f" x {len(seeds)} seeds ({', '.join(map(str, seeds))})" if seeds else "")))
    out.print(f"written: {Path(out_dir) / 'metrics.json'}, {Path(out_dir) / 'results.md'}")


def draw(run_dirs: List[Path], tsne: bool, tsne_fold: Optional[int], features: Optional[Path]) -> None:
    """Plots mode (``--plots``): every RUN_DIR checked first, then each one's figures drawn."""
    from cmarr.extract.interrupts import sigterm_interrupts
    from cmarr.extract.store import StoreError

    from ..data import DataError
    from ..plots import RunPlots, write_run_plots

    try:
        with sigterm_interrupts():
            runs = [RunPlots.read(d, tsne=tsne, features=features, tsne_fold=tsne_fold) for d in run_dirs]
            for run in runs:
                written = write_run_plots(run)
                out.print(f"{run.run_dir}: {', '.join(str(p) for p in written.values())}", highlight=False)
    except (TrainError, DataError, StoreError, ValueError) as e:
        fail(str(e), EXIT_USAGE, err)
    except OSError as e:  # a figure cannot be written, a log cannot be read
        fail(f"{e.filename}: {e.strerror or e}" if e.filename else str(e), EXIT_USAGE, err)
    except KeyboardInterrupt as e:  # each figure is written whole: those there are complete
        err.print("[bold yellow]interrupted:[/] the figures written so far are complete; run the same command "
                  "again for the rest", highlight=False)
        raise typer.Exit(EXIT_SIGNAL_BASE + signal_number(e)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
