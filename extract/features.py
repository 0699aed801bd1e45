"""From a manifest to a feature store: ``cm-arr-extract features``.

``run_features`` reads the manifest, builds the extractors of the requested modalities
(``speech``: wav2vec2, ``text``: BERT, ``video``: Denseface), and writes every
(utterance, modality) into a ``StoreWriter``:

- **Provenance** per modality: what the extractor reports (model id, revision, resolved
  commit or weight hashes, layer, rates, tokenizer, batching policy, compute dtype) plus the
  manifest's sha256 and the corpus name. The writer adds library versions, the project
  version, the host and the creation time.
- **Sharding**: ``shard=(k, N)`` keeps the rows whose position in the id-sorted manifest is
  ``k`` modulo ``N`` (deterministic, balanced, independent of the manifest's row order) and
  writes ``OUT`` with ``.shard-k-of-N`` before its extension (``feats.shard-0-of-2.h5``); join
  the shards with ``cm-arr-features merge`` (which lists them in the single-process order).
  Under ``torchrun`` (``WORLD_SIZE > 1``) the shard is taken from ``RANK``/``WORLD_SIZE`` and
  ``device="auto"`` becomes ``cuda:LOCAL_RANK``.
  An explicit shard wins over the environment.
- **Resume**: the writer commits finished utterances in chunks beside the output; a rerun
  of the same command skips every (utterance, modality) whose features are already
  committed and says how many it skipped. Pairs recorded as errors are tried again (the
  media may have been fixed since); the newest outcome is kept. A rerun with a manifest
  whose utterances differ (a rebuilt manifest) is refused, saying which were added, removed
  or changed. One run at a time writes an output: a second run on the same ``--out`` (or
  shard file) is refused while the first holds the writer's lock, and a killed run's lock
  is released by the kernel.
- **Coverage**: the store is written only when every (utterance, modality) of the job has
  features or a recorded error; otherwise the run fails naming the uncovered pairs, and a
  rerun extracts them.
- **Progress**: a rich progress bar per modality with utterances/s, media seconds/s (the
  manifest's ``end - start``) and ETA on a terminal; a plain log line every
  ``log_every`` seconds otherwise.
- **Errors**: an utterance without usable data for a modality (no file, unreadable or
  zero-length audio, empty transcript, no face...) is recorded with its reason in the
  store's error table and listed in a summary at the end. ``FeaturesRun.ok`` is False
  when such errors exist, unless ``allow_missing`` accepts them as missing modalities.
  Nothing is skipped silently and no zeros stand in for data.
- **Overlap**: on CUDA the extractor runs in a worker thread ahead of the writing
  (``run_ahead``), so the GPU computes the next batch while the last one is stored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmarr.extract.base import MODALITIES, ExtractError, Extractor, run_ahead
from cmarr.extract.files import file_sha256
from cmarr.extract.store import (
    CHUNK_SIZE,
    FeatureStore,
    OutputLock,
    StoreWriter,
    errors_hint,
    make_folder,
    select_shard,
    utterance_order,
)

DATASETS = ("iemocap", "msp-improv", "folder")
#: Which face a frame keeps when the detector finds several (``DetectorConfig.selection``),
#: per dataset. IEMOCAP's halves and MSP-IMPROV's clips frame the speaker in front, so the
#: largest face is the speaker. A folder's clips are of unknown framing (one person per clip
#: is assumed, at any size and place): there the largest box may be a bystander, a poster or
#: a false detection, so the most confident face is kept. ``video_config`` applies it; a
#: ``VideoConfig`` passed to ``run_features`` is used as it is.
FACE_SELECTION: dict[str, str] = {"iemocap": "largest", "msp-improv": "largest", "folder": "probability"}
#: Rows of the error summary printed at the end (all are in the store's error table).
SUMMARY_ROWS = 50


# --------------------------------------------------------------------------------------
# sharding


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/N"`` -> ``(k, N)`` with ``0 <= k < N``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ExtractError(f"--shard {text!r}: expected k/N, e.g. 0/4 (shards are numbered from 0)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise ExtractError(f"--shard {text!r}: need N >= 1 and 0 <= k < N")
    return k, n


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of this process under torchrun (``RANK``/``WORLD_SIZE``), else None."""
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE")
    if world is None:
        return None
    if not world.strip().isdigit():
        raise ExtractError(f"WORLD_SIZE={world!r}: expected a whole number (the number of processes)")
    if int(world) <= 1:
        return None
    rank = env.get("RANK")
    if rank is None:
        raise ExtractError(f"WORLD_SIZE={world} is set but RANK is not")
    if not rank.strip().isdigit() or int(rank) >= int(world):
        raise ExtractError(f"RANK={rank!r} and WORLD_SIZE={world!r} in the environment (set by torchrun, or left "
                           f"over): need a whole number 0 <= RANK < WORLD_SIZE; give --shard k/N to override them")
    return int(rank), int(world)


