"""MSP-IMPROV: the paper's 4-class clip manifest read from the release as it arrives on disk.

Layout read (``root`` = the release folder)::

    Evalution.txt            (sic; some copies name it Evaluation.txt: both are accepted)
    Audio/session{1..6}/S{nn}{E}/{P,R,S,T}/MSP-IMPROV-S{nn}{E}-{G}{0k}-{T}-{XY}{mm}.wav
    Video/session{1..6}/S{nn}{E}/{P,R,S,T}/MSP-IMPROV-....avi
    All_human_transcriptions/MSP-IMPROV-....txt     one utterance of plain text per file

Media are found by their file name anywhere under ``root`` (some copies are flatter than
the layout above); ``._*`` files are ignored.

``Evalution.txt`` holds blocks separated by blank lines: a summary line
``UTD-IMPROV-S01A-F01-S-FM01.avi; A; A:2.8; V:2.0; D:3.2 ; N:3.4;`` (``UTD-`` stands for
``MSP-``; values may be ``NaN``; the ``N:`` field is sometimes absent), then one line per
rater. Only the summary lines are used; a line that is neither a summary nor inside a
block is reported as unparseable with its file and line number.

The paper's set: recording type ``S`` (other-improvised) and consensus ``A H N S`` mapped
to ``ang hap neu sad`` (3,940 clips on the complete release), minus the 121 clips in which
no face is found (``data_manifests/msp_improv_no_face.txt``; ``drop_no_face=False`` keeps
them) = 3,819: ang 460, hap 999, neu 1733, sad 627. The speaker is ``F0k``/``M0k``, which
forms session ``k``; fold ``k`` tests session ``k`` (6 folds). ``start`` is 0 and ``end``
the clip's duration, read from the wav header (or, without a readable wav, from the video).
"""
from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from pathlib import Path

from .manifest import (
    R_NO_MEDIA,
    R_NOT_4CLASS,
    R_UNKNOWN_CODE,
    R_UNPARSEABLE,
    Dropped,
    ManifestError,
    ManifestResult,
    is_junk,
    load_msp_no_face,
    make_manifest,
    read_text,
    rel,
)

CORPUS = "msp-improv"
SESSIONS = (1, 2, 3, 4, 5, 6)
EVALUATION_NAMES = ("Evalution.txt", "Evaluation.txt")
CONSENSUS_CODES = ("A", "H", "S", "N", "O", "X")
MSP_LABEL_MAP: dict[str, str] = {"A": "ang", "H": "hap", "N": "neu", "S": "sad"}
RECORDING_TYPES = {"P": "natural interaction", "R": "target-read", "S": "other-improvised",
                   "T": "target-improvised"}
# The paper's set uses the "other-improvised" recordings only.
PAPER_RECORDING_TYPES = ("S",)

# ``MSP-IMPROV-S08A-F05-S-FM02``: sentence, target emotion, speaker gender+number, type, tag
ID_RE = re.compile(r"^MSP-IMPROV-S(\d{2})([A-Z])-([FM])(\d{2})-([A-Z])-(\w+)$")
SUMMARY_START = re.compile(r"^(UTD|MSP)-IMPROV-")

R_TYPE = "recording type not in the paper's set"
R_BAD_ID = "clip id does not parse"
R_DUPLICATE = "duplicate clip id"
R_NO_FACE = "no face found (no-face list)"
R_SESSION_ABSENT = "session absent from this copy (no media of it)"
R_NO_DURATION = "no readable wav or video to give the duration"

EXPECTED = ("Evalution.txt (or Evaluation.txt) with the labels, and the clips under "
            "Audio/session{1..6}/, Video/session{1..6}/ and All_human_transcriptions/")


