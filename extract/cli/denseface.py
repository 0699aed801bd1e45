"""``cm-arr-denseface``: train Denseface on FER+ and inspect its checkpoints.

    cm-arr-denseface train --fer2013 fer2013.csv --ferplus fer2013new.csv --out denseface.pt \\
        [--epochs 40] [--device cuda]
    cm-arr-denseface info denseface.pt

Exit codes follow ``cmarr.cli``: 2 for a file that is missing or cannot be used and for a bad
option, 130/143 when training is interrupted (no checkpoint is written then).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from cmarr.cli import EXIT_CODES_HELP, EXIT_USAGE, fail, interruptible, version_option
from cmarr.extract.base import ExtractError

app = typer.Typer(add_completion=False, no_args_is_help=True, epilog=EXIT_CODES_HELP,
                  help="Train the Denseface face encoder on FER+ and inspect checkpoints.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@app.callback()
def _options(version: Optional[bool] = version_option("cm-arr-denseface")) -> None:
    pass


@app.command(epilog=EXIT_CODES_HELP)
def train(
    fer2013: Path = typer.Option(..., "--fer2013", help="fer2013.csv (emotion,pixels,Usage)"),
    ferplus: Path = typer.Option(..., "--ferplus", help="fer2013new.csv (FER+ vote counts)"),
    out_path: Path = typer.Option(..., "--out", help="checkpoint file to write"),
    epochs: int = typer.Option(40, "--epochs", min=1, help="training epochs"),
    batch_size: int = typer.Option(64, "--batch-size", min=2, help="images per batch"),
    lr: float = typer.Option(0.1, "--lr", help="initial learning rate (SGD)"),
    label_rule: str = typer.Option("majority", "--label-rule", help="majority | distribution"),
    max_train: Optional[int] = typer.Option(None, "--max-train", min=1, help="use only the first N training images"),
    seed: int = typer.Option(0, "--seed", help="random seed (initialisation, shuffling)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)"),
) -> None:
    """Train Denseface on FER+, report FER+ test accuracy, write the checkpoint."""
    from cmarr.extract.denseface_train import FerDataError, TrainConfig, train_denseface

    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, label_rule=label_rule,
                          max_train=max_train, seed=seed)
    except ValueError as e:
        fail(escape(str(e)), EXIT_USAGE, err)
    nothing = f"no checkpoint was written at {escape(str(out_path))} (a rerun trains from the start)"
    try:
        with interruptible(nothing, err):
            rec = train_denseface(fer2013, ferplus, out_path, cfg, device=device,
                                  log=lambda s: err.print(s, highlight=False))
    except (FerDataError, ExtractError, OSError) as e:
        fail(escape(str(e)), EXIT_USAGE, err)
    out.print(f"wrote {out_path}  sha256 {rec['checkpoint_sha256']}", highlight=False)
    out.print(f"FER+ test accuracy {rec['test_accuracy']:.4f} ({rec['n_test']} images), "
              f"validation {'none' if rec['val_accuracy'] is None else format(rec['val_accuracy'], '.4f')}, "
              f"epoch {rec['kept_epoch']}/{rec['epochs']}", highlight=False)


@app.command(epilog=EXIT_CODES_HELP)
def info(checkpoint: Path = typer.Argument(..., help="Denseface checkpoint")) -> None:
    """Print how a checkpoint was made (its record) and its sha256."""
    from cmarr.extract.denseface_train import load_checkpoint
    from cmarr.extract.files import file_sha256

    try:
        _, rec = load_checkpoint(checkpoint)
    except ExtractError as e:
        fail(escape(str(e)), EXIT_USAGE, err)
    rec = {k: v for k, v in rec.items() if k != "history"}
    out.print_json(json.dumps({"sha256": file_sha256(checkpoint), **rec}, default=str))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
