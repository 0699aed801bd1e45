"""IEMOCAP: the 4-class utterance manifest read from the release as it arrives on disk.

Layout read (``root`` = ``IEMOCAP_full_release/``, or a folder holding it)::

    Session{1..5}/dialog/EmoEvaluation/<dialog>.txt          labels, one file per dialog (151)
    Session{1..5}/dialog/EmoEvaluation/{Categorical,Attribute,Self-evaluation}/  per rater: not read
    Session{1..5}/dialog/transcriptions/<dialog>.txt         ``<id> [start-end]: text``
    Session{1..5}/dialog/avi/DivX/<dialog>.avi               both actors side by side
    Session{1..5}/sentences/wav/<dialog>/<utterance>.wav     16 kHz mono, one per utterance

``._*`` files (macOS junk) are ignored everywhere. Only the summary lines of the
EmoEvaluation files are used (``[start - end] <id> <code> [v, a, d]``); the rater lines
(``C-``/``A-``) are recognised and passed over; any other line is reported as an
unparseable label line with its file and line number.

The 4-class set keeps consensus ``ang hap exc neu sad`` with ``exc`` merged into ``hap``
(``IEMOCAP_LABEL_MAP``, the mapping every IEMOCAP 4-class result since Poria et al. uses).
On the complete release this yields 5,531 utterances: ang 1103, hap 1636 (595 hap + 1041
exc), neu 1708, sad 1084; sessions 1-5: 1085, 1023, 1151, 1031, 1241 (of 10,039 labelled
utterances). Fold ``k`` tests session ``k``. The speaker is ``Ses0<k><gender>``; the face of
an utterance is on the left half of the dialog video when the speaker's gender equals the
marker-wearing actor's (the dialog name's 6th character), else on the right half.

A label whose media (utterance wav, dialog avi, transcript line) are all absent is dropped
and reported; one with some media is kept, absent ones as empty fields (a missing modality).
A copy holding only some sessions works; ``ManifestResult.sessions`` and a note say which.
"""
from __future__ import annotations

import os
import re
from collections import Counter
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
    make_manifest,
    read_text,
    rel,
)

CORPUS = "iemocap"
SESSIONS = (1, 2, 3, 4, 5)
CONSENSUS_CODES = ("ang", "hap", "exc", "sad", "neu", "fru", "fea", "sur", "dis", "oth", "xxx")
# The 4-class set: consensus code -> label.
IEMOCAP_LABEL_MAP: dict[str, str] = {"ang": "ang", "hap": "hap", "exc": "hap", "neu": "neu", "sad": "sad"}

_NUM = r"(\d+(?:\.\d*)?)"
# ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]``
SUMMARY_RE = re.compile(rf"^\[\s*{_NUM}\s*-\s*{_NUM}\s*\]\s+(\S+)\s+(\S+)(?:\s+\[[^\]]*\])?\s*$")
# ``C-E2:`` categorical vote, ``A-F1:`` dimensional rating (E* evaluators, F*/M* self-reports)
RATER_RE = re.compile(r"^[CA]-[A-Za-z]+\d*:")
# ``Ses01F_impro01_F000``, ``Ses05M_script01_1b_M012``: dialog, speaker gender, turn
UTT_RE = re.compile(r"^(Ses0([1-5])([FM])_[A-Za-z0-9_]+?)_([FM])(\d{3})$")
# ``Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.``
TRANSCRIPT_RE = re.compile(rf"^(\S+)\s+\[\s*{_NUM}\s*-\s*{_NUM}\s*\]:\s?(.*)$")

R_BAD_ID = "utterance id does not fit its dialog file"
R_DUPLICATE = "duplicate utterance id"
R_BAD_TIMES = "end before start"

EXPECTED = ("Session1..Session5 folders, each with dialog/EmoEvaluation/<dialog>.txt "
            "(label files), dialog/transcriptions/, dialog/avi/DivX/ and sentences/wav/<dialog>/")


