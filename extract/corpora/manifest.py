"""The utterance manifest shared by the corpora, and the canonical lists it is checked against.

A manifest is one row per utterance of the 4-class set, with the columns of
``MANIFEST_COLUMNS``:

==============  ===========================================================================
utterance_id    the corpus's own id (``Ses01F_impro01_F000``, ``MSP-IMPROV-S08A-F05-S-FM02``)
corpus          ``"iemocap"``, ``"msp-improv"`` or ``"folder"`` (media found under a folder:
                ``cmarr.extract.corpora.folder``)
session         int, 1-based (``folder``: empty, or an int given by hand)
speaker         ``Ses01F`` (IEMOCAP: session + speaker gender) or ``F05`` (MSP-IMPROV)
gender          ``F`` or ``M``
label           one of ``ang hap neu sad`` (``folder``: may be empty, unlabelled)
consensus       the corpus's own consensus code (``exc``, ``hap``, ``A``, ...)
start, end      seconds; IEMOCAP: times in the dialog, MSP-IMPROV: 0 and the clip duration
fold            int, 1-based: the session whose utterances form the test part of that fold
                (``folder``: empty, or an int given by hand)
wav_path        the utterance wav, relative to the corpus root ("" = absent)
transcript      text ("" = absent; the text modality is then missing)
video_path      the video holding the speaker's face, relative to the corpus root ("" = absent)
video_start/end the span of the utterance inside ``video_path``, seconds; an empty
                ``video_end`` runs to the end of the file (MSP-IMPROV: the clip's video
                file is the utterance's, all of it)
video_half      ``left`` / ``right`` (IEMOCAP: the half of the dialog frame showing the
                speaker) or ``full`` (MSP-IMPROV: one speaker per clip)
==============  ===========================================================================

Which sessions serve as validation data is the trainer's choice; the manifest only carries
``fold``. Every utterance a corpus reader leaves out is reported as a ``Dropped`` item with a
stable ``reason`` (counted in the summary) and where it was found; nothing is skipped silently.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cmarr.extract.base import LABELS, PathError
from cmarr.extract.files import write_csv_atomic

MANIFEST_COLUMNS: tuple[str, ...] = (
    "utterance_id", "corpus", "session", "speaker", "gender", "label", "consensus",
    "start", "end", "fold", "wav_path", "transcript", "video_path", "video_start",
    "video_end", "video_half",
)
CORPORA: tuple[str, ...] = ("iemocap", "msp-improv", "folder")
#: Corpora whose rows may leave ``label``, ``session`` and ``fold`` empty: a folder of media
#: has no labels unless they are given, and no sessions at all. The trainer refuses such rows
#: (``cmarr.pipelines.data``); extraction does not need them.
UNLABELLED_CORPORA: tuple[str, ...] = ("folder",)
VIDEO_HALVES: tuple[str, ...] = ("left", "right", "full")

_INT_COLUMNS = ("session", "fold")
_FLOAT_COLUMNS = ("start", "end", "video_start", "video_end")
_STR_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in _INT_COLUMNS + _FLOAT_COLUMNS)

# The counts of the paper's Table 1 (4-class sets), used to say whether a complete corpus
# reproduces them.
PAPER_COUNTS: dict[str, dict[str, int]] = {
    "iemocap": {"ang": 1103, "hap": 1636, "neu": 1708, "sad": 1084},
    "msp-improv": {"ang": 460, "hap": 999, "neu": 1733, "sad": 627},
}
# MSP-IMPROV before the 121 no-face clips are dropped (``--keep-no-face``): 3,940 clips.
MSP_COUNTS_WITH_NO_FACE: dict[str, int] = {"ang": 470, "hap": 1048, "neu": 1789, "sad": 633}
# Per-session sizes of the IEMOCAP 4-class set (sessions 1-5).
IEMOCAP_SESSION_COUNTS: dict[int, int] = {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241}

IEMOCAP_CANONICAL = "iemocap_4class.csv"
MSP_NO_FACE = "msp_improv_no_face.txt"


# drop reasons shared by both corpora
R_UNPARSEABLE = "unparseable label line"
R_NOT_4CLASS = "consensus not in the 4-class set"
R_UNKNOWN_CODE = "unknown consensus code"
R_NO_MEDIA = "no media (wav, video and transcript all absent)"

class ManifestError(PathError):
    """A problem that stops a manifest from being built. ``str(e)`` is ``"<path>: <problem>"``."""


@dataclass(frozen=True)
class Dropped:
    """One item a corpus reader left out.

    ``reason`` is a short stable category (summaries count items per reason);
    ``where`` names the file (and ``:line`` when a line is at fault); ``detail`` adds the
    specifics (the offending text, the code found, ...). ``utterance_id`` is "" when the
    item could not be identified (e.g. a line that does not parse).
    """

    utterance_id: str
    reason: str
    where: str = ""
    detail: str = ""


@dataclass
class ManifestResult:
    """What ``prepare_<corpus>`` returns.

    ``df``: the manifest (columns ``MANIFEST_COLUMNS``, sorted by ``utterance_id``);
    ``dropped``: every item left out, with its reason; ``notes``: facts the user should
    see (coverage of a partial corpus, which file variant was read, media problems of kept
    utterances); ``sessions``: the sessions the copy on disk covers.
    """

    df: pd.DataFrame
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sessions: tuple[int, ...] = ()

    def drop_counts(self) -> Counter:
        """Number of dropped items per reason."""
        return Counter(d.reason for d in self.dropped)


def make_manifest(rows: Iterable[dict]) -> pd.DataFrame:
    """Build a manifest frame from row dicts: fixed column order and dtypes, sorted by id."""
    df = pd.DataFrame(list(rows), columns=list(MANIFEST_COLUMNS))
    return _coerce(df).sort_values("utterance_id", kind="stable").reset_index(drop=True)


def _blank(col: pd.Series) -> pd.Series:
    """True where a cell is empty: None, NaN or blank text."""
    return col.isna() | col.astype(str).str.strip().eq("")


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in _INT_COLUMNS:
        blank = _blank(df[c])
        if blank.any():  # folder rows: ints where given, "" elsewhere (written back as empty cells)
            df[c] = [("" if b else int(v)) for v, b in zip(df[c].tolist(), blank)]
            df[c] = df[c].astype(object)
        else:
            df[c] = df[c].astype("int64")
    for c in _FLOAT_COLUMNS:
        col = df[c]
        if c == "video_end":  # empty: to the end of the file
            col = col.replace("", np.nan)
        df[c] = col.astype("float64")
    for c in _STR_COLUMNS:
        df[c] = df[c].fillna("").astype(str)
    return df


def check_manifest(df: pd.DataFrame, where: str = "manifest") -> None:
    """Raise ``ManifestError`` unless ``df`` follows the manifest contract: all columns, a
    non-empty unique ``utterance_id`` per row, known labels, corpora and video halves (an
    empty label, session or fold only in rows of ``UNLABELLED_CORPORA``), finite
    ``start``, ``end`` and ``video_start`` (``video_end`` finite or NaN: to the end of the
    file), ``end >= start``, and no session or speaker in several folds (``fold_leaks``)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(where, f"missing columns {missing}")
    # Every feature and error of the store is keyed by the id: an empty one cannot be stored,
    # looked up or told apart from another. Rows are counted from 1 after the header (not as
    # file lines: a quoted transcript may span several lines).
    blank = np.flatnonzero(df["utterance_id"].astype(str).str.strip().eq("").to_numpy())
    if len(blank):
        first = df.iloc[int(blank[0])]
        wav = str(first.get("wav_path", "") or "")
        more = f" ({len(blank)} rows in all)" if len(blank) > 1 else ""
        raise ManifestError(where, f"row {int(blank[0]) + 1} has an empty utterance_id"
                                   + (f" (wav_path {wav!r})" if wav else "") + more)
    dup = df["utterance_id"][df["utterance_id"].duplicated()]
    if len(dup):
        raise ManifestError(where, f"duplicate utterance ids, e.g. {dup.iloc[0]!r}")
    bad = df[~df["corpus"].isin(CORPORA)]
    if len(bad):
        raise ManifestError(where, f"corpus {bad['corpus'].iloc[0]!r} is not one of {CORPORA}")
    may_be_blank = df["corpus"].isin(UNLABELLED_CORPORA)
    bad = df[~(df["label"].isin(LABELS) | (may_be_blank & df["label"].eq("")))]
    if len(bad):
        raise ManifestError(where, f"label {bad['label'].iloc[0]!r} of {bad['utterance_id'].iloc[0]} "
                                   f"is not one of {LABELS}")
    for col in _INT_COLUMNS:
        blank = _blank(df[col])
        bad = df[blank & ~may_be_blank]
        if len(bad):
            i = int(np.flatnonzero((blank & ~may_be_blank).to_numpy())[0])
            raise ManifestError(where, f"row {i + 1} ({bad['utterance_id'].iloc[0]}): {col} is empty, expected "
                                       f"an integer (only {', '.join(UNLABELLED_CORPORA)} rows may leave it empty)")
    bad = df[~df["video_half"].isin(VIDEO_HALVES)]
    if len(bad):
        raise ManifestError(where, f"video_half {bad['video_half'].iloc[0]!r} is not one of {VIDEO_HALVES}")
    for col in _FLOAT_COLUMNS:
        # a NaN time would pass every comparison below unseen (the duration check of the wav,
        # the span of the video); only video_end may be absent (NaN: to the end of the file)
        x = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(x) | (np.isnan(x) if col == "video_end" else False)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            need = "a number or empty" if col == "video_end" else "a finite number of seconds"
            v = df[col].iloc[i]
            v = str(float(v)) if isinstance(v, (float, np.floating)) else repr(v)
            raise ManifestError(where, f"row {i + 1} ({df['utterance_id'].iloc[i]}): {col} is {v}, "
                                       f"expected {need}")
    bad = df[df["end"] < df["start"]]
    if len(bad):
        raise ManifestError(where, f"{bad['utterance_id'].iloc[0]}: end < start")
    leaks = fold_leaks(df)
    if leaks:
        more = f" (and {len(leaks) - 1} more sessions or speakers)" if len(leaks) > 1 else ""
        raise ManifestError(where, f"{leaks[0]}{more}; give every utterance of a session the same fold")


