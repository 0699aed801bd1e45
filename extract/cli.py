"""``cm-arr-extract``: from a corpus on disk to a feature store.

    cm-arr-extract manifest iemocap --root IEMOCAP_full_release --out iemocap.csv
    cm-arr-extract features iemocap --root IEMOCAP_full_release --manifest iemocap.csv \\
        --out feats.h5 [--modalities speech,text,video] [--device cuda] [--shard k/N] \\
        [--allow-missing] [--speech-model ...] [--text-model ...] \\
        [--denseface-checkpoint CKPT | --random-denseface]

Exit codes of ``features``: 0 the store is complete; 1 bad input or setup (the message names
the file or option and the problem; nothing is computed), another run writing the same output
(refused), or an extraction that left some utterance/modality without features or a recorded
error (no store is written; rerun to resume); 3 the store is written but some
utterances have no features for some modality (listed, and recorded in the store) and
``--allow-missing`` was not given; 130 interrupted by Ctrl-C, 143 by SIGTERM (what batch
schedulers send): finished utterances are committed first, and rerunning the same command
resumes.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build corpus manifests and extract speech, text and video features into a store.")
err = Console(stderr=True, soft_wrap=True)

EXIT_SETUP = 1
EXIT_MISSING = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


@app.callback()
def _group() -> None:
    """Build corpus manifests and extract speech, text and video features into a store."""


def _fail(message: str, code: int = EXIT_SETUP) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _register_manifest() -> None:
    try:
        from cmarr.extract.manifest_cli import manifest_command
    except ModuleNotFoundError as e:  # only when that module itself is absent
        if e.name != "cmarr.extract.manifest_cli":
            raise
        return
    app.command("manifest")(manifest_command)


_register_manifest()


@app.command("features")
def features_command(
    dataset: str = typer.Argument(..., help="Corpus of the manifest: iemocap or msp-improv."),
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
                                     help="wav2vec2 hub id or local folder."),
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
                                   "(a chunk is also committed at 64 MiB of features)."),
    commit_every: float = typer.Option(30.0, "--commit-every", min=0.001, help="Seconds after which finished "
                                       "utterances are committed, even if no other follows (what a kill can lose)."),
    log_every: float = typer.Option(10.0, "--log-every", help="Seconds between progress lines when the "
                                    "output is not a terminal."),
) -> None:
    """Extract features of the manifest's utterances into a feature store (resumable)."""
    console = Console(soft_wrap=True)  # long lines (paths) stay whole: readable logs, greppable output
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        from cmarr.extract.base import ExtractError, Terminated, sigterm_interrupts
        from cmarr.extract.features import parse_shard, run_features
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
            from cmarr.extract.video_extractor import VideoConfig

            video = VideoConfig(checkpoint=None if denseface_checkpoint is None else str(denseface_checkpoint),
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
            run = run_features(dataset, root, manifest, out, modalities=mods, device=device, shard=k_n,
                               allow_missing=allow_missing, speech=speech, text=text, video=video,
                               chunk_size=chunk_size, commit_seconds=commit_every, console=console,
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
              EXIT_MISSING)
    if not run.ok:
        _fail(f"{len(run.errors)} utterance/modality pairs have no features (listed above and recorded in "
              f"{run.out}); fix the media, or rerun with --allow-missing to accept them as missing modalities",
              EXIT_MISSING)


def main() -> None:
    # a write past the file-size limit fails with EFBIG (reported) instead of killing the
    # process (CPython's own startup does this too; said here for embedders)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()


if __name__ == "__main__":
    main()
