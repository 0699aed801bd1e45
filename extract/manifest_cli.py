"""``cm-arr-extract manifest {iemocap,msp-improv} --root DIR --out FILE.csv``.

Builds a corpus manifest (``cmarr.extract.iemocap`` / ``cmarr.extract.msp_improv``),
prints what it holds (utterances per label and session, everything dropped with its reason
and count, the coverage of a partial copy), compares it with the canonical list in
``data_manifests/`` and writes the CSV atomically.

Exit codes: 0 written; 1 bad input (the message names the file and the problem);
2 written, but ``--strict`` was given and the set differs from the canonical list.
"""
from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .manifest import (MSP_COUNTS_WITH_NO_FACE, PAPER_COUNTS, FOUR_CLASS, Comparison, ManifestError,
                       ManifestResult, compare_with_canonical, load_canonical_iemocap,
                       load_msp_no_face, write_csv_atomic, write_manifest)


class Corpus(str, Enum):
    iemocap = "iemocap"
    msp_improv = "msp-improv"


def manifest_command(
    dataset: Annotated[Corpus, typer.Argument(help="Which corpus: iemocap or msp-improv.")],
    root: Annotated[Path, typer.Option("--root", help="The corpus release folder as distributed "
                                       "(IEMOCAP_full_release/, or the MSP-IMPROV folder holding Evalution.txt).")],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write (atomically).")],
    keep_no_face: Annotated[bool, typer.Option("--keep-no-face", help="MSP-IMPROV: keep the clips of the "
                                               "no-face list (default: dropped, the paper's 3,819 set).")] = False,
    canonical: Annotated[Optional[Path], typer.Option("--canonical", help="IEMOCAP: canonical list to compare "
                                                      "with (default data_manifests/iemocap_4class.csv).")] = None,
    no_face_list: Annotated[Optional[Path], typer.Option("--no-face-list", help="MSP-IMPROV: the no-face list "
                                                         "(default data_manifests/msp_improv_no_face.txt).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 2 when the set differs from the "
                                         "canonical list (the CSV is written all the same).")] = False,
    show: Annotated[int, typer.Option("--show", min=0, help="How many items of each difference and of the "
                                      "unparseable lines to list (0 = all).")] = 20,
    dropped_out: Annotated[Optional[Path], typer.Option("--dropped-out", help="Also write every dropped item "
                                                        "(utterance_id, reason, where, detail) to this CSV.")] = None,
) -> None:
    """Build the utterance manifest of a corpus, print its summary and write it as CSV."""
    console, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    dataset = Corpus(dataset)

    def fail(message: str, code: int = 1) -> None:
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(code)

    if keep_no_face and dataset is not Corpus.msp_improv:
        fail("--keep-no-face applies to msp-improv only")
    if no_face_list is not None and dataset is not Corpus.msp_improv:
        fail("--no-face-list applies to msp-improv only")
    if canonical is not None and dataset is not Corpus.iemocap:
        fail("--canonical applies to iemocap only (MSP-IMPROV is checked against the paper's counts)")
    try:
        if dataset is Corpus.iemocap:
            from .iemocap import prepare_iemocap

            canon = load_canonical_iemocap(canonical)
            result = prepare_iemocap(root)
        else:
            from .msp_improv import prepare_msp_improv

            no_face = load_msp_no_face(no_face_list) if not keep_no_face else None
            result = prepare_msp_improv(root, drop_no_face=not keep_no_face, no_face_ids=no_face)
    except ManifestError as e:
        fail(str(e))

    print_summary(console, dataset.value, root, result, show)
    if result.df.empty:
        fail(f"{root}: no utterance of the 4-class set was found; nothing written")
    differs = False
    if dataset is Corpus.iemocap:
        comparison = compare_with_canonical(result.df, canon, result.sessions)
        print_comparison(console, comparison, canonical or "data_manifests/iemocap_4class.csv", show)
        differs = not comparison.matches
    else:
        differs = print_count_check(console, dataset.value, result, keep_no_face=keep_no_face)
    try:
        write_manifest(result.df, out)
    except (OSError, ManifestError) as e:
        fail(f"{out}: cannot write the manifest: {e}")
    console.print(f"wrote {len(result.df)} utterances to {escape(str(out))}", soft_wrap=True)
    if dropped_out is not None:
        try:
            write_dropped(result, dropped_out)
        except OSError as e:
            fail(f"{dropped_out}: cannot write the dropped items: {e}")
        console.print(f"wrote {len(result.dropped)} dropped items to {escape(str(dropped_out))}", soft_wrap=True)
    if strict and differs:
        raise typer.Exit(2)


def write_dropped(result: ManifestResult, path: Path) -> None:
    """Every dropped item as CSV (``utterance_id, reason, where, detail``), written atomically."""
    rows = [asdict(d) for d in result.dropped]
    write_csv_atomic(pd.DataFrame(rows, columns=["utterance_id", "reason", "where", "detail"]), path)


