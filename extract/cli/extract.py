"""``cm-arr-extract``: from a corpus on disk to a feature store.

    cm-arr-extract manifest iemocap --root IEMOCAP_full_release --out iemocap.csv
    cm-arr-extract manifest folder --root MEDIA_DIR --out media.csv [--labels labels.csv]
    cm-arr-extract features iemocap --root IEMOCAP_full_release --manifest iemocap.csv \\
        --out feats.h5 [--modalities speech,text,video] [--device cuda] [--shard k/N] \\
        [--allow-missing] [--speech-model ...] [--text-model ...] \\
        [--denseface-checkpoint CKPT | --random-denseface]

``manifest`` builds a corpus manifest (``cmarr.extract.corpora``), prints what it holds
(utterances per label and session, everything dropped with its reason and count, the
coverage of a partial copy), compares it with the canonical list in ``data_manifests/`` and
writes the CSV atomically. ``folder`` is any folder of media files (``corpora.folder``),
unlabelled unless ``--labels`` is given.

Exit codes follow ``cmarr.cli``. ``manifest``: 0 written; 1 written, but ``--strict`` was
given and the set differs from the canonical list; 2 bad input (the message names the file
and the problem), nothing written.

``features``: 0 the store is complete; 1 the store is written but some utterances have no
features for some modality (listed, and recorded in the store) and ``--allow-missing`` was
not given, or no utterance has features of a requested modality; 2 bad input or setup (the
message names the file or option and the problem; nothing is computed), another run writing
the same output (refused), or an extraction that left some utterance/modality without
features or a recorded error (no store is written; rerun to resume); 130 interrupted by
Ctrl-C, 143 by SIGTERM (what batch schedulers send): finished utterances are committed
first, and rerunning the same command resumes.
"""
from __future__ import annotations

import signal
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmarr.cli import EXIT_CODES_HELP, EXIT_PROBLEMS, EXIT_SIGNAL_BASE, EXIT_USAGE, version_option
from cmarr.extract.base import LABELS
from cmarr.extract.corpora.manifest import (
    MSP_COUNTS_WITH_NO_FACE,
    PAPER_COUNTS,
    Comparison,
    ManifestError,
    ManifestResult,
    compare_with_canonical,
    load_canonical_iemocap,
    load_msp_no_face,
    write_manifest,
)
from cmarr.extract.files import write_csv_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True, epilog=EXIT_CODES_HELP,
                  help="Build corpus manifests and extract speech, text and video features into a store.")
err = Console(stderr=True, soft_wrap=True)

EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT   # 130
EXIT_TERMINATED = EXIT_SIGNAL_BASE + signal.SIGTERM   # 143


@app.callback()
def _group(version: Optional[bool] = version_option("cm-arr-extract")) -> None:
    """Build corpus manifests and extract speech, text and video features into a store."""


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


class Corpus(str, Enum):
    iemocap = "iemocap"
    msp_improv = "msp-improv"
    folder = "folder"


