"""``cm-arr-predict``: apply trained CM-ARR checkpoints to a feature store.

    cm-arr-predict --checkpoint RUN_DIR/fold1/best.pt [--checkpoint ...] --features FEATS.h5
                   --out predictions.csv [--conditions present|all|t,st,...]
                   [--device auto] [--batch-size 256] [--metrics metrics.json]

What is checked and written: :mod:`cmarr.pipelines.predict`. Errors in the input are one
line, exit status 1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional

import typer
from rich.console import Console
from rich.table import Table

from cmarr.extract.base import LABELS
from cmarr.extract.files import write_csv_atomic

from ..metrics import ROW_NAMES, TABLE_ROWS
from ..predict import PredictError, parse_conditions, predict_store, prediction_metrics

app = typer.Typer(add_completion=False, help="Apply trained CM-ARR checkpoints to a feature store.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def metrics_table(metrics: Mapping[str, Any], title: str) -> Table:
    """WAR / UAR (%) and n per condition of :func:`cmarr.pipelines.predict.prediction_metrics`."""
    t = Table(title=title, title_justify="left")
    for col in ("Avail.", "WAR", "UAR", "n"):
        t.add_column(col, justify="left" if col == "Avail." else "right")
    order = [c for c in ("present",) + TABLE_ROWS if c in metrics]
    for c in order:
        e = metrics[c]
        t.add_row("present" if c == "present" else ROW_NAMES[c], f"{100 * e['war']:.2f}", f"{100 * e['uar']:.2f}",
                  str(e.get("n", "")))
    return t


@app.command()
def predict(
    checkpoint: List[Path] = typer.Option(..., "--checkpoint", help="best.pt of a cm-arr-train run; give several "
                                          "(e.g. every fold) to average their probabilities."),
    features: Path = typer.Option(..., "--features", help="Feature store made by cm-arr-extract features."),
    out_path: Path = typer.Option(..., "--out", help="Predictions CSV (one row per utterance and condition)."),
    conditions: str = typer.Option("present", "--conditions", help="present (each utterance with what the "
                                   "store has), all (the seven conditions), or names: t,s,v,vt,sv,st,svt."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    metrics_path: Optional[Path] = typer.Option(None, "--metrics", help="Also write WAR/UAR per condition "
                                                "(labelled utterances not seen in training) as JSON."),
    allow_feature_mismatch: bool = typer.Option(False, "--allow-feature-mismatch", help="Predict on features made "
                                                "differently from the training store's (the differences are printed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out / --metrics file."),
) -> None:
    """Predict the emotion of every utterance of a store under missing-modality conditions."""
    try:
        conds = parse_conditions(conditions)
        if metrics_path is not None and metrics_path.resolve() == out_path.resolve():
            raise PredictError(f"{metrics_path}: --metrics and --out name the same file")
        for p in (out_path, metrics_path):
            if p is None:
                continue
            if p.resolve() == features.resolve() or any(p.resolve() == c.resolve() for c in checkpoint):
                raise PredictError(f"{p}: is an input (--features / --checkpoint); choose another output path")
            if p.is_dir():
                raise PredictError(f"{p}: is a folder; give a file path")
            if p.exists() and not overwrite:
                raise PredictError(f"{p}: already exists; choose another path or pass --overwrite")
            if p.parent.exists() and not p.parent.is_dir():
                raise PredictError(f"{p.parent}: is a file, not a folder")
        table, accepted = predict_store(checkpoint, features, conds, device=device, batch_size=batch_size,
                                        allow_feature_mismatch=allow_feature_mismatch)
        for d in accepted:
            err.print(f"[yellow]feature mismatch accepted:[/] {d}", highlight=False)
        write_csv_atomic(table, out_path)
        metrics = prediction_metrics(table)
        if metrics_path is not None:
            tmp = metrics_path.with_name(f".{metrics_path.name}.tmp-{os.getpid()}")
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"checkpoints": [str(c) for c in checkpoint], "features": str(features),
                                       "labels": list(LABELS), "conditions": metrics}, indent=1))
            tmp.replace(metrics_path)
    except PredictError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    except OSError as e:
        err.print(f"[red]error:[/] {e.filename or out_path}: {e.strerror or e}", highlight=False)
        raise typer.Exit(1) from None
    n_utts = table["utterance_id"].nunique()
    empty = int((table["prediction"] == "").sum())
    seen = int(table.drop_duplicates("utterance_id")["seen_in_training"].sum())
    out.print(f"{len(table)} predictions ({n_utts} utterances x {len(conds)} condition"
              f"{'s' if len(conds) > 1 else ''}) -> {out_path}"
              + (f"; {empty} without any input under their condition (empty prediction)" if empty else "")
              + (f"; {seen} utterances were seen in training (seen_in_training, not scored)" if seen else ""),
              highlight=False)
    if metrics:
        out.print(metrics_table(metrics, "WAR / UAR in %, labelled utterances not seen in training"))
    elif (table["label"] != "").any():
        out.print("no labelled utterance outside the checkpoints' training data: no scores", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
