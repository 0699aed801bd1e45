"""Writing a store resumably: ``StoreWriter``, and the lock that gives one writer an output.

Finished utterances are committed in chunk files beside the output, and ``finalize`` joins
them into the store, renamed onto the output path only when complete; a killed run loses at
most the chunk being filled, and a rerun resumes. ``docs/feature-store.md`` describes the
files.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cmarr.extract.base import MODALITIES, PathError
from cmarr.extract.files import FileLock, LockBusy, pid_alive, write_json_atomic
from cmarr.extract.store.assemble import Source, StoreSource, assemble
from cmarr.extract.store.chunks import ChunkSource, Pending, write_chunk
from cmarr.extract.store.format import CHUNK_FORMAT, REQUIRED_COLUMNS, StoreError, row_digests, table_changes
from cmarr.extract.store.provenance import STAMP_KEYS, comparable_provenance, provenance_differences, stamp
from cmarr.extract.store.reader import FeatureStore

#: Defaults of ``StoreWriter``'s commit policy: the buffer is committed as a chunk when it
#: holds ``chunk_size`` results or ``chunk_bytes`` of features (what a kill can lose).
CHUNK_SIZE = 1024
CHUNK_BYTES = 64 << 20
LOCK_NAME = "lock"
STATE_NAME = "state.json"


def parts_folder(out: Path) -> Path:
    """``<out>.parts``: the folder of an unfinished store's chunks, progress record and lock."""
    return out.with_name(out.name + ".parts")


def make_folder(folder: Path, out: Path | None = None) -> None:
    """Create ``folder`` (and its parents), with a clear ``StoreError`` when a file stands
    where a folder is needed (``--out notes.txt/feats.h5``) or it cannot be created."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                needed = f" (--out {out} needs a folder there)" if out is not None else ""
                raise StoreError(p, f"is a file, not a folder{needed}")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(e.filename or folder, f"cannot create the folder ({e.strerror or e})") from None


class OutputLock:
    """The exclusive right to write the store ``out``: a ``FileLock`` on ``<out>.parts/lock``,
    refused with ``StoreError`` while another process holds it. Taken by ``StoreWriter``, or
    earlier (before slow set-up work such as loading models) and handed to it.
    ``created``: the parts folder was made for this lock, so it holds nothing of earlier runs."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts = parts_folder(self.out)
        self.created = not self.parts.exists()
        make_folder(self.parts, self.out)
        try:
            self._lock = FileLock(self.parts / LOCK_NAME)
        except LockBusy as e:
            raise StoreError(self.out, f"is being written by another process (pid {e.pid}); wait for it to "
                             "finish, or stop it and run the same command again to resume") from None
        except PathError as e:
            raise StoreError(e.path, e.problem) from None

    @property
    def held(self) -> bool:
        return self._lock.held

    def release(self, remove_folder: bool = False) -> None:
        """Drop the lock; with ``remove_folder`` first empty the parts folder while holding it
        (committed chunks first, the progress record, which says which chunks belong to the
        extraction, last), and remove it after."""
        if not self.held:
            return
        try:
            if remove_folder:
                last = {STATE_NAME: 1}
                for entry in sorted(self.parts.iterdir(), key=lambda e: last.get(e.name, 0)):
                    if entry.name != LOCK_NAME and not entry.is_dir():
                        entry.unlink(missing_ok=True)
        finally:
            self._lock.release()
        if remove_folder:
            try:
                self.parts.rmdir()
            except OSError:  # a new writer has already begun in it
                pass


# --------------------------------------------------------------------------------------
# what the store dtype can hold


@functools.lru_cache(maxsize=None)
def _cast_limit(src: np.dtype, dtype: str) -> float:
    """The smallest magnitude of ``src`` that becomes infinite in ``dtype``: rounding to
    nearest even sends ``|x| >= max + spacing(max) / 2`` there (65520 for float16); ``inf``
    when every finite ``src`` value fits."""
    target = np.finfo(dtype)
    if src.kind == "f" and np.finfo(src).max <= target.max:
        return float("inf")
    return float(target.max) + 2.0 ** (target.maxexp - target.nmant - 2)  # max + half its spacing