@app.command("manifest", epilog=EXIT_CODES_HELP)
def manifest_command(
    dataset: Annotated[Corpus, typer.Argument(help="Which corpus: iemocap, msp-improv, or folder (any folder "
                                              "of video/audio files, searched recursively).")],
    root: Annotated[Path, typer.Option("--root", help="The corpus release folder as distributed "
                                       "(IEMOCAP_full_release/, or the MSP-IMPROV folder holding Evalution.txt), "
                                       "or the media folder.")],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write (atomically).")],
    keep_no_face: Annotated[bool, typer.Option("--keep-no-face", help="MSP-IMPROV: keep the clips of the "
                                               "no-face list (default: dropped, the paper's 3,819 set).")] = False,
    canonical: Annotated[Optional[Path], typer.Option("--canonical", help="IEMOCAP: canonical list to compare "
                                                      "with (default data_manifests/iemocap_4class.csv).")] = None,
    no_face_list: Annotated[Optional[Path], typer.Option("--no-face-list", help="MSP-IMPROV: the no-face list "
                                                         "(default data_manifests/msp_improv_no_face.txt).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="folder: CSV with columns utterance_id,label "
                                                   "(labels ang hap neu sad; an id is a media file's path under "
                                                   "--root without its extension). Default: no labels.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when the set differs from the "
                                         "canonical list (the CSV is written all the same).")] = False,
    show: Annotated[int, typer.Option("--show", min=0, help="How many items of each difference and of the "
                                      "unparseable lines to list (0 = all).")] = 20,
    dropped_out: Annotated[Optional[Path], typer.Option("--dropped-out", help="Also write every dropped item "
                                                        "(utterance_id, reason, where, detail) to this CSV.")] = None,
) -> None:
    """Build the utterance manifest of a corpus, print its summary and write it as CSV."""
    console, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    dataset = Corpus(dataset)

    def fail(message: str, code: int = EXIT_USAGE) -> None:
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(code)

    if labels is not None and dataset is not Corpus.folder:
        fail("--labels applies to folder only (the corpora carry their own labels)")
    if strict and dataset is Corpus.folder:
        fail("--strict compares with the canonical list or the paper's counts: iemocap and msp-improv only")
    if keep_no_face and dataset is not Corpus.msp_improv:
        fail("--keep-no-face applies to msp-improv only")
    if no_face_list is not None and dataset is not Corpus.msp_improv:
        fail("--no-face-list applies to msp-improv only")
    if canonical is not None and dataset is not Corpus.iemocap:
        fail("--canonical applies to iemocap only (MSP-IMPROV is checked against the paper's counts)")
    try:
        if dataset is Corpus.iemocap:
            from cmarr.extract.corpora.iemocap import prepare_iemocap

            canon = load_canonical_iemocap(canonical)
            result = prepare_iemocap(root)
        elif dataset is Corpus.folder:
            from cmarr.extract.corpora.folder import prepare_folder

            result = prepare_folder(root, labels)
        else:
            from cmarr.extract.corpora.msp_improv import prepare_msp_improv

            no_face = load_msp_no_face(no_face_list) if not keep_no_face else None
            result = prepare_msp_improv(root, drop_no_face=not keep_no_face, no_face_ids=no_face)
    except ManifestError as e:
        fail(str(e))

    print_summary(console, dataset.value, root, result, show)
    if result.df.empty:
        found = "no media file could be used (see dropped)" if dataset is Corpus.folder else \
            "no utterance of the 4-class set was found"
        fail(f"{root}: {found}; nothing written")
    differs = False  # a folder has no reference to compare with
    if dataset is Corpus.iemocap:
        comparison = compare_with_canonical(result.df, canon, result.sessions)
        print_comparison(console, comparison, canonical or "data_manifests/iemocap_4class.csv", show)
        differs = not comparison.matches
    elif dataset is Corpus.msp_improv:
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
        raise typer.Exit(EXIT_PROBLEMS)


def write_dropped(result: ManifestResult, path: Path) -> None:
    """Every dropped item as CSV (``utterance_id, reason, where, detail``), written atomically."""
    rows = [asdict(d) for d in result.dropped]
    write_csv_atomic(pd.DataFrame(rows, columns=["utterance_id", "reason", "where", "detail"]), path)


def print_summary(console: Console, corpus: str, root: Path, result: ManifestResult, show: int = 20) -> None:
    """Utterances per label and session, the notes, and the dropped items per reason."""
    df = result.df
    sessions = f"sessions {', '.join(map(str, result.sessions))}" if result.sessions else "no sessions"
    console.print(f"[bold]{corpus}[/]: {len(df)} utterances from {escape(str(root))} ({sessions})",
                  soft_wrap=True)
    for note in result.notes:
        console.print(f"  note: {escape(note)}", soft_wrap=True)
    table = Table(title="utterances per label and session")
    table.add_column("label")
    for s in result.sessions:
        table.add_column(f"S{s}", justify="right")
    table.add_column("total", justify="right")
    counts = pd.crosstab(df["label"], df["session"]) if len(df) else pd.DataFrame()
    for label in LABELS:
        row = [int(counts.at[label, s]) if label in counts.index and s in counts.columns else 0
               for s in result.sessions]
        table.add_row(label, *map(str, row), str(sum(row)))
    unlabelled = int((df["label"] == "").sum()) if len(df) else 0
    if unlabelled:
        table.add_row("(none)", *([""] * len(result.sessions)), str(unlabelled))
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
    if corpus == "folder":  # a folder's items are the user's own files: each is named
        for d in result.dropped[: show or None]:
            detail = f" ({d.detail})" if d.detail else ""
            console.print(f"  left out: {escape(d.where)}: {escape(d.reason)}{escape(detail)}", soft_wrap=True)
        if show and len(result.dropped) > show:
            console.print(f"  ... and {len(result.dropped) - show} more (all of them: --dropped-out)")


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