def find_evaluation(root: Path) -> tuple[Path, list[str]]:
    """The label file: ``Evalution.txt`` or ``Evaluation.txt`` directly in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, f"not a folder; expected the MSP-IMPROV release folder holding {EXPECTED}")
    found = [root / n for n in EVALUATION_NAMES if (root / n).exists()]
    if not found:
        seen = sorted(p.name for p in root.iterdir() if not is_junk(p.name))[:8]
        raise ManifestError(root, f"not an MSP-IMPROV release: expected {EXPECTED}; found "
                                  f"{seen if seen else 'an empty folder'}")
    notes = []
    if len(found) > 1:
        notes.append(f"both {EVALUATION_NAMES[0]} and {EVALUATION_NAMES[1]} exist; read {found[0].name}")
    return found[0], notes


def parse_evaluation(path: Path) -> tuple[list[dict], list[Dropped]]:
    """The summary lines of ``Evalution.txt``: ``[{utterance_id, consensus, values, line}]``
    (``values``: ``{"A": float, ...}`` of the fields present, ``NaN`` kept as nan), and the
    unparseable lines as ``Dropped`` items (``where = file:line``)."""
    entries: list[dict] = []
    bad: list[Dropped] = []
    in_block = False
    for n, raw in enumerate(read_text(path, "label file").splitlines(), 1):
        line = raw.strip()
        if not line:
            in_block = False
            continue
        if not SUMMARY_START.match(line):
            if not in_block:
                bad.append(Dropped("", R_UNPARSEABLE, f"{path}:{n}", line[:120]))
            continue  # a rater line
        fields = [f.strip() for f in line.split(";")]
        name = re.sub(r"\.avi$", "", fields[0])
        code = fields[1] if len(fields) > 1 else ""
        if len(fields) < 2 or not re.fullmatch(r"[A-Za-z]", code) or " " in name:
            bad.append(Dropped("", R_UNPARSEABLE, f"{path}:{n}", line[:120]))
            in_block = True  # its rater lines belong to it
            continue
        values = {}
        for f in fields[2:]:
            m = re.fullmatch(r"([A-Za-z]+)\s*:\s*(\S+)", f)
            if m:
                try:
                    values[m.group(1)] = float(m.group(2))  # float("NaN") is nan
                except ValueError:
                    pass  # the dimensional values are not used by the manifest
        entries.append({"utterance_id": "MSP-" + name.split("-", 1)[1], "consensus": code,
                        "values": values, "line": n})
        in_block = True
    return entries, bad


def index_media(root: Path) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """``{kind: {clip id: path}}`` for kind ``wav``/``avi``/``txt`` of every ``MSP-IMPROV-*``
    file under ``root``; a clip found twice keeps its first path in sorted order (noted)."""
    kinds = {".wav": "wav", ".avi": "avi", ".txt": "txt"}
    found: dict[str, dict[str, list[Path]]] = {k: defaultdict(list) for k in kinds.values()}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_junk(d))
        for f in filenames:
            if is_junk(f) or not f.startswith("MSP-IMPROV-"):
                continue
            stem, ext = os.path.splitext(f)
            if ext.lower() in kinds:
                found[kinds[ext.lower()]][stem].append(Path(dirpath) / f)
    out: dict[str, dict[str, Path]] = {}
    notes = []
    for kind, by_id in found.items():
        out[kind] = {}
        dups = 0
        for uid, paths in by_id.items():
            paths.sort()
            out[kind][uid] = paths[0]
            dups += len(paths) > 1
        if dups:
            notes.append(f"{dups} clips have more than one .{kind} file; the first by path was used")
    return out, notes


def _duration(wav: Path | None, avi: Path | None) -> tuple[float | None, list[str]]:
    """Clip duration in seconds from the wav header (no decoding), else from the video."""
    problems = []
    if wav is not None:
        import soundfile

        try:
            return float(soundfile.info(str(wav)).duration), problems
        except (RuntimeError, OSError) as e:  # soundfile raises LibsndfileError (a RuntimeError)
            problems.append(f"unreadable wav {wav}: {e}")
    if avi is not None:
        import cv2

        cap = cv2.VideoCapture(str(avi))
        try:
            fps, n = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
        finally:
            cap.release()
        if fps > 0 and n > 0:
            return float(n / fps), problems
        problems.append(f"unreadable video {avi}: no frame rate or frame count")
    return None, problems


def prepare_msp_improv(root: str | os.PathLike, drop_no_face: bool = True,
                       no_face_ids: dict[str, str] | set[str] | None = None,
                       recording_types: tuple[str, ...] = PAPER_RECORDING_TYPES,
                       label_map: dict[str, str] | None = None) -> ManifestResult:
    """Build the MSP-IMPROV manifest from the release at ``root`` (layout in the module
    docstring).

    ``drop_no_face``: leave out the clips of the no-face list (default ``True``, the
    paper's 3,819 set); ``no_face_ids``: that list (default the one in ``data_manifests/``);
    ``recording_types``: recording types kept (default ``("S",)``, the paper's choice);
    ``label_map``: consensus letter -> label (default ``MSP_LABEL_MAP``). Raises
    ``ManifestError`` when ``root`` is not the corpus or the label file cannot be read."""
    root = Path(root)
    label_map = dict(MSP_LABEL_MAP if label_map is None else label_map)
    eval_path, notes = find_evaluation(root)
    entries, dropped = parse_evaluation(eval_path)
    media, media_notes = index_media(root)
    notes += media_notes
    if not media["wav"] and not media["avi"]:
        raise ManifestError(root, f"no MSP-IMPROV media (MSP-IMPROV-*.wav / *.avi) found: expected {EXPECTED}")
    if drop_no_face and no_face_ids is None:
        no_face_ids = load_msp_no_face()
    no_face = set(no_face_ids or ())

    def session_of(uid: str) -> int | None:
        m = ID_RE.match(uid)
        return int(m.group(4)) if m else None

    media_sessions = sorted({s for kind in ("wav", "avi") for s in map(session_of, media[kind])
                             if s in SESSIONS})
    rows: list[dict] = []
    seen: dict[str, str] = {}
    absent = Counter()
    problems: list[str] = []
    for e in entries:
        uid, code, where = e["utterance_id"], e["consensus"], f"{eval_path}:{e['line']}"
        m = ID_RE.match(uid)
        if not m or int(m.group(4)) not in SESSIONS:
            dropped.append(Dropped(uid, R_BAD_ID, where, "expected MSP-IMPROV-S<nn><E>-<F|M>0<1-6>-<P|R|S|T>-<tag>"))
            continue
        if uid in seen:
            dropped.append(Dropped(uid, R_DUPLICATE, where, f"first at {seen[uid]}"))
            continue
        seen[uid] = where
        gender, session, rtype = m.group(3), int(m.group(4)), m.group(5)
        if rtype not in recording_types:
            dropped.append(Dropped(uid, R_TYPE, where, f"{rtype} ({RECORDING_TYPES.get(rtype, 'unknown type')})"))
            continue
        if code not in CONSENSUS_CODES and code not in label_map:
            dropped.append(Dropped(uid, R_UNKNOWN_CODE, where, code))
            continue
        if code not in label_map:
            dropped.append(Dropped(uid, R_NOT_4CLASS, where, code))
            continue
        if drop_no_face and uid in no_face:
            dropped.append(Dropped(uid, R_NO_FACE, where, ""))
            continue
        if session not in media_sessions:
            dropped.append(Dropped(uid, R_SESSION_ABSENT, where, f"session {session}"))
            continue
        wav, avi, txt = (media[k].get(uid) for k in ("wav", "avi", "txt"))
        text = ""
        if txt is not None:
            try:
                text = " ".join(read_text(txt, "transcript").split())  # one line in the CSV
            except ManifestError as err:
                problems.append(str(err))
        if wav is None and avi is None and not text:
            dropped.append(Dropped(uid, R_NO_MEDIA, where))
            continue
        duration, why = _duration(wav, avi)
        problems += why
        if duration is None:
            dropped.append(Dropped(uid, R_NO_DURATION, where, "; ".join(why) or "transcript only"))
            continue
        wav_ok = wav is not None and not any(p.startswith(f"unreadable wav {wav}") for p in why)
        wav_path = rel(wav, root) if wav_ok else ""
        video_path = rel(avi, root) if avi is not None else ""
        absent.update(n for n, v in (("wav", wav_path), ("video", video_path), ("transcript", text)) if not v)
        rows.append({
            "utterance_id": uid, "corpus": CORPUS, "session": session,
            "speaker": f"{gender}{m.group(4)}", "gender": gender,
            "label": label_map[code], "consensus": code,
            "start": 0.0, "end": duration, "fold": session,
            "wav_path": wav_path, "transcript": text, "video_path": video_path,
            # the clip's video file is the utterance's: all of it (an empty end), not cut at the
            # wav's duration (its container may end its video track a little before or after)
            "video_start": 0.0, "video_end": float("nan"), "video_half": "full",
        })

    if not drop_no_face:
        notes.append("the no-face list was not applied (clips without a detectable face are kept)")
    missing_sessions = [k for k in SESSIONS if k not in media_sessions]
    if missing_sessions:
        notes.insert(0, f"partial corpus: media cover session{'s' if len(media_sessions) > 1 else ''} "
                        f"{', '.join(map(str, media_sessions))} only "
                        f"(absent: {', '.join(map(str, missing_sessions))})")
    if problems:
        notes.append(f"{len(problems)} media files could not be read (that modality will be missing): "
                     + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    for medium, n in sorted(absent.items()):
        notes.append(f"{n} kept clips have no {medium} (that modality will be missing)")
    return ManifestResult(make_manifest(rows), dropped, notes, tuple(media_sessions))