def shard_path(out: str | os.PathLike, k: int, n: int) -> Path:
    """``feats.h5`` -> ``feats.shard-k-of-N.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{k}-of-{n}{out.suffix}")


# --------------------------------------------------------------------------------------
# progress


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, console: Console, log_every: float):
        self.console = console
        self.log_every = log_every
        self.live = console.is_terminal
        self._bar = None
        self._tasks: dict[str, Any] = {}
        self._state: dict[str, dict] = {}
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description:<6}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rates]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=False)

    def __enter__(self):
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()

    def start(self, modality: str, total: int, done: int) -> None:
        self._state[modality] = {"total": total, "done": done, "n": 0, "media": 0.0,
                                 "t0": time.monotonic(), "last": time.monotonic()}
        if self._bar is not None:
            self._tasks[modality] = self._bar.add_task(modality, total=total, completed=done, rates="")

    def _rates(self, s: dict) -> tuple[float, float, float]:
        dt = max(time.monotonic() - s["t0"], 1e-9)
        ups, mps = s["n"] / dt, s["media"] / dt
        left = s["total"] - s["done"] - s["n"]
        eta = left / ups if ups > 0 else float("nan")
        return ups, mps, eta

    def advance(self, modality: str, media_seconds: float) -> None:
        s = self._state[modality]
        s["n"] += 1
        s["media"] += media_seconds
        ups, mps, eta = self._rates(s)
        if self._bar is not None:
            self._bar.update(self._tasks[modality], advance=1,
                             rates=f"{ups:7.1f} utt/s {mps:8.1f} media s/s")
        elif time.monotonic() - s["last"] >= self.log_every:
            s["last"] = time.monotonic()
            self.line(modality)

    def line(self, modality: str) -> None:
        s = self._state[modality]
        ups, mps, eta = self._rates(s)
        n = s["done"] + s["n"]
        eta_text = "-" if not np.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        self.console.print(f"{modality}: {n}/{s['total']} utterances ({100 * n / max(s['total'], 1):.1f}%), "
                           f"{ups:.1f} utt/s, {mps:.1f} media s/s, ETA {eta_text}", highlight=False)

    def finish(self, modality: str) -> None:
        if self._bar is None:
            self.line(modality)


# --------------------------------------------------------------------------------------
# the run


@dataclass
class FeaturesRun:
    """What ``run_features`` did.

    ``out``: the store written; ``shard``: ``(k, N)`` or None; ``computed``: results
    produced by this run per modality; ``resumed``: pairs found finished and skipped;
    ``errors``: the store's recorded errors of the modalities of this run (``utterance_id,
    modality, reason``); ``empty``: requested modalities that no utterance has features of;
    ``ok``: no errors, or ``allow_missing``, and no modality empty (``--allow-missing``
    accepts some utterances without a modality, not a store without it); ``short_videos``:
    utterance -> sampled frames past the end of its video (stored with the frames that
    exist; shown in the summary).
    """

    out: Path
    shard: tuple[int, int] | None
    computed: dict[str, int]
    resumed: dict[str, int]
    errors: pd.DataFrame
    ok: bool
    seconds: float = 0.0
    empty: list[str] = field(default_factory=list)
    short_videos: dict[str, int] = field(default_factory=dict)


def _manifest(path: Path, dataset: str) -> pd.DataFrame:
    from cmarr.extract.corpora.manifest import ManifestError, read_manifest

    if not path.exists():
        raise ExtractError(f"{path}: no such manifest (build it with `cm-arr-extract manifest {dataset} "
                           f"--root DIR --out {path}`)")
    try:
        df = read_manifest(path)
    except ManifestError as e:
        raise ExtractError(str(e)) from None
    if df.empty:
        raise ExtractError(f"{path}: the manifest has no utterances")
    other = sorted(set(df["corpus"]) - {dataset})
    if other:
        raise ExtractError(f"{path}: manifest rows of corpus {other[0]!r}, but the dataset is {dataset!r}")
    return df


def video_config(dataset: str, **settings):
    """The ``VideoConfig`` of ``dataset``: ``settings`` with the detector's face selection of
    ``FACE_SELECTION`` (the command line builds its video settings here)."""
    from cmarr.extract.faces import DetectorConfig
    from cmarr.extract.video import VideoConfig

    if dataset not in FACE_SELECTION:
        raise ExtractError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    detector = dataclasses.replace(settings.pop("detector", DetectorConfig()), selection=FACE_SELECTION[dataset])
    return VideoConfig(detector=detector, **settings)


def build_extractors(modalities: Sequence[str], speech=None, text=None, video=None) -> dict[str, Extractor]:
    """The extractors of ``modalities`` from their configs (``None`` = defaults; video has
    no default: it needs a Denseface checkpoint or ``allow_random_weights``)."""
    out: dict[str, Extractor] = {}
    for m in modalities:
        if m == "speech":
            from cmarr.extract.speech import SpeechConfig, SpeechExtractor

            out[m] = SpeechExtractor(speech or SpeechConfig())
        elif m == "text":
            from cmarr.extract.text import TextConfig, TextExtractor

            out[m] = TextExtractor(text or TextConfig())
        elif m == "video":
            from cmarr.extract.video import VideoConfig, VideoExtractor

            out[m] = VideoExtractor(video or VideoConfig())
        else:
            raise ExtractError(f"unknown modality {m!r} (expected some of {', '.join(MODALITIES)})")
    return out


def _on_cuda(ex: Extractor) -> bool:
    return str(getattr(ex, "device", "")).startswith("cuda")


def _device_setup(ex: Extractor):
    """What the worker thread running ``ex`` needs first: the extractor's CUDA device made
    current there (it is per thread), or nothing."""
    if not _on_cuda(ex):
        return None
    import torch

    dev = torch.device(str(ex.device))
    return (lambda: torch.cuda.set_device(dev)) if dev.index is not None else None


def _with_device(config, device: str):
    """``config`` with its device set to ``device`` (left as it is for ``"auto"``)."""
    if config is None or device == "auto":
        return config
    return dataclasses.replace(config, device=device)


def run_features(dataset: str, root: str | os.PathLike, manifest: str | os.PathLike,
                 out: str | os.PathLike, modalities: Sequence[str] = MODALITIES,
                 device: str = "auto", shard: tuple[int, int] | None = None,
                 allow_missing: bool = False, speech=None, text=None, video=None,
                 chunk_size: int = CHUNK_SIZE, store_dtype: str = "float16",
                 console: Console | None = None, log_every: float = 10.0,
                 env: Mapping[str, str] | None = None, overlap: bool | None = None) -> FeaturesRun:
    """Extract ``modalities`` for the utterances of ``manifest`` into the store ``out``
    (or its shard file), resuming a previous run of the same job. See the module docstring.

    ``speech``/``text``/``video``: ``SpeechConfig``/``TextConfig``/``VideoConfig`` (their
    ``device`` is replaced by ``device``). ``overlap``: run each extractor in a worker
    thread ahead of the store writing (``run_ahead``); ``None`` = when the extractor runs on
    CUDA, so that the GPU computes while results are stored (on the CPU the two would compete
    for the same cores). Raises ``ExtractError`` / ``StoreError`` for setup problems;
    per-utterance problems end up in ``FeaturesRun.errors``.
    """
    t_start = time.monotonic()
    console = console or Console(soft_wrap=True)
    env = os.environ if env is None else env
    if dataset not in DATASETS:
        raise ExtractError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    modalities = tuple(dict.fromkeys(modalities))
    if not modalities:
        raise ExtractError("no modalities to extract")
    for m in modalities:
        if m not in MODALITIES:
            raise ExtractError(f"unknown modality {m!r} (expected some of {', '.join(MODALITIES)})")
    root, manifest, out = Path(root), Path(manifest), Path(out)
    if not root.is_dir():
        raise ExtractError(f"{root}: corpus root is not a folder")
    if chunk_size < 1:
        raise ExtractError(f"chunk size {chunk_size}: must be >= 1")
    shard = shard if shard is not None else shard_from_env(env)
    if device == "auto" and "LOCAL_RANK" in env:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(env['LOCAL_RANK'])}"

    table = _manifest(manifest, dataset)
    manifest_sha = file_sha256(manifest)
    rows = select_shard(table, *shard) if shard else utterance_order(table)  # the store's order
    target = shard_path(out, *shard) if shard else out
    make_folder(target.parent, out)
    where = f" (shard {shard[0]} of {shard[1]}: {len(rows)} of {len(table)} utterances)" if shard else ""
    console.print(f"{dataset}: {len(rows)} utterances from {manifest}{where} -> {target}", highlight=False)

    if "video" in modalities:
        from cmarr.extract.video import require_weights

        require_weights(video)  # a missing option first: it is wrong whatever the media
    check_media_root(rows, root, modalities, manifest)  # a wrong --root: said now, not as N errors

    # the output is locked before the models load: a second run on it is refused at once
    lock = OutputLock(target)
    try:
        if device != "auto":
            from cmarr.extract.speech import SpeechConfig
            from cmarr.extract.text import TextConfig

            speech = speech or (SpeechConfig() if "speech" in modalities else None)
            text = text or (TextConfig() if "text" in modalities else None)
        extractors = build_extractors(modalities, speech=_with_device(speech, device),
                                      text=_with_device(text, device), video=_with_device(video, device))
        provenance = {m: {**ex.provenance(), "corpus": dataset, "manifest_sha256": manifest_sha}
                      for m, ex in extractors.items()}

        writer = StoreWriter(target, rows, provenance, chunk_size=chunk_size, dtype=store_dtype, lock=lock,
                             extra_attrs={"shard": f"{shard[0]}/{shard[1]}"} if shard and shard[1] > 1 else None)
    except BaseException:
        lock.release(remove_folder=lock.created)  # a folder made just now holds nothing
        raise
    done = writer.done()
    retried = writer.retried()
    duration = dict(zip(rows["utterance_id"], (rows["end"] - rows["start"]).clip(lower=0.0).to_numpy()))
    computed: dict[str, int] = {}
    resumed: dict[str, int] = {}
    try:
        with _Progress(console, log_every) as progress:
            for m, ex in extractors.items():
                todo_mask = np.array([(u, m) not in done for u in rows["utterance_id"]], dtype=bool)
                todo = rows[todo_mask]
                resumed[m] = int((~todo_mask).sum())
                again = sum((u, m) in retried for u in todo["utterance_id"])
                if resumed[m] or again:
                    console.print(f"{m}: {resumed[m]} of {len(rows)} utterances already in the store "
                                  f"(resumed), {len(todo)} to extract"
                                  + (f", of which {again} recorded as errors before and tried again" if again else ""),
                                  highlight=False)
                progress.start(m, len(rows), resumed[m])
                expected = set(todo["utterance_id"])
                seen: set[str] = set()
                results = iter(ex.extract(todo, root))
                if overlap if overlap is not None else _on_cuda(ex):
                    # the extractor computes the next results in a worker thread while these are stored
                    results = run_ahead(results, setup=_device_setup(ex))
                with contextlib.closing(results) if hasattr(results, "close") else contextlib.nullcontext():
                    for res in results:
                        utt = res.utterance_id
                        if utt not in expected or utt in seen:
                            raise RuntimeError(f"{m} extractor returned {utt!r} "
                                               f"{'twice' if utt in seen else 'which was not asked for'}")
                        seen.add(utt)
                        if res.error is not None:
                            writer.add_error(utt, m, res.error)
                        elif res.matrix is None:
                            writer.add_error(utt, m, "extractor returned neither features nor a reason")
                        else:
                            writer.add(utt, m, res.matrix, **res.meta)
                        progress.advance(m, float(duration.get(utt, 0.0)))
                for utt in sorted(expected - seen):
                    writer.add_error(utt, m, "extractor returned no result for this utterance")
                computed[m] = len(seen)
                progress.finish(m)
    except BaseException:
        try:
            writer.flush()  # keep what is finished: the same command resumes from it
        finally:
            writer.close()
        raise
    writer.finalize()  # raises, writing nothing, unless every (utterance, modality) is covered

    store = FeatureStore(target)
    errors = store.errors[store.errors["modality"].isin(modalities)].reset_index(drop=True)  # this job's
    others = len(store.errors) - len(errors)
    counts = {m: len(store.ids(m)) for m in modalities}
    empty = [m for m in modalities if len(rows) and counts[m] == 0]
    short = {}
    if "video" in modalities:
        missing = {u: int(store.meta(u, "video").get("frames_missing", 0)) for u in sorted(store.ids("video"))}
        short = {u: n for u, n in missing.items() if n > 0}
    store.close()
    run = FeaturesRun(out=target, shard=shard, computed=computed, resumed=resumed, errors=errors,
                      ok=(errors.empty or allow_missing) and not empty, seconds=time.monotonic() - t_start,
                      short_videos=short, empty=empty)
    print_summary(console, run, counts, len(rows), allow_missing)
    if others:
        console.print(f"(the store also records {others} missing pairs of modalities this run did not extract; "
                      f"{errors_hint(target)} lists them)", highlight=False)
    return run


def check_media_root(rows: pd.DataFrame, root: Path, modalities: Sequence[str], manifest: Path) -> None:
    """Refuse a run in which a requested modality has media for no utterance: none of the
    manifest's wav (video) files exist under ``root`` (a ``--root`` other than the folder
    the manifest was built from: its paths are relative to it), or the manifest names none
    at all (built from a corpus copy without wav or avi files, its path cells are empty;
    text: no transcript). Each would otherwise load the models, make one error per
    utterance and a store without that modality, which ``--allow-missing`` would accept.
    Some files missing is a per-utterance matter and left to the extractors."""
    media = {"speech": ("wav_path", "wav"), "video": ("video_path", "video"), "text": ("transcript", "transcript")}
    for m in modalities:
        col, what = media.get(m, (None, None))
        if col is None or col not in rows.columns:
            continue
        paths = [str(p) for p in rows[col] if isinstance(p, str) and p.strip()]
        if not paths:
            fix = ("add them and rebuild the manifest (`cm-arr-extract manifest`)" if m != "text"
                   else "add the transcriptions and rebuild the manifest")
            raise ExtractError(f"{root}: no {m} for any of the {len(rows)} utterances: {manifest.name} names no "
                               f"{what} {'file ' if m != 'text' else ''}(its {col} column is empty), so the corpus "
                               f"copy it was built from has none; {fix}, or leave {m} out of --modalities")
        if m == "text":
            continue
        if not any((root / p).is_file() for p in paths):
            raise ExtractError(f"{root}: none of the {len(paths)} {m} files that {manifest.name} names exist under "
                               f"this corpus root (first: {root / paths[0]}); give --root the folder the manifest "
                               "was built from")


def print_summary(console: Console, run: FeaturesRun, counts: Mapping[str, int], n_rows: int,
                  allow_missing: bool) -> None:
    """Per-modality counts and the table of utterances without features (id, modality,
    reason)."""
    t = Table(title=f"{run.out}", title_justify="left")
    for col in ("modality", "features", "missing", "computed now", "resumed"):
        t.add_column(col, justify="left" if col == "modality" else "right")
    for m, n in counts.items():
        missing = int((run.errors["modality"] == m).sum()) if len(run.errors) else 0
        t.add_row(m, str(n), str(missing), str(run.computed.get(m, 0)), str(run.resumed.get(m, 0)))
    console.print(t)
    if len(run.errors):
        e = Table(title=f"{len(run.errors)} utterance/modality pairs without features", title_justify="left")
        e.add_column("utterance_id")
        e.add_column("modality")
        e.add_column("reason", overflow="fold")
        for r in run.errors.head(SUMMARY_ROWS).itertuples(index=False):
            e.add_row(escape(str(r.utterance_id)), str(r.modality), escape(str(r.reason)))
        console.print(e)
        if len(run.errors) > SUMMARY_ROWS:
            console.print(f"... and {len(run.errors) - SUMMARY_ROWS} more (all are in the store's error table; "
                          f"{errors_hint(run.out)} lists them)", highlight=False)
        if allow_missing:
            console.print("--allow-missing: these modalities are recorded as missing for those utterances.",
                          highlight=False)
    for m in run.empty:
        console.print(f"[red]{m}: no utterance has features[/] (all {n_rows} recorded as errors above): the store "
                      f"has no usable {m}, whatever --allow-missing says; leave {m} out of --modalities if the "
                      "corpus copy has none", highlight=False)
    if run.short_videos:
        first = ", ".join(f"{u} ({n})" for u, n in list(run.short_videos.items())[:5])
        console.print(f"[yellow]video:[/] {len(run.short_videos)} utterances' spans run past the end of their video "
                      f"({sum(run.short_videos.values())} sampled frames missing; {first}"
                      f"{', ...' if len(run.short_videos) > 5 else ''}); their features hold the frames that exist "
                      "(meta frames_missing)", highlight=False, soft_wrap=True)
    console.print(f"done in {run.seconds:.1f} s", highlight=False)
