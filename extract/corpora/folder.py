"""A folder of media files: one utterance per clip, unlabelled unless labels are given.

Layout read (``root`` = any folder, searched recursively)::

    <root>/<any/sub/folders>/<name>.{mp4,mkv,avi,webm,mov}   video (with or without an audio track)
    <root>/<any/sub/folders>/<name>.{wav,flac,ogg,mp3,m4a}   audio
    <root>/<any/sub/folders>/<name>.txt                      transcript (UTF-8), optional

Files are grouped by their path relative to ``root`` without the extension, with ``/``
between folders: that is the ``utterance_id`` (``interviews/day1/clip03``). Per utterance:

- **speech**: the audio file; with a video only, the video file itself (the speech
  extractor decodes its audio track; a video without one has no speech);
- **face**: the video file, the whole frame (``video_half`` ``full``): one person per clip
  is assumed, and the video extractor keeps the most probable face of each frame for this
  corpus (``cmarr.extract.features.FACE_SELECTION``);
- **text**: the same-named ``.txt``, whitespace runs joined into single spaces;
- **times**: ``start`` 0 and ``end`` the duration of the speech source (else of the video),
  read from the file's header (soundfile for wav/flac/ogg, PyAV for the rest);
  ``video_start`` 0, ``video_end`` empty (to the end of the file).

``label`` comes from an optional labels CSV (``utterance_id,label``, labels ``ang hap neu
sad``), else it is empty; ``session``, ``fold``, ``speaker`` and ``gender`` are empty (a
folder says nothing about them). Such a manifest is enough to extract features; training
needs labels and folds and refuses a store without them.

Nothing under ``root`` is passed over silently; each of these is a ``Dropped`` item:

- a file that is not media nor a transcript, a hidden file or folder (name starting with
  ``.``, such as macOS ``._*`` junk);
- an utterance with two files of one kind (``a.mp4`` and ``a.mkv``), or whose media file
  cannot be opened or holds no audio or video stream (the utterance is left out: fix or
  remove the file);
- a transcript without media beside it;
- a transcript that cannot be read or is empty (the utterance is kept, without text).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from cmarr.extract.base import LABELS

from .manifest import Dropped, ManifestError, ManifestResult, make_manifest, read_text, rel

CORPUS = "folder"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a")
TEXT_EXTENSION = ".txt"
#: Audio read by soundfile (libsndfile) from its header; the rest through PyAV.
_SOUNDFILE = (".wav", ".flac", ".ogg")

R_NOT_MEDIA = "not a media file"
R_HIDDEN = "hidden file or folder"
R_SEVERAL = "several files of one kind"
R_UNREADABLE = "media file cannot be opened"
R_NO_STREAM = "no audio or video stream"
R_TEXT_ONLY = "transcript without media"
R_BAD_TRANSCRIPT = "transcript unreadable (utterance kept without text)"
R_EMPTY_TRANSCRIPT = "transcript empty (utterance kept without text)"


class _Unreadable(Exception):
    """A media file that cannot be used; ``str(e)`` says why."""


def _av_streams(path: Path) -> tuple[float | None, float | None]:
    """``(audio seconds or None, video seconds or None)`` of a container read by PyAV: each
    stream's declared duration, else the end of its last packet (demuxed, not decoded); None
    for a stream the file does not have."""
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.FFmpegError subclasses, OSError
        raise _Unreadable(_av_error(e)) from None
    with container:
        out: list[float | None] = []
        for streams in (container.streams.audio, container.streams.video):
            if not streams:
                out.append(None)
                continue
            s = streams[0]
            if s.duration and s.time_base:
                out.append(float(s.duration * s.time_base))
            elif container.duration:
                out.append(container.duration / 1e6)  # microseconds (av.time_base)
            else:
                out.append(_demuxed_seconds(path, s.index))
    return out[0], out[1]


def _demuxed_seconds(path: Path, index: int) -> float:
    """The end of the last packet of stream ``index`` (a file whose header gives no duration)."""
    import av

    end = 0.0
    try:
        with av.open(str(path)) as c:
            s = c.streams[index]
            for pkt in c.demux(s):
                if pkt.pts is not None and pkt.time_base:
                    end = max(end, float((pkt.pts + (pkt.duration or 0)) * pkt.time_base))
    except Exception as e:
        raise _Unreadable(f"cannot read its packets: {_av_error(e)}") from None
    return end


def _audio_seconds(path: Path) -> float:
    if path.suffix.lower() in _SOUNDFILE:
        import soundfile

        try:
            return float(soundfile.info(str(path)).duration)
        except Exception:  # not what its name says: let FFmpeg try
            pass
    audio, _ = _av_streams(path)
    if audio is None:
        raise _Unreadable("no audio stream in this audio file")
    return audio


def _av_error(e: BaseException) -> str:
    """FFmpeg's reason without the errno and the path PyAV adds to it."""
    return getattr(e, "strerror", None) or _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _scan(root: Path, dropped: list[Dropped]) -> dict[str, dict[str, list[Path]]]:
    """``{utterance_id: {"video"|"audio"|"text": [paths]}}`` of every file under ``root``;
    the rest reported in ``dropped``."""
    groups: dict[str, dict[str, list[Path]]] = {}
    for folder, dirs, files in os.walk(root, onerror=lambda e: dropped.append(
            Dropped("", R_UNREADABLE, str(e.filename), f"cannot list the folder: {e.strerror or e}"))):
        here = Path(folder)
        for d in sorted(dirs):
            if d.startswith("."):
                dropped.append(Dropped("", R_HIDDEN, rel(here / d, root) + "/", "folder not searched"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = here / name
            where = rel(path, root)
            if name.startswith("."):
                dropped.append(Dropped("", R_HIDDEN, where))
                continue
            ext = path.suffix.lower()
            kind = ("video" if ext in VIDEO_EXTENSIONS else "audio" if ext in AUDIO_EXTENSIONS
                    else "text" if ext == TEXT_EXTENSION else None)
            if kind is None:
                dropped.append(Dropped("", R_NOT_MEDIA, where, ext or "no extension"))
                continue
            uid = rel(path.with_suffix(""), root)
            groups.setdefault(uid, {}).setdefault(kind, []).append(path)
    return groups


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """``{utterance_id: label}`` from a CSV with columns ``utterance_id,label`` (others are
    ignored). Raises ``ManifestError`` naming the file, and the row where one is at fault:
    unreadable, a column missing, an empty or repeated id, a label not in ``LABELS``."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ManifestError(path, f"cannot read the labels: {_first_line(e)}") from None
    missing = [c for c in ("utterance_id", "label") if c not in df.columns]
    if missing:
        raise ManifestError(path, f"labels CSV lacks columns {missing} (expected utterance_id,label; "
                                  f"found {list(df.columns)[:6]})")
    out: dict[str, str] = {}
    for i, (uid, label) in enumerate(zip(df["utterance_id"].str.strip(), df["label"].str.strip()), 1):
        if not uid:
            raise ManifestError(path, f"row {i}: empty utterance_id")
        if label not in LABELS:
            raise ManifestError(path, f"row {i} ({uid}): label {label!r} is not one of {', '.join(LABELS)}")
        if uid in out:
            raise ManifestError(path, f"row {i}: utterance {uid!r} is labelled twice")
        out[uid] = label
    return out


def prepare_folder(root: str | os.PathLike, labels: str | os.PathLike | dict[str, str] | None = None
                   ) -> ManifestResult:
    """Build the manifest of the media under ``root`` (rules in the module docstring).

    ``labels``: a labels CSV (``read_labels``) or ``{utterance_id: label}``; every id in it
    must be an utterance found under ``root`` (else ``ManifestError``, naming the ids and,
    for an utterance that was dropped, why). Utterances it does not name stay unlabelled
    (a note counts them). Raises ``ManifestError`` when ``root`` is not a folder or holds
    no media at all."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "not a folder; expected a folder of media files (video: "
                                  f"{' '.join(VIDEO_EXTENSIONS)}; audio: {' '.join(AUDIO_EXTENSIONS)})")
    labels_where = str(labels) if labels is not None and not isinstance(labels, dict) else "labels"
    if labels is not None and not isinstance(labels, dict):
        labels = read_labels(labels)
    dropped: list[Dropped] = []
    notes: list[str] = []
    rows: list[dict] = []
    counts = {"video with an audio file": 0, "video with its own audio track": 0, "audio only": 0,
              "video without audio": 0}
    for uid, files in sorted(_scan(root, dropped).items()):
        videos, audios, texts = files.get("video", []), files.get("audio", []), files.get("text", [])
        several = [k for k, v in (("video", videos), ("audio", audios)) if len(v) > 1]
        if several:
            names = ", ".join(rel(p, root) for k in several for p in files[k])
            dropped.append(Dropped(uid, R_SEVERAL, names, "keep one (or rename the others)"))
            continue
        if not videos and not audios:
            dropped.append(Dropped(uid, R_TEXT_ONLY, rel(texts[0], root)))
            continue
        video, audio = (videos or [None])[0], (audios or [None])[0]
        audio_s = track_s = video_s = None
        try:
            if audio is not None:
                audio_s = _audio_seconds(audio)
            if video is not None:
                track_s, video_s = _av_streams(video)
        except _Unreadable as e:
            bad = audio if audio is not None and audio_s is None else video
            dropped.append(Dropped(uid, R_UNREADABLE, rel(bad, root), str(e)))
            continue
        if video is not None and video_s is None and track_s is None:
            dropped.append(Dropped(uid, R_NO_STREAM, rel(video, root)))
            continue
        if video is not None and video_s is None:
            notes.append(f"{rel(video, root)}: no video stream; used for speech only")
        speech = audio if audio is not None else (video if track_s is not None else None)
        speech_s = audio_s if audio is not None else track_s
        face = video if video_s is not None else None
        if face is not None:
            counts["video with an audio file" if audio is not None else "video with its own audio track"
                   if speech is not None else "video without audio"] += 1
        else:
            counts["audio only"] += 1
        text = ""
        if texts:
            try:
                text = re.sub(r"\s+", " ", read_text(texts[0], "transcript")).strip()
            except ManifestError as e:
                dropped.append(Dropped(uid, R_BAD_TRANSCRIPT, rel(texts[0], root), e.problem))
            else:
                if not text:
                    dropped.append(Dropped(uid, R_EMPTY_TRANSCRIPT, rel(texts[0], root)))
        end = speech_s if speech_s is not None else video_s
        rows.append({
            "utterance_id": uid, "corpus": CORPUS, "session": "", "speaker": "", "gender": "",
            "label": "", "consensus": "", "start": 0.0, "end": max(float(end or 0.0), 0.0), "fold": "",
            "wav_path": rel(speech, root) if speech is not None else "", "transcript": text,
            "video_path": rel(face, root) if face is not None else "", "video_start": 0.0, "video_end": "",
            "video_half": "full",
        })
    if not rows and not dropped:
        raise ManifestError(root, "no files found; expected media files (video: "
                                  f"{' '.join(VIDEO_EXTENSIONS)}; audio: {' '.join(AUDIO_EXTENSIONS)})")
    if counts["video without audio"]:
        notes.append(f"{counts['video without audio']} videos have no audio track and no audio file "
                     "beside them: their speech is absent")
    notes.insert(0, "media per utterance: " + ", ".join(f"{k} {n}" for k, n in counts.items() if n))
    if labels is not None:
        _apply_labels(rows, labels, dropped, labels_where, notes)
    return ManifestResult(make_manifest(rows), dropped, notes, ())


def _apply_labels(rows: list[dict], labels: dict[str, str], dropped: list[Dropped], where: str,
                  notes: list[str]) -> None:
    """Fill ``rows``' labels; an id of ``labels`` that is not a row is a ``ManifestError``."""
    ids = {r["utterance_id"] for r in rows}
    unknown = sorted(set(labels) - ids)
    if unknown:
        why = {d.utterance_id: d.reason for d in dropped if d.utterance_id}
        shown = ", ".join(f"{u!r}" + (f" (dropped: {why[u]})" if u in why else "") for u in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ManifestError(where, f"{len(unknown)} labelled ids are not utterances of the folder: {shown}{more} "
                                   "(an id is the media file's path under --root without its extension, "
                                   "with '/', e.g. 'sub/clip01')")
    for r in rows:
        r["label"] = labels.get(r["utterance_id"], "")
        r["consensus"] = r["label"]
    unlabelled = sum(not r["label"] for r in rows)
    if unlabelled:
        notes.append(f"{unlabelled} of {len(rows)} utterances have no label in {where} (training refuses "
                     "unlabelled utterances)")