def fold_leaks(df: pd.DataFrame) -> list[str]:
    """The sessions and speakers of ``df`` (a manifest or a store's utterance table) that
    span several folds, one message each; empty when there are none.

    A fold tests on its own utterances and trains on every other fold's: a session (or a
    speaker) split over two folds puts the same speakers in a fold's training and test data,
    which is the leakage the paper's leave-one-session-out protocol exists to prevent. A fold
    may hold several sessions; a session may not be in several folds."""
    out: list[str] = []
    if "fold" in df.columns:  # rows without a fold (or without the key) belong to no fold
        df = df[~_blank(df["fold"])]
    for col in ("session", "speaker"):
        if col not in df.columns or "fold" not in df.columns or df.empty:
            continue
        keyed = df[~_blank(df[col])]
        folds = keyed.groupby(keyed[col].astype(str), sort=True)["fold"].unique()
        for key, fs in folds.items():
            if len(fs) > 1:
                fs = sorted(int(f) for f in fs)
                counts = df[df[col].astype(str) == key].groupby("fold").size()
                ex = df[(df[col].astype(str) == key) & (df["fold"] != counts.idxmax())]["utterance_id"]
                out.append(f"{col} {key} spans folds {fs} (e.g. {ex.iloc[0]} is in fold "
                           f"{int(df.loc[ex.index[0], 'fold'])}): its speakers would be trained and tested on")
    return out


