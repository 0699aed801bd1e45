"""The per-epoch diagnostics of trained runs, averaged over folds and seeds.

    python benchmarks/diagnostics.py RUN [RUN ...] [--epochs 1,2,3,6,9,12] [--what all]

Each ``RUN`` is a RUN_DIR (``fold*/log.csv`` under it) or a folder of them (``*/fold*/log.csv``,
e.g. ``runs/variants/shared/cm-arr`` with one RUN_DIR per seed). For each ``RUN`` every
``log.csv`` is read and each column is averaged over all of them per epoch. Three tables are
printed per ``RUN`` (``--what`` picks some of ``loss,grad,rec``):

- ``loss``: each loss term as it enters Eq. 14 (weighted), the validation UAR (average over
  the six missing conditions, and full).
- ``grad``: the L2 norm of the gradient each weighted term sends into the shared layers
  (input projections and UMC; ``CMARR.shared_parameters``), and the mean norm of ``X_m``
  per modality (a representation that shrinks shows here first).
- ``rec``: on validation, the cosine of the reconstruction ``X^_m`` with the real ``X_m``
  (``rec``) next to the trivial reconstruction (``triv``: the mean of the available
  modalities' ``X``), per modality, and the mean squared errors.

``docs/training.md`` reads these tables for the synthetic runs of ``benchmarks/variants.py``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cmarr.extract.base import MODALITIES as MODS
from cmarr.pipelines.diagnostics import DIAG_TERMS

TERMS = DIAG_TERMS
TABLES = {
    "loss": [f"wloss_{t}" for t in TERMS] + ["val_uar_avg", "val_uar_full"],
    "grad": [f"gradnorm_{t}" for t in ("udcl", "spcl", "cls")] + [f"x_norm_{m}" for m in MODS],
    "rec": [f"{k}_cos_{m}" for m in MODS for k in ("rec", "triv")]
    + [f"{k}_mse_{m}" for m in MODS for k in ("rec", "triv")],
}


def logs(run: Path) -> list[Path]:
    """Every fold's log.csv under ``run`` (a RUN_DIR or a folder of RUN_DIRs)."""
    found = sorted(run.glob("fold*/log.csv")) or sorted(run.glob("*/fold*/log.csv"))
    if not found:
        raise SystemExit(f"{run}: no fold*/log.csv under it (nor under its subfolders)")
    return found


def mean_by_epoch(paths: list[Path]) -> pd.DataFrame:
    """Each column's mean over ``paths`` per epoch (only epochs every log reached)."""
    frames = [pd.read_csv(p).set_index("epoch") for p in paths]
    last = min(int(f.index.max()) for f in frames)
    return pd.concat([f.loc[:last] for f in frames]).groupby(level=0).mean(numeric_only=True)


def render(df: pd.DataFrame, columns: list[str], epochs: list[int]) -> str:
    cols = [c for c in columns if c in df.columns]
    rows = [e for e in epochs if e in df.index] or list(df.index)
    head = "| epoch | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    lines = [head, "|---:|" + "---:|" * len(cols)]
    for e in rows:
        lines.append(f"| {e} | " + " | ".join(f"{df.at[e, c]:.3g}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--epochs", default="1,2,3,6,9,12", help="epochs shown (comma-separated)")
    ap.add_argument("--what", default="all", help="tables shown: all, or some of loss,grad,rec")
    args = ap.parse_args()
    epochs = [int(e) for e in args.epochs.split(",")]
    what = list(TABLES) if args.what == "all" else args.what.split(",")
    for run in args.runs:
        paths = logs(run)
        df = mean_by_epoch(paths)
        print(f"## {run} (mean of {len(paths)} fold logs)\n")
        for w in what:
            print(f"{w}:\n\n{render(df, TABLES[w], epochs)}\n")


if __name__ == "__main__":
    main()