def _unstorable(arr: np.ndarray, dtype: str) -> str | None:
    """Why ``arr`` cannot be stored in ``dtype`` (NaN/Inf, or values that the cast would
    make infinite), or None. Two passes over ``arr`` (its min and max, which NaN
    propagates into) in the usual case; the reason is worked out only when one fails.
    float16 frames fit every store dtype, so only NaN/Inf are looked for, in their bits
    (an all-ones exponent): numpy has no vectorised float16 min/max, and integer max is
    about a hundred times faster."""
    if arr.size == 0:
        return None
    if arr.dtype == np.float16:
        if int((arr.view(np.uint16) & 0x7FFF).max()) < 0x7C00:
            return None
        return "extractor produced NaN or Inf values"
    limit = _cast_limit(arr.dtype, dtype)
    lo, hi = float(arr.min()), float(arr.max())
    if -limit < lo and hi < limit:
        return None
    if not np.isfinite(arr).all():
        return "extractor produced NaN or Inf values"
    return f"values exceed the {dtype} range"


def _store_cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A copy of ``arr`` in ``dtype``. float32 goes through torch, whose vectorised cast
    gives the same bits as numpy's (round to nearest even) about ten times faster."""
    if arr.dtype == np.float32 and dtype in ("float16", "float32") and arr.flags.writeable and arr.dtype.isnative:
        import torch

        return torch.from_numpy(arr).to(getattr(torch, dtype), copy=True).numpy()
    with np.errstate(over="ignore"):
        return arr.astype(dtype)


# --------------------------------------------------------------------------------------
# the writer


