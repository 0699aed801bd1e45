"""``cm-arr-features``: look inside, check and merge feature stores.

    cm-arr-features info FEATS.h5
    cm-arr-features errors FEATS.h5 [--modality speech]
    cm-arr-features validate FEATS.h5 [--manifest MANIFEST.csv]
    cm-arr-features merge SHARD.h5... --out FEATS.h5
    cm-arr-features export --format mmin FEATS.h5 OUT_DIR

Exit codes follow ``cmarr.cli``: 2 for a file that is missing or cannot be used and for a bad
option, 1 when ``validate`` finds problems in a store, 130/143 when interrupted.
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

from cmarr.cli import EXIT_CODES_HELP, EXIT_PROBLEMS, EXIT_USAGE, fail, interruptible, version_option
from cmarr.extract.base import LABELS, MODALITIES
from cmarr.extract.files import file_sha256
from cmarr.extract.store import (
    ExportError,
    FeatureStore,
    StoreError,
    errors_hint,
    export_mmin,
    merge_stores,
    validate_store,
    write_failure,
)
from cmarr.extract.store.export import MISSING_POLICIES, MMIN_TYPES

app = typer.Typer(add_completion=False, no_args_is_help=True, epilog=EXIT_CODES_HELP,
                  help="Inspect, validate, merge and export cm-arr HDF5 feature stores.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _options(version: Optional[bool] = version_option("cm-arr-features")) -> None:
    pass


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    fail(message, code, err)


def _interruptible(outcome: str):
    """Ctrl-C exits 130 and SIGTERM 143 (``cmarr.cli``) with one line saying ``outcome``."""
    return interruptible(outcome, err)


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


@app.command(epilog=EXIT_CODES_HELP)
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


@app.command(epilog=EXIT_CODES_HELP)
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


@app.command(epilog=EXIT_CODES_HELP)
def validate(file: Path = typer.Argument(..., help="Feature store (.h5)."),
             manifest: Optional[Path] = typer.Option(None, "--manifest",
                                                     help="Manifest CSV to check coverage against.")) -> None:
    """Check coverage, shapes, dtypes, NaN/Inf, the frames' checksums and provenance; exit 1 on any problem."""
    man = _read_manifest(manifest) if manifest is not None else None
    try:
        with _interruptible("nothing was changed"):
            problems, notes = validate_store(file, man, file_sha256(manifest) if manifest is not None else None)
    except StoreError as e:
        _fail(str(e))
    for note in notes:
        out.print(f"note: {escape(note)}", highlight=False)
    if problems:
        for p in problems:
            err.print(f"[red]problem:[/] {escape(str(file))}: {escape(p)}", highlight=False, soft_wrap=True)
        _fail(f"{file}: {len(problems)} problem(s) found", EXIT_PROBLEMS)
    out.print(f"[green]ok[/]: {file} is a valid feature store", highlight=False)


@app.command(epilog=EXIT_CODES_HELP)
def merge(shards: List[Path] = typer.Argument(..., help="Shard stores to join."),
          out_file: Path = typer.Option(..., "--out", help="Merged store to write (must not exist)."),
          allow_library_mismatch: bool = typer.Option(
              False, help="Accept shards made with other library versions (same models and settings).")) -> None:
    """Join shards written by separate processes or machines into one store."""
    try:
        with _interruptible(f"nothing was written at {out_file}"):  # the temporary file is removed
            path = merge_stores(shards, out_file, allow_library_mismatch=allow_library_mismatch)
    except StoreError as e:
        _fail(str(e))
    except OSError as e:  # e.g. a full disk or a file-size limit: nothing is left at --out
        _fail(f"{write_failure(e, e.filename or out_file)}; the shards are unchanged and nothing was written "
              f"at {out_file}")
    store = FeatureStore(path)
    out.print(f"[green]merged[/] {len(shards)} shards into {path}: {len(store.utterances)} utterances, "
              f"modalities {', '.join(store.modalities)}", highlight=False)


@app.command(epilog=EXIT_CODES_HELP)
def export(
    file: Path = typer.Argument(..., metavar="FEATS.h5", help="Feature store (.h5) to export; it is only read."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR",
                                   help="Folder to write (created; an existing non-empty one only with --overwrite)."),
    fmt: str = typer.Option(..., "--format", help="Layout to write: 'mmin' (MMIN, IF-MMIN, CIF-MMIN: A/V/L feature "
                            "files and target/<cvNo>/ split files)."),
    a_type: str = typer.Option(MMIN_TYPES["A"], "--a-type", help="Name of the speech file A/<name>.h5 (MMIN's "
                               "--A_type)."),
    v_type: str = typer.Option(MMIN_TYPES["V"], "--v-type", help="Name of the video file V/<name>.h5 (MMIN's "
                               "--V_type)."),
    l_type: str = typer.Option(MMIN_TYPES["L"], "--l-type", help="Name of the text file L/<name>.h5 (MMIN's "
                               "--L_type)."),
    corpus_name: Optional[str] = typer.Option(None, "--corpus-name", help="MMIN's --corpus_name, which decides how "
                                              "labels are stored: IEMOCAP (one-hot) or MSP (class index). Default: "
                                              "from the store's corpus (iemocap, msp-improv)."),
    missing: str = typer.Option("refuse", "--missing", help="Utterances lacking a modality: refuse (default), drop "
                                "(leave them out of every file) or empty (write a (0, D) entry); export.json lists "
                                "them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty OUT_DIR (once the new "
                                   "one is complete)."),
) -> None:
    """Export a store to another code's layout: the store first, then the folder to write.

    cm-arr-features export --format mmin FEATS.h5 OUT_DIR writes A/, V/, L/ (one float32
    dataset per utterance id), target/<cvNo>/{trn,val,tst}_{label,int2name}.npy (per fold, one
    cv per speaker: that speaker validates, the fold's other speakers test), config/ for MMIN's
    data/config/, and export.json + README.md (the source's sha256, the mapping, the options
    that read it). OUT_DIR appears only when complete."""
    if fmt != "mmin":
        _fail(f"--format {fmt!r}: expected mmin")
    if missing not in MISSING_POLICIES:
        _fail(f"--missing {missing!r}: expected one of {', '.join(MISSING_POLICIES)}")
    if corpus_name is not None and corpus_name not in ("IEMOCAP", "MSP"):
        _fail(f"--corpus-name {corpus_name!r}: expected IEMOCAP or MSP")
    try:
        with _interruptible(f"nothing was written at {out_dir}"):  # the temporary folder is removed
            record = export_mmin(file, out_dir, types={"A": a_type, "V": v_type, "L": l_type},
                                 corpus_name=corpus_name, missing=missing, overwrite=overwrite,
                                 log=lambda s: err.print(escape(s), highlight=False))
    except (StoreError, ExportError) as e:
        _fail(escape(str(e)))
    except OSError as e:  # e.g. a full disk: the temporary folder is removed, OUT_DIR is untouched
        _fail(f"{escape(write_failure(e, e.filename or out_dir))}; nothing was written at {out_dir}")
    out.print(f"[green]exported[/] {file} to {out_dir} in MMIN's layout ({record['corpus_name']}, "
              f"{len(record['cv'])} cvs): "
              f"{escape(record['mmin']['flags'])}", highlight=False)


def main() -> None:
    # a write past the file-size limit fails with EFBIG instead of killing the process (as
    # CPython's own startup does; said here for embedders), so the error is reported
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()


if __name__ == "__main__":
    main()