def print_summary(console: Console, corpus: str, root: Path, result: ManifestResult, show: int = 20) -> None:
    """Utterances per label and session, the notes, and the dropped items per reason."""
    df = result.df
    console.print(f"[bold]{corpus}[/]: {len(df)} utterances from {escape(str(root))} "
                  f"(sessions {', '.join(map(str, result.sessions))})", soft_wrap=True)
    for note in result.notes:
        console.print(f"  note: {escape(note)}", soft_wrap=True)
    table = Table(title="utterances per label and session")
    table.add_column("label")
    for s in result.sessions:
        table.add_column(f"S{s}", justify="right")
    table.add_column("total", justify="right")
    counts = pd.crosstab(df["label"], df["session"]) if len(df) else pd.DataFrame()
    for label in FOUR_CLASS:
        row = [int(counts.at[label, s]) if label in counts.index and s in counts.columns else 0
               for s in result.sessions]
        table.add_row(label, *map(str, row), str(sum(row)))
    per_session = [int((df["session"] == s).sum()) for s in result.sessions]
    table.add_row("all", *map(str, per_session), str(len(df)), style="bold")
    console.print(table)

    drops = result.drop_counts()
    if not drops:
        console.print("dropped: nothing")
        return
    dt = Table(title=f"dropped: {len(result.dropped)} items")
    dt.add_column("reason")
    dt.add_column("count", justify="right")
    dt.add_column("by detail")
    for reason, n in drops.most_common():
        details = pd.Series([d.detail for d in result.dropped if d.reason == reason]).value_counts()
        by = ", ".join(f"{k} {v}" for k, v in details.items() if k) if len(details) <= 12 else ""
        dt.add_row(reason, str(n), escape(by))
    console.print(dt)
    # Lines that did not parse are listed one by one: the user has to look at each.
    bad = [d for d in result.dropped if d.reason == "unparseable label line"]
    for d in bad[: show or None]:
        console.print(f"  unparseable: {escape(d.where)}: {escape(d.detail)}", soft_wrap=True)
    if show and len(bad) > show:
        console.print(f"  ... and {len(bad) - show} more unparseable lines")


def _listing(console: Console, title: str, items: list, show: int) -> None:
    if not items:
        return
    console.print(f"  {title}: {len(items)}")
    for it in items[: show or None]:
        console.print("    " + escape(" ".join(it) if isinstance(it, tuple) else it), soft_wrap=True)
    if show and len(items) > show:
        console.print(f"    ... and {len(items) - show} more")


def print_comparison(console: Console, c: Comparison, source: str | Path, show: int = 20) -> None:
    """Missing ids, extra ids and label disagreements against the canonical list."""
    sess = ", ".join(map(str, c.sessions))
    if c.matches:
        console.print(f"[green]matches the canonical list[/] {escape(str(source))} over sessions {sess} "
                      f"({c.n_canonical} utterances)", soft_wrap=True)
        return
    console.print(f"[yellow]differs from the canonical list[/] {escape(str(source))} over sessions {sess} "
                  f"({c.n_canonical} canonical utterances):", soft_wrap=True)
    _listing(console, "missing ids (canonical, not found here)", c.missing, show)
    _listing(console, "extra ids (found here, not canonical)", c.extra, show)
    _listing(console, "label disagreements (id, label here, canonical label)", c.label_disagreements, show)


def print_count_check(console: Console, corpus: str, result: ManifestResult, keep_no_face: bool = False) -> bool:
    """For a complete copy, compare the per-label counts with the paper's (with
    ``keep_no_face``, with the 3,940-clip MSP-IMPROV set before the no-face clips are
    dropped); True when they differ."""
    if len(result.sessions) < (6 if corpus == "msp-improv" else 5):
        console.print("partial corpus: per-label counts not compared with the paper's")
        return False
    got = result.df["label"].value_counts().to_dict()
    paper = MSP_COUNTS_WITH_NO_FACE if keep_no_face else PAPER_COUNTS[corpus]
    which = "the paper's set before its no-face clips are dropped" if keep_no_face else "the paper's"
    diff = {k: (got.get(k, 0), v) for k, v in paper.items() if got.get(k, 0) != v}
    if not diff:
        console.print(f"[green]per-label counts match {which}[/] {paper}")
        return False
    console.print(f"[yellow]per-label counts differ from {which}[/] (here, paper): "
                  + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))
    return True


__all__ = ["manifest_command", "app", "main", "Corpus"]

app = typer.Typer(add_completion=False, help="Corpus manifests.")


@app.callback()
def _group() -> None:
    """Corpus manifests (the ``manifest`` command of ``cm-arr-extract``)."""


app.command("manifest")(manifest_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
