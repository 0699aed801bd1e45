"""``cm-arr-results``: combine per-fold RUN_DIRs of separate jobs into one result.

    cm-arr-results RUN_DIR_A RUN_DIR_B ... --out COMBINED_DIR [--overwrite] [--allow-unfinished]

What may be combined and what is written: :mod:`cmarr.pipelines.combine`. Errors are one
line, exit status 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console

from ..combine import CombineError, combine_runs
from ..config import ConfigError
from ..errors import TrainError
from ..metrics import rich_table

app = typer.Typer(add_completion=False,
                  help="Combine per-fold cm-arr-train RUN_DIRs into one metrics.json / results.md.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@app.command()
def combine(run_dirs: List[Path] = typer.Argument(..., help="RUN_DIRs written by cm-arr-train."),
            out_dir: Path = typer.Option(..., "--out", help="Where to write metrics.json and results.md."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace results already in --out."),
            allow_unfinished: bool = typer.Option(False, "--allow-unfinished",
                                                  help="Combine the finished folds even if a RUN_DIR has "
                                                       "unfinished ones.")) -> None:
    """Combine the finished folds of RUN_DIRs (of one config and store; several seeds as
    repeats) into one metrics.json and results.md, and print the table."""
    try:
        metrics = combine_runs(run_dirs, out_dir, overwrite=overwrite, allow_unfinished=allow_unfinished)
    except (CombineError, ConfigError, TrainError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as e:  # --out cannot be created or written
        err.print(f"[bold red]error:[/] {e.filename or out_dir}: {e.strerror or e}", highlight=False)
        raise typer.Exit(2) from None
    seeds = metrics.get("seeds")
    out.print(rich_table(metrics, title=f"{metrics['variant']}: WAR / UAR (%), {len(metrics['folds'])} folds"
                                        + (f" x {len(seeds)} seeds ({', '.join(map(str, seeds))})" if seeds else "")))
    out.print(f"written: {Path(out_dir) / 'metrics.json'}, {Path(out_dir) / 'results.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