def find_root(root: Path) -> tuple[Path, list[str]]:
    """The folder holding ``Session*``: ``root`` itself or ``root/IEMOCAP_full_release``."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, f"not a folder; expected the IEMOCAP release folder holding {EXPECTED}")
    if any((root / f"Session{k}").is_dir() for k in SESSIONS):
        return root, []
    inner = root / "IEMOCAP_full_release"
    if inner.is_dir() and any((inner / f"Session{k}").is_dir() for k in SESSIONS):
        return inner, [f"corpus root taken as {inner}"]
    seen = sorted(p.name for p in root.iterdir() if not is_junk(p.name))[:8]
    raise ManifestError(root, f"not an IEMOCAP release: expected {EXPECTED}; found "
                              f"{seen if seen else 'an empty folder'}")


def _scan_names(folder: Path, suffix: str) -> dict[str, Path]:
    """``{stem: path}`` of the non-junk files ending in ``suffix`` directly in ``folder``."""
    if not folder.is_dir():
        return {}
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(suffix) and not is_junk(e.name) and e.is_file():
                out[e.name[: -len(suffix)]] = Path(e.path)
    return out


def parse_transcription(path: Path) -> tuple[dict[str, str], int]:
    """``{utterance_id: text}`` from a transcription file, and the number of lines that are not
    utterances (``XX`` ids, ``M:``/``F:`` lines), which are passed over."""
    texts: dict[str, str] = {}
    skipped = 0
    for line in read_text(path, "transcription").splitlines():
        line = line.strip()
        if not line:
            continue
        m = TRANSCRIPT_RE.match(line)
        if m and UTT_RE.match(m.group(1)):
            texts[m.group(1)] = m.group(4).strip()
        else:
            skipped += 1
    return texts, skipped


def parse_emo_evaluation(path: Path) -> tuple[list[dict], list[Dropped]]:
    """The summary lines of one ``EmoEvaluation/<dialog>.txt``.

    Returns ``[{utterance_id, start, end, consensus, line}]`` and the unparseable lines as
    ``Dropped`` items (``where = file:line``)."""
    entries: list[dict] = []
    bad: list[Dropped] = []
    for n, raw in enumerate(read_text(path, "label file").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("%") or RATER_RE.match(line):
            continue
        m = SUMMARY_RE.match(line)
        if m:
            entries.append({"utterance_id": m.group(3), "start": float(m.group(1)),
                            "end": float(m.group(2)), "consensus": m.group(4), "line": n})
            continue
        guess = re.search(r"Ses0[1-5][FM]_\S+_[FM]\d{3}", line)
        bad.append(Dropped(guess.group(0) if guess else "", R_UNPARSEABLE, f"{path}:{n}", line[:120]))
    return entries, bad


def prepare_iemocap(root: str | os.PathLike,
                    label_map: dict[str, str] | None = None) -> ManifestResult:
    """Build the IEMOCAP 4-class manifest from the release at ``root`` (layout in the module
    docstring).

    ``label_map``: consensus code -> label (default ``IEMOCAP_LABEL_MAP``: ``exc`` merged
    into ``hap``); codes outside it are dropped and counted per code. Raises
    ``ManifestError`` when ``root`` is not the corpus or a label/transcription file cannot be
    read."""
    label_map = dict(IEMOCAP_LABEL_MAP if label_map is None else label_map)
    # media paths are relative to the folder the user named, which the extractors are given
    # too, even when the release sits one level below it
    given = Path(root)
    root, notes = find_root(given)
    dropped: list[Dropped] = []
    rows: list[dict] = []
    sessions: list[int] = []
    seen: dict[str, str] = {}
    absent = Counter()          # kept utterances lacking one medium
    skipped_transcript_lines = 0

    for k in SESSIONS:
        sdir = root / f"Session{k}"
        if not sdir.is_dir():
            continue
        emo_dir = sdir / "dialog" / "EmoEvaluation"
        if not emo_dir.is_dir():
            notes.append(f"Session{k}: no dialog/EmoEvaluation folder, session not read")
            continue
        label_files = _scan_names(emo_dir, ".txt")
        if not label_files:
            notes.append(f"Session{k}: no label files in {rel(emo_dir, root)}, session not read")
            continue
        sessions.append(k)
        transcripts = _scan_names(sdir / "dialog" / "transcriptions", ".txt")
        avis = _scan_names(sdir / "dialog" / "avi" / "DivX", ".avi")
        for dialog in sorted(label_files):
            entries, bad = parse_emo_evaluation(label_files[dialog])
            dropped.extend(bad)
            texts: dict[str, str] = {}
            if dialog in transcripts:
                texts, nskip = parse_transcription(transcripts[dialog])
                skipped_transcript_lines += nskip
            else:
                notes.append(f"{rel(label_files[dialog].parent, root)}/{dialog}.txt: "
                             f"no transcription file for this dialog")
            wavs = _scan_names(sdir / "sentences" / "wav" / dialog, ".wav")
            avi = avis.get(dialog)
            where_f = str(label_files[dialog])
            for e in entries:
                uid, code, where = e["utterance_id"], e["consensus"], f"{where_f}:{e['line']}"
                m = UTT_RE.match(uid)
                if not m or m.group(1) != dialog or int(m.group(2)) != k:
                    dropped.append(Dropped(uid, R_BAD_ID, where, f"expected {dialog}_<F|M><3 digits>"))
                    continue
                if uid in seen:
                    dropped.append(Dropped(uid, R_DUPLICATE, where, f"first at {seen[uid]}"))
                    continue
                seen[uid] = where
                if code not in CONSENSUS_CODES and code not in label_map:
                    dropped.append(Dropped(uid, R_UNKNOWN_CODE, where, code))
                    continue
                if code not in label_map:
                    dropped.append(Dropped(uid, R_NOT_4CLASS, where, code))
                    continue
                if e["end"] < e["start"]:
                    dropped.append(Dropped(uid, R_BAD_TIMES, where, f"{e['start']} - {e['end']}"))
                    continue
                gender, marker = m.group(4), m.group(3)
                wav = rel(wavs[uid], given) if uid in wavs else ""
                video = rel(avi, given) if avi is not None else ""
                text = texts.get(uid, "")
                if not (wav or video or text):
                    dropped.append(Dropped(uid, R_NO_MEDIA, where))
                    continue
                absent.update(n for n, v in (("wav", wav), ("video", video), ("transcript", text)) if not v)
                rows.append({
                    "utterance_id": uid, "corpus": CORPUS, "session": k,
                    "speaker": f"Ses0{k}{gender}", "gender": gender,
                    "label": label_map[code], "consensus": code,
                    "start": e["start"], "end": e["end"], "fold": k,
                    "wav_path": wav, "transcript": text, "video_path": video,
                    "video_start": e["start"], "video_end": e["end"],
                    "video_half": "left" if gender == marker else "right",
                })

    if not sessions:
        raise ManifestError(root, f"no session with label files: expected {EXPECTED}")
    missing_sessions = [k for k in SESSIONS if k not in sessions]
    if missing_sessions:
        notes.insert(0, f"partial corpus: covers Session{', Session'.join(map(str, sessions))} only "
                        f"(absent: Session{', Session'.join(map(str, missing_sessions))})")
    if skipped_transcript_lines:
        notes.append(f"{skipped_transcript_lines} transcription lines are not utterances "
                     f"(XX ids, M:/F: lines) and were passed over")
    for medium, n in sorted(absent.items()):
        notes.append(f"{n} kept utterances have no {medium} (that modality will be missing)")
    return ManifestResult(make_manifest(rows), dropped, notes, tuple(sessions))