def write_manifest(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write the manifest CSV atomically: a temporary file beside ``out``, then a rename, so
    that ``out`` either holds the complete manifest or is left as it was."""
    out = Path(out)
    check_manifest(df, str(out))
    return write_csv_atomic(df.loc[:, list(MANIFEST_COLUMNS)], out)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV written by ``write_manifest``; empty cells stay "" (absent media),
    never NaN. A file that breaks the contract (``check_manifest``: e.g. a row with an empty
    ``utterance_id``, a time that is not a number, a session in several folds) raises
    ``ManifestError`` naming the file, the row and the column."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ManifestError(path, f"cannot read manifest: {e}") from e
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(path, f"missing columns {missing}")
    for col in _INT_COLUMNS + _FLOAT_COLUMNS:
        cells = df[col].astype(str).str.strip()
        num = pd.to_numeric(cells.where(cells != ""), errors="coerce")
        bad = num.isna()
        if col == "video_end":  # empty: to the end of the file
            bad &= cells.ne("")
        if col in _INT_COLUMNS:
            bad |= ~cells.str.fullmatch(r"[+-]?\d+")
            bad &= ~(cells.eq("") & df["corpus"].isin(UNLABELLED_CORPORA))  # checked again by check_manifest
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            need = ("an integer" if col in _INT_COLUMNS else
                    "a number or empty" if col == "video_end" else "a number of seconds")
            raise ManifestError(path, f"row {i + 1} ({df['utterance_id'].iloc[i]}): {col} is "
                                      f"{df[col].iloc[i]!r}, expected {need}")
    try:
        df = _coerce(df)
    except ValueError as e:
        raise ManifestError(path, f"bad value: {e}") from e
    check_manifest(df, str(path))
    return df


# --------------------------------------------------------------------------------------
# Canonical lists (data_manifests/)
# --------------------------------------------------------------------------------------

def canonical_dir() -> Path:
    """The folder holding the canonical lists.

    The repository's ``data_manifests/`` (reached from this file, which works for a source
    checkout and an editable install); else a ``cmarr.data_manifests`` package, for an
    install that ships the folder as package data."""
    here = Path(__file__).resolve().parents[2] / "data_manifests"
    if (here / IEMOCAP_CANONICAL).is_file():
        return here
    try:
        from importlib.resources import files

        pkg = Path(str(files("cmarr.data_manifests")))
        if (pkg / IEMOCAP_CANONICAL).is_file():
            return pkg
    except (ModuleNotFoundError, TypeError):
        pass
    return here


def load_canonical_iemocap(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The canonical IEMOCAP 4-class list: ``utterance_id, session, label, fold``."""
    path = Path(path) if path is not None else canonical_dir() / IEMOCAP_CANONICAL
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ManifestError(path, f"cannot read the canonical IEMOCAP list: {e}") from e
    need = ["utterance_id", "session", "label"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ManifestError(path, f"canonical list lacks columns {missing}")
    try:
        df["session"] = df["session"].astype("int64")
        df["fold"] = df["fold"].astype("int64") if "fold" in df.columns else df["session"]
    except ValueError as e:
        raise ManifestError(path, f"bad session/fold value: {e}") from e
    return df[["utterance_id", "session", "label", "fold"]]


def load_msp_no_face(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The MSP-IMPROV clips with no detectable face: ``{utterance_id: consensus letter}``.

    File format: one clip per line, ``utterance_id consensus face_found``; ``#`` starts a
    comment."""
    path = Path(path) if path is not None else canonical_dir() / MSP_NO_FACE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(path, f"cannot read the no-face list: {e}") from e
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if not parts[0].startswith("MSP-IMPROV-"):
            raise ManifestError(f"{path}:{n}", f"not a clip id: {parts[0]!r}")
        out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


@dataclass
class Comparison:
    """Differences between a built manifest and a canonical list, over ``sessions``."""

    sessions: tuple[int, ...]
    missing: list[str]                                # canonical ids the corpus did not yield
    extra: list[str]                                  # yielded ids not in the canonical list
    label_disagreements: list[tuple[str, str, str]]   # (id, label built, canonical label)
    n_canonical: int = 0

    @property
    def matches(self) -> bool:
        return not (self.missing or self.extra or self.label_disagreements)


def compare_with_canonical(df: pd.DataFrame, canonical: pd.DataFrame,
                           sessions: Iterable[int] | None = None) -> Comparison:
    """Compare a manifest with a canonical ``utterance_id, session, label`` list.

    ``sessions`` restricts the comparison (a partial corpus is compared only over the
    sessions it covers); ``None`` = the sessions present in either list."""
    if sessions is None:
        sessions = set(df["session"].astype(int)) | set(canonical["session"].astype(int))
    sessions = tuple(sorted(int(s) for s in sessions))
    built = df[df["session"].astype(int).isin(sessions)]
    canon = canonical[canonical["session"].astype(int).isin(sessions)]
    b = dict(zip(built["utterance_id"], built["label"]))
    c = dict(zip(canon["utterance_id"], canon["label"]))
    missing = sorted(set(c) - set(b))
    extra = sorted(set(b) - set(c))
    disagree = sorted((u, b[u], c[u]) for u in set(b) & set(c) if b[u] != c[u])
    return Comparison(sessions, missing, extra, disagree, n_canonical=len(c))


# --------------------------------------------------------------------------------------
# Small file helpers shared by the corpus readers
# --------------------------------------------------------------------------------------

def is_junk(name: str) -> bool:
    """macOS resource-fork copies (``._<name>``) and other dot files: binary junk."""
    return name.startswith(".")


def read_text(path: Path, what: str) -> str:
    """Read a UTF-8 text file; any failure becomes a ``ManifestError`` naming the file."""
    try:
        data = path.read_bytes()
    except IsADirectoryError as e:
        raise ManifestError(path, f"cannot read {what}: it is a directory") from e
    except OSError as e:
        raise ManifestError(path, f"cannot read {what}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(path, f"cannot read {what}: not UTF-8 text (byte {e.start}: "
                                  f"{data[e.start:e.start + 1]!r})") from e


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes (the manifest's path form)."""
    return path.relative_to(root).as_posix()