class StoreWriter:
    """Writes a store, resumably.

    ``add`` / ``add_error`` buffer finished ``(utterance, modality)`` results; the buffer is
    committed as ``<out>.parts/chunk-NNNNNN.h5`` (temporary name, fsync, rename) when it
    holds ``chunk_size`` results or ``chunk_bytes`` of features, and by ``flush``. A commit
    that fails (a full disk) is raised and keeps its results in the buffer for the next one.
    ``finalize`` checks that every (utterance, modality) of this job has features or a
    recorded error (``StoreError`` otherwise, writing nothing), writes the complete store
    atomically and removes the parts folder. Nothing exists at ``out`` that is not complete.
    Any failure of ``finalize`` closes the writer, keeping what is committed.

    A rerun with the same output, table and settings resumes: it takes up the committed
    chunks and an existing complete store at ``out`` (whose contents are kept, so a rerun
    may add modalities to it), and ``done()`` tells the caller what to skip; recorded
    errors are tried again (``retried()``). A rerun with another utterance table (a rebuilt
    manifest) is refused with what changed, as is one with other settings.

    A writer holds the ``OutputLock`` of ``out`` (taken at its creation, or given as
    ``lock``) until ``finalize`` or ``close``. Under the lock it removes what dead runs left
    behind: half-written chunks and the temporary ``<out>.tmp-<pid>`` of a run killed while
    it assembled the store.
    """

    def __init__(self, out_path: str | os.PathLike, utterances: pd.DataFrame,
                 provenance: Mapping[str, dict], chunk_size: int = CHUNK_SIZE, dtype: str = "float16",
                 extra_attrs: Mapping[str, Any] | None = None, chunk_bytes: int = CHUNK_BYTES,
                 lock: OutputLock | None = None):
        self.out = Path(out_path)
        self.parts = parts_folder(self.out)
        self.chunk_size = int(chunk_size)
        self.chunk_bytes = int(chunk_bytes)
        if self.chunk_size < 1 or self.chunk_bytes < 1:
            raise StoreError(self.out, f"commit policy chunk_size {chunk_size}, chunk_bytes {chunk_bytes}: "
                             "each must be positive")
        self.dtype = np.dtype(dtype).name
        self.extra_attrs = dict(extra_attrs or {})
        missing = [c for c in REQUIRED_COLUMNS if c not in utterances.columns]
        if missing:
            raise StoreError(self.out, f"utterance table lacks columns {missing}")
        if utterances["utterance_id"].duplicated().any():
            dup = utterances["utterance_id"][utterances["utterance_id"].duplicated()].iloc[0]
            raise StoreError(self.out, f"utterance table has duplicate id {dup!r}")
        self.utterances = utterances.reset_index(drop=True)
        made = stamp()
        self.provenance = {m: {**made, **dict(p)} for m, p in provenance.items()}
        for m in self.provenance:
            if m not in MODALITIES:
                raise StoreError(self.out, f"unknown modality {m!r} (expected one of {MODALITIES})")
        self._requested = tuple(self.provenance)  # the modalities this job must cover
        self._rows = row_digests(self.utterances)
        self._buffer: list[Pending] = []
        self._buffer_bytes = 0
        self._done: set[tuple[str, str]] = set()
        self._retry: set[tuple[str, str]] = set()  # recorded errors of earlier runs: tried again
        self._dims: dict[str, int] = {m: int(p["dim"]) for m, p in self.provenance.items() if "dim" in p}
        self._meta_keys: dict[str, frozenset[str]] = {}
        self._base: Path | None = None  # the complete store at out, extended by this job
        self._next_chunk = 0
        if lock is not None and not (lock.held and lock.parts == self.parts):
            raise StoreError(self.out, "the lock given is not a held lock on this output")
        self._lock = lock if lock is not None else OutputLock(self.out)
        try:
            self._resume()
        except BaseException:
            self._lock.release(remove_folder=self._lock.created)  # a folder made just now holds nothing
            raise

    # -- resume ----------------------------------------------------------------------
    @staticmethod
    def _comparable(prov: Mapping[str, Any]) -> dict[str, Any]:
        """Provenance as compared on resume: the manifest's content is compared row by row
        (``row_digests``), so its file's sha256 does not count."""
        p = comparable_provenance(prov)
        p.pop("manifest_sha256", None)
        return p

    def _state(self) -> dict[str, Any]:
        """What a resumed extraction must share with the one that committed the chunks."""
        return {"chunk_format": CHUNK_FORMAT, "dtype": self.dtype, "utterances": self._rows,
                "provenance": {m: self._comparable(p) for m, p in self.provenance.items()}}

    def _take_base(self) -> None:
        """Resume from the complete store at ``out``: its results count as done, its errors
        are tried again, and its other modalities stay. Refused when it was made from
        another table, with other settings, or when its frames are damaged."""
        store = FeatureStore(self.out)  # raises StoreError for anything unreadable
        try:
            for m, p in store.provenance.items():
                if m in self.provenance:
                    # the finished store records the width it found; a job that did not declare one compares equal
                    mine = {**self.provenance[m], "dim": self.provenance[m].get("dim", p.get("dim"))}
                    diff = provenance_differences(self._comparable(p), self._comparable(mine))
                    if diff:
                        raise StoreError(self.out, f"exists with {m} features made differently "
                                         f"({'; '.join(diff[:3])}); write to another --out or remove it")
            if store.dtype != self.dtype:
                raise StoreError(self.out, f"exists with dtype {store.dtype}, this job writes {self.dtype}")
            changes = table_changes(row_digests(store.utterances), self._rows)
            if changes:
                raise StoreError(self.out, f"exists, made from another manifest (utterances {changes}); write to "
                                 "another --out, or remove it to extract everything again")
            try:  # its frames are copied into the new store under a new checksum: they must be sound
                store.verify()
            except StoreError as e:
                raise StoreError(self.out, f"{e.problem}; this job would carry them into the new store: "
                                 "write to another --out, or remove it and extract again") from None
            done = {(u, m) for m in store.modalities for u in store.ids(m)}
            self._done |= done
            self._retry |= set(zip(store.errors["utterance_id"], store.errors["modality"])) - done
            for m in store.modalities:
                self._dims.setdefault(m, store.dims[m])
            for m, p in store.provenance.items():
                self.provenance.setdefault(m, p)
            self._base = self.out
        finally:
            store.close()

    def _check_state(self, state_file: Path, has_chunks: bool) -> None:
        """Refuse to resume an unfinished extraction of another version, table or settings."""
        try:
            recorded = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            if not has_chunks:
                return  # nothing committed yet: nothing to keep apart
            why = e.strerror if isinstance(e, OSError) else "empty or damaged"
            raise StoreError(state_file, f"cannot be read ({why}), so the settings of the unfinished extraction in "
                             f"{self.parts} are unknown; if it was started by this same command, remove this file "
                             "and run it again to resume; otherwise remove the folder to start over") from None
        state = self._state()
        if recorded.get("chunk_format") != CHUNK_FORMAT:
            raise StoreError(self.parts, "holds an unfinished extraction of another cm-arr version; remove the folder "
                             "and extract again")
        changes = table_changes(recorded.get("utterances") or {}, state["utterances"])
        if changes:
            raise StoreError(self.parts, f"holds an unfinished extraction of another manifest (utterances "
                             f"{changes}); write to another --out, or remove this folder to start over")
        a, b = recorded.get("provenance") or {}, state["provenance"]
        if (recorded.get("dtype") != state["dtype"] or set(a) != set(b)
                or any(provenance_differences(a[m], b[m]) for m in a)):
            raise StoreError(self.parts, "holds an unfinished extraction made with other settings; write to "
                             "another --out, or remove this folder to start over")

    def _resume(self) -> None:
        if self.out.exists():
            self._take_base()
        # the parts folder exists (it holds the lock); everything in it is ours or a dead run's
        chunks = sorted(self.parts.glob("chunk-*.h5"))
        state_file = self.parts / STATE_NAME
        if state_file.exists():
            self._check_state(state_file, bool(chunks))
        for chunk in chunks:
            number = chunk.name[len("chunk-"):-len(".h5")]
            if number.isdigit():
                self._next_chunk = max(self._next_chunk, int(number) + 1)
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()  # a file that was being written when a run died
        self._remove_dead_leftovers()
        for chunk in chunks:
            try:
                src = ChunkSource(chunk)
            except (OSError, KeyError, ValueError) as e:
                raise StoreError(chunk, f"committed chunk cannot be read ({e}); remove it to recompute its "
                                 "utterances") from None
            self._done |= {(u, m) for m, u, _, _ in src.keys()}
            errs = src.errors()
            if errs is not None:
                self._retry |= set(zip(errs["utterance_id"], errs["modality"]))
        self._retry -= self._done
        write_json_atomic(state_file, self._state())

    def _remove_dead_leftovers(self) -> None:
        """Remove ``<out>.tmp-<pid>`` files of runs that died while assembling the store (a
        store's full size each). Only this job writes ``out`` (the lock); a pid that is still
        running is another program's (e.g. a merge): its file is left alone."""
        prefix = self.out.name + ".tmp-"
        try:
            entries = list(self.out.parent.iterdir())
        except OSError:
            return
        for p in entries:
            pid = p.name[len(prefix):]
            if p.name.startswith(prefix) and pid.isdigit() and p.is_file():
                if int(pid) == os.getpid() or not pid_alive(int(pid)):
                    p.unlink(missing_ok=True)

    # -- API -------------------------------------------------------------------------
    def done(self) -> set[tuple[str, str]]:
        """The (utterance, modality) pairs whose features are stored. Pairs recorded as
        errors by an earlier run are not done: a rerun tries them again (the media may have
        been fixed), and the newest outcome is kept."""
        return set(self._done)

    def retried(self) -> set[tuple[str, str]]:
        """Pairs an earlier run recorded as errors and this run tries again."""
        return set(self._retry)

    def add(self, utterance_id: str, modality: str, matrix: np.ndarray, **meta: Any) -> bool:
        """Queue one utterance's ``(T, D)`` matrix. Returns False (and records an error
        for the utterance) when the matrix is not storable: non-finite values, or values
        that overflow the store dtype. A call that raises (e.g. a failed commit) keeps the
        matrix in the buffer."""
        if modality not in self.provenance:
            raise StoreError(self.out, f"no provenance was given for modality {modality!r}")
        arr = np.asarray(matrix)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError(f"{utterance_id} ({modality}): expected a non-empty (T, D) matrix, got shape {arr.shape}")
        dim = self._dims.setdefault(modality, arr.shape[1])
        if arr.shape[1] != dim:
            raise ValueError(f"{utterance_id} ({modality}): width {arr.shape[1]}, the store's {modality} width "
                             f"is {dim}")
        keys = self._meta_keys.setdefault(modality, frozenset(meta))
        if frozenset(meta) != keys:
            raise ValueError(f"{utterance_id} ({modality}): meta keys {sorted(meta)}, other {modality} utterances "
                             f"have {sorted(keys)}")
        reason = _unstorable(arr, self.dtype)
        if reason is not None:
            self._append((utterance_id, modality, None, {}, reason), 0)
            return False
        cast = _store_cast(arr, self.dtype)
        self._done.add((utterance_id, modality))  # buffered: kept even if the commit below fails
        self._append((utterance_id, modality, cast, dict(meta), None), cast.nbytes)
        return True

    def add_error(self, utterance_id: str, modality: str, reason: str) -> None:
        """Record that ``modality`` has no features for the utterance, and why."""
        self._append((utterance_id, modality, None, {}, str(reason)), 0)

    def _append(self, item: Pending, nbytes: int) -> None:
        self._buffer.append(item)
        self._buffer_bytes += nbytes
        if len(self._buffer) >= self.chunk_size or self._buffer_bytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        """Commit everything added so far as one chunk; returns when it is on disk. Chunk
        numbers are taken only by the holder of the lock: no two commits share a name, and no
        committed chunk is ever replaced."""
        if not self._buffer:
            return
        if not self._lock.held:
            raise StoreError(self.out, "the writer is closed; nothing more can be committed")
        final = self.parts / f"chunk-{self._next_chunk:06d}.h5"
        while final.exists():
            self._next_chunk += 1
            final = self.parts / f"chunk-{self._next_chunk:06d}.h5"
        self._next_chunk += 1
        write_chunk(final, self._buffer)  # raises, the buffer kept, when the chunk cannot be written
        self._buffer = []
        self._buffer_bytes = 0

    def finalize(self) -> Path:
        """Write the complete store at ``out`` (atomically), remove the parts folder and
        release the lock. On any failure (``StoreError`` when some (utterance, modality) of
        this job has neither features nor a recorded error) nothing is written at ``out``, the
        committed chunks stay for a rerun and the writer is closed."""
        if not self._lock.held:
            raise StoreError(self.out, "the writer is closed; nothing more can be written")
        try:
            self.flush()
            provenance = {m: dict(p) for m, p in self.provenance.items()}
            for m, dim in self._dims.items():
                provenance[m].setdefault("dim", dim)
            required = [(u, m) for m in self._requested for u in self.utterances["utterance_id"]]
            chunks = [ChunkSource(c) for c in sorted(self.parts.glob("chunk-*.h5"))]
            if self._base is not None and not chunks and self._unchanged_base(provenance, required):
                self._lock.release(remove_folder=True)  # nothing to add: the store stays as it is, untouched
                return self.out
            sources: list[Source] = list(chunks)
            try:
                if self._base is not None:
                    base = StoreSource(self._base)
                    sources.insert(0, base)
                    # a modality this run computed nothing of keeps the stamp of when its frames were made
                    fresh = {m for src in chunks for m, _, _, _ in src.keys()}
                    fresh |= {m for src in chunks if src.errors() is not None for m in src.errors()["modality"]}
                    for m, p in base.store.provenance.items():
                        if m not in fresh and m in provenance:
                            provenance[m].update({k: p[k] for k in STAMP_KEYS if k in p})
                assemble(self.out, self.utterances, provenance, sources, self.dtype, self.extra_attrs,
                         required=required)
            finally:
                for src in sources:
                    src.close()
        except BaseException:
            self.close()
            raise
        self._lock.release(remove_folder=True)
        return self.out

    def _unchanged_base(self, provenance: Mapping[str, dict], required: list[tuple[str, str]]) -> bool:
        """Whether the existing store already is what this run would write (a rerun with
        nothing to do): same dtype, attributes and provenance (its own stamps kept, as
        nothing was computed), and every required pair has features or an error there (its
        table is this job's: ``_take_base`` checked it)."""
        store = FeatureStore(self._base)
        try:
            if store.dtype != self.dtype or any(store.attrs.get(k) != v for k, v in self.extra_attrs.items()):
                return False
            mine = {m: {**p, **{k: v for k, v in store.provenance.get(m, {}).items() if k in STAMP_KEYS}}
                    for m, p in provenance.items()}
            def canonical(p: Mapping[str, Any]) -> str:
                return json.dumps(p, sort_keys=True, default=str)

            if canonical(mine) != canonical(store.provenance):
                return False
            have = {(u, m) for m in store.modalities for u in store.ids(m)}
            have |= set(zip(store.errors["utterance_id"], store.errors["modality"]))
            return all(pair in have for pair in required)
        finally:
            store.close()

    def close(self) -> None:
        """Release the lock on the output, keeping the parts folder (``flush`` first to keep
        what is buffered; a later run resumes from it)."""
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.finalize()
            return
        try:
            if self._lock.held:
                self.flush()  # keep what was finished; a rerun resumes from it
        finally:
            self.close()
