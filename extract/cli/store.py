"""``cm-arr-features``: look inside, check and merge feature stores.

    cm-arr-features info FEATS.h5
    cm-arr-features errors FEATS.h5 [--modality speech]
    cm-arr-features validate FEATS.h5 [--manifest MANIFEST.csv]
    cm-arr-features merge SHARD.h5... --out FEATS.h5
"""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmarr.extract.base import LABELS, MODALITIES
from cmarr.extract.files import file_sha256
from cmarr.extract.store import FeatureStore, StoreError, errors_hint, merge_stores, validate_store, write_failure

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Inspect, validate and merge cm-arr HDF5 feature stores.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        _fail(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype={"utterance_id": str, "label": str}, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        _fail(f"{path}: not a readable manifest CSV ({str(e).splitlines()[0]})")
    except OSError as e:
        _fail(f"{path}: cannot read the manifest ({e.strerror or e})")
    if "utterance_id" not in df.columns:
        _fail(f"{path}: manifest has no 'utterance_id' column")
    return df


@app.command()
def info(file: Path = typer.Argument(..., help="Feature store (.h5)."),
         full_provenance: bool = typer.Option(False, "--full-provenance", help="Print provenance as JSON.")) -> None:
    """A table of what is inside a store."""
    try:
        store = FeatureStore(file)
    except StoreError as e:
        _fail(str(e))
    t = store.utterances
    out.print(f"[bold]{file}[/]  schema {store.attrs.get('schema_version')}  dtype {store.dtype}  "
              f"cm-arr {store.attrs.get('cm_arr_version')}  created {store.attrs.get('created')}", highlight=False)
    corpora = ", ".join(sorted(set(map(str, t.get("corpus", [])))))
    out.print(f"{len(t)} utterances ({corpora})", highlight=False)
    if store.attrs.get("shard"):
        out.print(f"shard {store.attrs['shard']} of an extraction (join all shards with cm-arr-features merge)",
                  highlight=False)

    if {"label", "fold"} <= set(t.columns):
        counts = pd.crosstab(t["fold"], t["label"])
        tab = Table(title="Utterances per fold and label")
        tab.add_column("fold", justify="right")
        labels = [lab for lab in LABELS if lab in counts.columns] + [c for c in counts.columns if c not in LABELS]
        for lab in labels:
            tab.add_column(str(lab), justify="right")
        tab.add_column("total", justify="right")
        for fold, row in counts.iterrows():
            tab.add_row(str(fold), *[str(int(row[lab])) for lab in labels], str(int(row.sum())))
        tab.add_row("all", *[str(int(counts[lab].sum())) for lab in labels], str(int(counts.values.sum())),
                    style="bold")
        out.print(tab)

    tab = Table(title="Modalities")
    for col in ("modality", "dim", "present", "missing", "errors", "frames mean", "frames min", "frames max"):
        tab.add_column(col, justify="right" if col != "modality" else "left")
    for m in store.modalities:
        ids = store.ids(m)
        frames = np.array(list(store.lengths(m).values()))
        n_err = int((store.errors["modality"] == m).sum()) if len(store.errors) else 0
        tab.add_row(m, str(store.dims.get(m, "?")), str(len(ids)), str(len(t) - len(ids)), str(n_err),
                    f"{frames.mean():.1f}" if len(frames) else "-",
                    str(int(frames.min())) if len(frames) else "-",
                    str(int(frames.max())) if len(frames) else "-")
    out.print(tab)

    tab = Table(title="Provenance")
    tab.add_column("modality")
    tab.add_column("how it was made", overflow="fold")
    for m, prov in store.provenance.items():
        if full_provenance:
            text = json.dumps(prov, indent=1, sort_keys=True)
        else:
            keep = {k: v for k, v in prov.items() if k not in ("library_versions",)}
            text = "; ".join(f"{k}={v}" for k, v in sorted(keep.items()))
        tab.add_row(m, text)
    out.print(tab)
    if len(store.errors):
        out.print(f"{len(store.errors)} recorded extraction failures; {escape(errors_hint(file))} lists them.",
                  highlight=False)
    store.close()


@app.command()
def errors(file: Path = typer.Argument(..., help="Feature store (.h5)."),
           modality: Optional[str] = typer.Option(None, "--modality", help="Only this modality's failures.")) -> None:
    """List the recorded extraction failures: utterance id, modality, reason."""
    if modality is not None and modality not in MODALITIES:
        _fail(f"--modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    try:
        store = FeatureStore(file)
    except StoreError as e:
        _fail(str(e))
    table = store.errors
    store.close()
    if modality is not None:
        table = table[table["modality"] == modality]
    which = f" {modality}" if modality is not None else ""
    if table.empty:
        out.print(f"{file}: no recorded{which} extraction failures", highlight=False)
        return
    tab = Table(title=f"{file}: {len(table)} recorded{which} extraction failures", title_justify="left")
    tab.add_column("utterance_id", no_wrap=True)
    tab.add_column("modality", no_wrap=True)
    tab.add_column("reason", overflow="fold")
    for r in table.itertuples(index=False):
        tab.add_row(escape(str(r.utterance_id)), escape(str(r.modality)), escape(str(r.reason)))
    out.print(tab)


@app.command()
def validate(file: Path = typer.Argument(..., help="Feature store (.h5)."),
             manifest: Optional[Path] = typer.Option(None, "--manifest",
                                                     help="Manifest CSV to check coverage against.")) -> None:
    """Check coverage, shapes, dtypes, NaN/Inf, the frames' checksums and provenance; exit 1 on any problem."""
    man = _read_manifest(manifest) if manifest is not None else None
    try:
        problems, notes = validate_store(file, man, file_sha256(manifest) if manifest is not None else None)
    except StoreError as e:
        _fail(str(e))
    for note in notes:
        out.print(f"note: {escape(note)}", highlight=False)
    if problems:
        for p in problems:
            err.print(f"[red]problem:[/] {escape(str(file))}: {escape(p)}", highlight=False, soft_wrap=True)
        _fail(f"{file}: {len(problems)} problem(s) found")
    out.print(f"[green]ok[/]: {file} is a valid feature store", highlight=False)


@app.command()
def merge(shards: List[Path] = typer.Argument(..., help="Shard stores to join."),
          out_file: Path = typer.Option(..., "--out", help="Merged store to write (must not exist)."),
          allow_library_mismatch: bool = typer.Option(
              False, help="Accept shards made with other library versions (same models and settings).")) -> None:
    """Join shards written by separate processes or machines into one store."""
    from cmarr.extract.interrupts import Terminated, sigterm_interrupts

    try:
        with sigterm_interrupts():  # the temporary file is removed, not left behind
            path = merge_stores(shards, out_file, allow_library_mismatch=allow_library_mismatch)
    except Terminated:
        _fail(f"terminated (SIGTERM); nothing was written at {out_file}", 143)
    except StoreError as e:
        _fail(str(e))
    except OSError as e:  # e.g. a full disk or a file-size limit: nothing is left at --out
        _fail(f"{write_failure(e, e.filename or out_file)}; the shards are unchanged and nothing was written "
              f"at {out_file}")
    store = FeatureStore(path)
    out.print(f"[green]merged[/] {len(shards)} shards into {path}: {len(store.utterances)} utterances, "
              f"modalities {', '.join(store.modalities)}", highlight=False)


def main() -> None:
    # a write past the file-size limit fails with EFBIG instead of killing the process (as
    # CPython's own startup does; said here for embedders), so the error is reported
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()


if __name__ == "__main__":
    main()
