"""``cm-arr-predict``: apply trained CM-ARR checkpoints to a feature store or to a raw clip.

    cm-arr-predict --checkpoint RUN_DIR/fold1/best.pt [--checkpoint ...] --features FEATS.h5
                   --out predictions.csv [--conditions present|all|t,st,...]
                   [--device auto] [--batch-size 256] [--metrics metrics.json]
    cm-arr-predict --checkpoint ... --media CLIP.mp4 [--audio WAV] [--transcript TEXT | --transcript-file F]
                   [--start S --end E] [--window 8] [--no-audio] [--out pred.json]
                   [--speech-model DIR] [--text-model DIR] [--denseface-checkpoint CKPT]

What is checked and written: :mod:`cmarr.pipelines.predict` (stores) and
:mod:`cmarr.pipelines.media` (clips). Errors in the input are one line; exit codes follow
:mod:`cmarr.cli` (2: bad input, nothing written).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, List, Mapping, Optional

import typer
from rich.console import Console
from rich.table import Table

from cmarr.cli import EXIT_CODES_HELP, EXIT_USAGE, version_option
from cmarr.extract.base import LABELS
from cmarr.extract.files import write_csv_atomic, write_json_atomic

from ..metrics import ROW_NAMES, TABLE_ROWS
from ..predict import PredictError, parse_conditions, predict_store, prediction_metrics

app = typer.Typer(add_completion=False, epilog=EXIT_CODES_HELP,
                  help="Apply trained CM-ARR checkpoints to a feature store (--features) or a raw clip (--media).")
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


@contextlib.contextmanager
def _one_line_errors(out_path: Optional[Path]):
    """Bad input (``PredictError``) and a file that cannot be read or written (``OSError``)
    end the command with one line and exit code 2."""
    try:
        yield
    except PredictError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as e:
        err.print(f"[red]error:[/] {e.filename or out_path}: {e.strerror or e}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


@app.command(epilog=EXIT_CODES_HELP)
def predict(
    checkpoint: List[Path] = typer.Option(..., "--checkpoint", help="best.pt of a cm-arr-train run; give several "
                                          "(e.g. every fold) to average their probabilities."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature store made by cm-arr-extract features: "
                                            "predict every utterance in it."),
    media: Optional[Path] = typer.Option(None, "--media", help="A video clip (mp4, mkv, avi, webm, ...): its face "
                                         "frames and, unless --audio is given, its audio track."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="The clip's speech as an audio file; alone (without "
                                         "--media): an audio-only clip."),
    transcript: Optional[str] = typer.Option(None, "--transcript", help="What is said in the clip (text)."),
    transcript_file: Optional[Path] = typer.Option(None, "--transcript-file", help="A UTF-8 text file holding "
                                                   "what is said in the clip."),
    start: Optional[float] = typer.Option(None, "--start", help="Start of the span to predict, seconds."),
    end: Optional[float] = typer.Option(None, "--end", help="End of the span to predict, seconds."),
    window: float = typer.Option(8.0, "--window", help="A clip longer than this many seconds is predicted per "
                                 "window and overall (0: one prediction for the whole clip)."),
    no_audio: bool = typer.Option(False, "--no-audio", help="Predict a video without an audio track from its face "
                                  "(and transcript) alone."),
    speech_model: Optional[str] = typer.Option(None, "--speech-model", help="Local copy of the speech model the "
                                               "checkpoint's store was made with (its weights' sha256 is checked)."),
    text_model: Optional[str] = typer.Option(None, "--text-model", help="Local copy of the text model the "
                                             "checkpoint's store was made with (sha256 checked)."),
    denseface_checkpoint: Optional[str] = typer.Option(None, "--denseface-checkpoint", help="Local copy of the "
                                                       "Denseface checkpoint the store was made with (sha256 "
                                                       "checked)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="--features: predictions CSV (one row per utterance "
                                            "and condition; required). --media: a JSON file of the prediction."),
    conditions: str = typer.Option("present", "--conditions", help="--features: present (each utterance with what "
                                   "the store has), all (the seven conditions), or names: t,s,v,vt,sv,st,svt."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Utterances (or clip windows) per model call."),
    metrics_path: Optional[Path] = typer.Option(None, "--metrics", help="--features: also write WAR/UAR per "
                                                "condition (labelled utterances not seen in training) as JSON."),
    allow_feature_mismatch: bool = typer.Option(False, "--allow-feature-mismatch", help="--features: predict on "
                                                "features made differently from the training store's (the "
                                                "differences are printed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out / --metrics file."),
    version: Optional[bool] = version_option("cm-arr-predict"),
) -> None:
    """Predict the emotion of every utterance of a store, or of one raw clip, under missing modalities."""
    if (features is None) == (media is None and audio is None):
        err.print("[red]error:[/] give either --features FEATS.h5 or --media CLIP (and/or --audio WAV)",
                  highlight=False)
        raise typer.Exit(EXIT_USAGE)
    if features is None:
        predict_media(checkpoint, media, audio, transcript, transcript_file, start, end, window, no_audio,
                      speech_model, text_model, denseface_checkpoint, out_path, device, batch_size, overwrite)
        return
    if out_path is None:
        err.print("[red]error:[/] --features needs --out predictions.csv", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    with _one_line_errors(out_path):
        conds = parse_conditions(conditions)
        if metrics_path is not None and metrics_path.resolve() == out_path.resolve():
            raise PredictError(f"{metrics_path}: --metrics and --out name the same file")
        for p in (out_path, metrics_path):
            if p is not None:
                _check_output(p, [features, *checkpoint], overwrite, "--features / --checkpoint")
        table, accepted = predict_store(checkpoint, features, conds, device=device, batch_size=batch_size,
                                        allow_feature_mismatch=allow_feature_mismatch)
        for d in accepted:
            err.print(f"[yellow]feature mismatch accepted:[/] {d}", highlight=False)
        write_csv_atomic(table, out_path)
        metrics = prediction_metrics(table)
        if metrics_path is not None:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(metrics_path, {"checkpoints": [str(c) for c in checkpoint], "features": str(features),
                                             "labels": list(LABELS), "conditions": metrics})
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


def _check_output(p: Path, inputs: List[Path], overwrite: bool, names: str) -> None:
    """Refuse an output path that is an input (``names`` says which options give inputs), a
    folder, an existing file (unless ``overwrite``) or under a file."""
    if any(p.resolve() == i.resolve() for i in inputs):
        raise PredictError(f"{p}: is an input ({names}); choose another output path")
    if p.is_dir():
        raise PredictError(f"{p}: is a folder; give a file path")
    if p.exists() and not overwrite:
        raise PredictError(f"{p}: already exists; choose another path or pass --overwrite")
    if p.parent.exists() and not p.parent.is_dir():
        raise PredictError(f"{p.parent}: is a file, not a folder")


def prediction_table(r, title: str) -> Table:
    """Probabilities of a clip (and of each window), with the modalities used and reconstructed
    (s speech, t text, v video) and the sampled frames with a face."""
    from rich import box

    from ..conditions import MODALITY_LETTERS

    def letters(ms):
        return ",".join(MODALITY_LETTERS[m] for m in ms) or "-"

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("span (s)", no_wrap=True)
    for c in LABELS:
        t.add_column(c, justify="right", no_wrap=True, min_width=5)
    for col in ("label", "used", "recon." if r.reconstructed or not r.missing else "missing", "faces"):
        t.add_column(col, justify="right" if col == "faces" else "left", no_wrap=True)
    for w in list(r.windows) + [r]:
        t.add_row(("all " if w is r and r.windows else "") + f"{w.start:.2f}-{w.end:.2f}",
                  *[f"{w.probs[c]:.3f}" for c in LABELS], f"[bold]{w.label}[/]" if w is r else w.label,
                  letters(w.used), letters(w.reconstructed or w.missing),
                  f"{w.face_frames}/{w.sampled_frames}" if w.sampled_frames else "-")
    return t


def predict_media(checkpoint, media, audio, transcript, transcript_file, start, end, window, no_audio,
                  speech_model, text_model, denseface_checkpoint, out_path, device, batch_size, overwrite) -> None:
    """The --media branch: one clip, a table on stdout, and the JSON of ``Prediction.to_dict``."""
    from transformers.utils import logging as hf_logging

    import cmarr

    from ..media import MediaError, Predictor

    hf_logging.disable_progress_bar()  # one table is the output; no bar per model load
    with _one_line_errors(out_path):
        if transcript is not None and transcript_file is not None:
            raise MediaError("give --transcript or --transcript-file, not both")
        if transcript_file is not None:
            if not transcript_file.is_file():
                raise MediaError(f"{transcript_file}: no such transcript file")
            try:
                transcript = transcript_file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise MediaError(f"{transcript_file}: not UTF-8 text") from None
        if out_path is not None:
            _check_output(out_path, list(checkpoint) + [p for p in (media, audio) if p is not None], overwrite,
                          "--media / --audio / --checkpoint")
        p = Predictor.from_checkpoints(checkpoint, device=device, window=window, speech_model=speech_model,
                                       text_model=text_model, denseface_checkpoint=denseface_checkpoint,
                                       batch_size=batch_size)
        r = p.predict_file(media, audio=audio, transcript=transcript, start=start, end=end, no_audio=no_audio)
        doc = {"cm_arr_version": cmarr.__version__, "checkpoints": [str(c) for c in checkpoint],
               "window": window, **r.to_dict()}
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_path, doc)
    out.print(prediction_table(r, f"{media or audio}: {r.label}"))
    if r.missing:
        what = "reconstructed by CM-ARR" if r.reconstructed else "missing (this model does not reconstruct)"
        out.print("; ".join(f"{m} {what} ({r.why[m]})" for m in r.missing), highlight=False)
    for n in r.notes:
        out.print(n, highlight=False)
    if out_path is not None:
        out.print(f"written: {out_path}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