@app.command("features", epilog=EXIT_CODES_HELP)
def features_command(
    dataset: Corpus = typer.Argument(..., help="Corpus of the manifest: iemocap, msp-improv or folder."),
    root: Path = typer.Option(..., "--root", help="Corpus folder the manifest's media paths are relative to."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV (cm-arr-extract manifest)."),
    out: Path = typer.Option(..., "--out", help="Feature store to write (HDF5). A shard writes "
                             "OUT with .shard-k-of-N before the extension."),
    modalities: str = typer.Option("speech,text,video", "--modalities",
                                   help="Comma-separated modalities to extract."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present; cuda:LOCAL_RANK under "
                               "torchrun), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute precision of the speech and text models: "
                              "float32 (default), or float16 / bfloat16 autocast: faster on a GPU, with "
                              "errors beyond the store's float16 precision."),
    shard: Optional[str] = typer.Option(None, "--shard", help="k/N: extract the k-th of N shards (from 0). "
                                        "Default: RANK/WORLD_SIZE under torchrun, else everything."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Accept utterances whose media "
                                       "cannot be used as missing modalities (exit 0)."),
    speech_model: str = typer.Option("facebook/wav2vec2-base", "--speech-model",
                                     help="Hub id or local folder of a wav2vec2, HuBERT, WavLM or data2vec-audio "
                                          "encoder."),
    speech_revision: Optional[str] = typer.Option(None, "--speech-revision", help="Hub revision of the speech model."),
    speech_layer: int = typer.Option(-1, "--speech-layer", help="-1: last hidden state; k: output of block k."),
    speech_batching: str = typer.Option("masked", "--speech-batching",
                                        help="masked, equal-length or none: batch-of-one features up to float "
                                        "rounding; none is the batch of one itself (see cmarr.extract.speech)."),
    speech_batch_size: int = typer.Option(128, "--speech-batch-size", min=1, help="Most utterances per speech batch."),
    speech_batch_seconds: Optional[float] = typer.Option(None, "--speech-batch-seconds",
                                                         help="Most padded audio seconds per speech batch "
                                                         "(default: 400 on CUDA, 60 on the CPU)."),
    audio_tolerance: Optional[str] = typer.Option(None, "--audio-duration-tolerance", metavar="SECONDS,FRACTION",
                                                  help="A wav whose decoded duration differs from the manifest's "
                                                  "end - start by more than max(SECONDS, FRACTION x duration), or "
                                                  "falls short of its header by more than SECONDS, is an error "
                                                  "(default 0.05,0.05)."),
    audio_readers: int = typer.Option(4, "--audio-readers", min=1, help="Threads that read and resample audio "
                                      "ahead of the speech model."),
    audio_read_ahead: int = typer.Option(256, "--audio-read-ahead", min=1, help="Most utterances read ahead of "
                                         "the speech model (memory)."),
    text_model: str = typer.Option("bert-base-uncased", "--text-model", help="BERT hub id or local folder."),
    text_revision: Optional[str] = typer.Option(None, "--text-revision", help="Hub revision of the text model."),
    text_layer: int = typer.Option(-1, "--text-layer", help="-1: last hidden state; k: output of block k."),
    text_markers: str = typer.Option("remove", "--text-markers", help="remove or keep bracketed markers "
                                     "such as [LAUGHTER]."),
    denseface_checkpoint: Optional[Path] = typer.Option(None, "--denseface-checkpoint",
                                                        help="Denseface checkpoint (cm-arr-denseface train)."),
    random_denseface: bool = typer.Option(False, "--random-denseface", help="Video features from seeded random "
                                          "Denseface weights (tests and demos only; recorded in provenance)."),
    sample_fps: float = typer.Option(10.0, "--sample-fps", help="Video frames sampled per second."),
    video_short_tolerance: float = typer.Option(0.2, "--video-short-tolerance", help="Seconds a video may end "
                                                "before its utterance's span does; beyond, the utterance's video "
                                                "is an error (never features of part of it)."),
    chunk_size: int = typer.Option(1024, "--chunk-size", min=1, help="Most utterances per committed chunk "
                                   "(a chunk is also committed at 64 MiB of features; a kill loses at most the "
                                   "chunk being filled)."),
    log_every: float = typer.Option(10.0, "--log-every", help="Seconds between progress lines when the "
                                    "output is not a terminal."),
) -> None:
    """Extract features of the manifest's utterances into a feature store (resumable)."""
    console = Console(soft_wrap=True)  # long lines (paths) stay whole: readable logs, greppable output
    dataset = Corpus(dataset)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        from cmarr.extract.base import ExtractError
        from cmarr.extract.features import parse_shard, run_features
        from cmarr.extract.interrupts import Terminated, sigterm_interrupts
        from cmarr.extract.speech import SpeechConfig
        from cmarr.extract.store import NO_ROOM, StoreError, write_failure
        from cmarr.extract.text import TextConfig
    except ImportError as e:
        _fail(f"cannot import the extraction code: {e}")
    mods = tuple(m.strip() for m in modalities.split(",") if m.strip())
    video = None
    try:
        k_n = parse_shard(shard) if shard is not None else None
        if "video" in mods:
            if denseface_checkpoint is not None and random_denseface:
                raise ExtractError("give either --denseface-checkpoint or --random-denseface, not both")
            if denseface_checkpoint is not None and not denseface_checkpoint.is_file():
                raise ExtractError(f"{denseface_checkpoint}: no such Denseface checkpoint")
            from cmarr.extract.features import video_config

            video = video_config(dataset.value,
                                 checkpoint=None if denseface_checkpoint is None else str(denseface_checkpoint),
                                 allow_random_weights=random_denseface, sample_fps=sample_fps,
                                 max_missing_seconds=video_short_tolerance)
        tolerance = {}
        if audio_tolerance is not None:
            try:
                tol_s, tol_f = (float(x) for x in audio_tolerance.split(","))
            except ValueError:
                raise ExtractError(f"--audio-duration-tolerance {audio_tolerance!r}: expected SECONDS,FRACTION, "
                                   "e.g. 0.05,0.05") from None
            tolerance = {"duration_tolerance_s": tol_s, "duration_tolerance_fraction": tol_f}
        speech = SpeechConfig(model=speech_model, revision=speech_revision, layer=speech_layer, dtype=dtype,
                              batching=speech_batching, max_batch_size=speech_batch_size,
                              max_batch_seconds=speech_batch_seconds, io_workers=audio_readers,
                              prefetch=audio_read_ahead, **tolerance)
        text = TextConfig(model=text_model, revision=text_revision, layer=text_layer, dtype=dtype,
                          markers=text_markers)
        with sigterm_interrupts():  # a scheduler's SIGTERM: committed like Ctrl-C, not lost
            run = run_features(dataset.value, root, manifest, out, modalities=mods, device=device, shard=k_n,
                               allow_missing=allow_missing, speech=speech, text=text, video=video,
                               chunk_size=chunk_size, console=console,
                               log_every=log_every)
    except (ExtractError, StoreError) as e:
        _fail(str(e))
    except OSError as e:  # e.g. no space left, a file-size limit, no permission to write --out
        if e.errno in NO_ROOM:
            _fail(f"{write_failure(e, e.filename or out)}; the utterances committed before are kept: make room "
                  "and run the same command again to resume")
        _fail(f"{e.filename or out}: {e.strerror or e}")
    except Terminated:
        _fail("terminated (SIGTERM); finished utterances are committed: run the same command again to resume",
              EXIT_TERMINATED)
    except KeyboardInterrupt:
        _fail("interrupted; finished utterances are kept: run the same command again to resume",
              EXIT_INTERRUPTED)
    if run.empty:
        _fail(f"no utterance has {' or '.join(run.empty)} features (recorded in {run.out}); the corpus copy lacks "
              "these media, or they cannot be read: fix them, or leave the modality out of --modalities",
              EXIT_PROBLEMS)
    if not run.ok:
        _fail(f"{len(run.errors)} utterance/modality pairs have no features (listed above and recorded in "
              f"{run.out}); fix the media, or rerun with --allow-missing to accept them as missing modalities",
              EXIT_PROBLEMS)


def main() -> None:
    # a write past the file-size limit fails with EFBIG (reported) instead of killing the
    # process (CPython's own startup does this too; said here for embedders)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()


if __name__ == "__main__":
    main()
