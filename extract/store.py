"""The HDF5 feature store: the contract between extraction and training.

A store is one HDF5 file laid out as::

    /                         attrs: format="cm-arr-features", schema_version, dtype,
                              cm_arr_version, created, complete (and shard "k/N" for the
                              shard of a sharded extraction)
    /utterances/<column>      the utterance table, one 1-D dataset per column
                              (utterance_id, corpus, session, speaker, label, fold, start, end, ...)
    /provenance               attrs: <modality> = JSON (how that modality was made)
    /errors/<column>          per-utterance extraction failures (utterance_id, modality, reason)
    /features/<modality>/data     (N, D) every frame of every utterance, concatenated,
                                  float16 by default, contiguous and uncompressed; the
                                  group's attr ``data_sha256`` is the sha256 of its bytes
                                  (``validate`` recomputes it: a file damaged or altered
                                  after it was written is found)
    /features/<modality>/ids      (U,) utterance ids that have this modality
    /features/<modality>/offsets  (U,) first row of each utterance in ``data``
    /features/<modality>/lengths  (U,) its number of frames T
    /features/<modality>/meta/<key>
                              what is needed to read the frames, per utterance: a (U,) dataset
                              for scalars (frame_rate), or a group ``values`` + ``offsets``
                              (U + 1,) for per-utterance sequences (text ``tokens``, video
                              ``frame_times`` and ``face_mask`` of every sampled frame)

Frames are concatenated with an offsets table because one contiguous dataset reads much
faster than thousands of small ones: ``load_all`` is one read per modality, and random reads
go through a memory map of the contiguous ``data`` (no per-read HDF5 overhead). A modality
with no usable data for an utterance has no row for it (and a row in ``/errors`` saying why):
missing, never zeros.

Writing is crash-safe without SWMR: ``StoreWriter`` commits finished utterances into small
chunk files in a ``<out>.parts/`` folder beside the output (each modality's frames
concatenated as in the store; each file written under a temporary name, fsynced and
renamed; by a background thread while the extractor goes on), so a killed job loses at
most the utterances of the chunk being filled and the one being written, and a rerun
resumes. One writer at a time: a writer holds an exclusive lock (``flock`` on
``<out>.parts/lock``) for its lifetime, and a second one on the same output is refused (the
kernel drops the lock of a killed process, so a crash never blocks the rerun). ``finalize``
checks that every requested (utterance, modality) has features or a recorded error, joins
everything into a temporary file and renames it onto the output path: a file at the output
path is always complete.

Frames are checked wherever they are copied, since what is copied gets a fresh sha256 in
the output: each chunk's frames carry a CRC-32 checked when the store is assembled, and a
store used as input (a shard being merged, a store being extended) is checked against its
own sha256 first. Damage is refused with the file named, never passed on.

The utterance table of a store is in one order, ``utterance_order`` (by utterance id), both
for a single-process extraction and for a merge of its shards (``select_shard`` splits that
order), so a merged store lists its utterances, frames and errors as the single-process store
does.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import threading
import time
import traceback
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import pandas as pd

from .base import PathError, durable_replace, interrupts_held, raise_held
from .manifest import fold_leaks

FORMAT = "cm-arr-features"
SCHEMA_VERSION = 1
MODALITIES = ("speech", "text", "video")
LABELS = ("ang", "hap", "neu", "sad")
DIMS = {"speech": 768, "text": 768, "video": 342}
REQUIRED_COLUMNS = ("utterance_id", "corpus", "session", "speaker", "label", "fold", "start", "end")
ERROR_COLUMNS = ("utterance_id", "modality", "reason")

#: Provenance keys that legitimately differ between shards of one extraction.
VOLATILE_PROVENANCE_KEYS = frozenset({"created", "host"})
#: When, where and with what software a modality's frames were made: kept from the existing
#: store for a modality of which a rerun computed nothing.
STAMP_KEYS = ("created", "host", "library_versions", "cm_arr_version")
#: Bytes of consecutive frames gathered before one write when a store is assembled.
WRITE_BLOCK_BYTES = 8 << 20
#: When a modality's frames in committed chunks total at most this many bytes, assembling
#: the store reads each chunk's block of that modality once, whole, instead of once per
#: utterance (text: a read per utterance cost more than copying its rows).
WHOLE_BLOCK_READ_BYTES = 1 << 30
#: Defaults of ``StoreWriter``'s commit policy: a chunk is committed when it holds
#: ``chunk_size`` utterances, ``chunk_bytes`` of features, or when its first utterance has
#: waited ``commit_seconds`` (what a kill can lose), whichever comes first.
CHUNK_SIZE = 1024
CHUNK_BYTES = 64 << 20
COMMIT_SECONDS = 30.0
#: Meta keys stored as arrays and the dtype they are read back with.
_ARRAY_META = {"frame_times": np.float32, "face_mask": bool}


class StoreError(PathError):
    """A store that cannot be read, written or merged. ``str(e)`` is ``"<path>: <problem>"``."""


def project_version() -> str:
    try:
        return metadata.version("cm-arr")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the features."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "numpy", "h5py", "librosa", "soundfile",
                 "soxr", "opencv-python-headless", "torchvision", "facenet-pytorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def comparable_provenance(prov: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance without the keys that may differ between shards of one job."""
    return {k: v for k, v in prov.items() if k not in VOLATILE_PROVENANCE_KEYS}


#: Where a model or checkpoint was loaded from does not matter when its weights are the same
#: (copies in different folders, on different machines): weights sha256 key -> location
#: keys. The sha256 is recorded for models loaded from a folder and for Denseface
#: checkpoints; a hub id is compared as such (with its revision and commit).
LOCATION_KEYS = {"weights_sha256": ("model", "revision", "commit_hash"),
                 "denseface_checkpoint_sha256": ("denseface_checkpoint",)}


#: Identity keys that earlier versions did not record (or recorded as None: the hub commit
#: under newer transformers): compared only when both sides record them.
IF_BOTH_KEYS = ("commit_hash", "weights_sha256", "files_sha256")


def without_locations(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``a`` and ``b`` without the keys that say where their weights were loaded from, for
    each weights sha256 they record equally (``LOCATION_KEYS``; the tokenizer's folder too),
    and without the ``IF_BOTH_KEYS`` one of them lacks."""
    a, b = dict(a), dict(b)
    for k in IF_BOTH_KEYS:
        if a.get(k) is None or b.get(k) is None:
            a.pop(k, None)
            b.pop(k, None)
    for sha, keys in LOCATION_KEYS.items():
        if a.get(sha) and a.get(sha) == b.get(sha):
            for d in (a, b):
                for k in keys:
                    d.pop(k, None)
                if sha == "weights_sha256" and isinstance(d.get("tokenizer"), dict):
                    d["tokenizer"] = {k: v for k, v in d["tokenizer"].items() if k != "name_or_path"}
    return a, b


def provenance_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable list of keys whose values differ: volatile keys ignored, and where a
    model was loaded from when its weights' sha256 are equal (``without_locations``)."""
    a, b = without_locations(comparable_provenance(a), comparable_provenance(b))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    return out


def errors_hint(path: str | os.PathLike) -> str:
    """The command that lists a store's recorded extraction failures."""
    return f"`cm-arr-features errors {path}`"


# --------------------------------------------------------------------------------------
# the order of the utterance table, and shards of it


def utterance_order(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` in the order of a store's utterance table: sorted by utterance id (stable,
    so independent of the manifest's row order). Extraction writes its rows in this order and
    ``merge_stores`` puts the shards' rows back into it: a merged store is laid out as the
    single-process store is (trainers pick validation utterances by table position)."""
    return table.sort_values("utterance_id", kind="stable").reset_index(drop=True)


def select_shard(manifest: pd.DataFrame, k: int, n: int) -> pd.DataFrame:
    """Shard ``k`` of ``n``: rows ``k, k+N, k+2N, ...`` of ``utterance_order(manifest)``."""
    return utterance_order(manifest).iloc[k::n].reset_index(drop=True)


def parse_shard_tag(tag: Any) -> tuple[int, int] | None:
    """The ``(k, N)`` of a store's ``shard`` attribute ``"k/N"``, or None if it holds none."""
    if not tag:
        return None
    try:
        k, n = (int(x) for x in str(tag).split("/"))
    except ValueError:
        return None
    return (k, n) if 0 <= k < n else None


# --------------------------------------------------------------------------------------
# files and folders of a writer


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


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that it is either the old or the complete new file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, sort_keys=True))
        durable_replace(tmp, path)
    except OSError as e:  # e.g. a full disk: said of this file (a failed flush names none)
        tmp.unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def lock_output(out: str | os.PathLike) -> "_OutputLock":
    """Take the exclusive right to write the store ``out`` now (``StoreError`` if another
    process holds it), before slow set-up work; hand it to ``StoreWriter(lock=...)``."""
    out = Path(out)
    return _OutputLock(out, out.with_name(out.name + ".parts"))


class _OutputLock:
    """Exclusive right to write ``out``: ``flock`` on ``<out>.parts/lock``, held until
    ``release``. The holder's pid is written into the file (for the message another writer
    gets). The kernel releases a flock when its process dies, so a killed run never blocks
    the rerun (a pid file would). The lock file is removed only by its holder, last of the
    folder; a writer that locked a file removed meanwhile tries again on the new one."""

    NAME = "lock"

    def __init__(self, out: Path, parts: Path):
        self.out, self.parts = out, parts
        self.path = parts / self.NAME
        self.fd: int | None = None
        self.created = False  # whether the parts folder was made for this lock (nothing of earlier runs in it)
        for _ in range(100):
            self.created = not parts.exists()
            make_folder(parts, out)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a writer that just finished
                continue
            except OSError as e:
                raise StoreError(self.path, f"cannot create the lock file ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreError(out, f"is being written by another process (pid {holder}); wait for it to "
                                     "finish, or stop it and run the same command again to resume") from None
                raise StoreError(self.path, f"cannot be locked ({e.strerror or e}); the folder must be on a file "
                                 "system that supports flock") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # locked a lock file that its holder removed when it finished: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return
        raise StoreError(self.path, "could not be locked: the folder keeps being removed by another process")

    @staticmethod
    def _holder(fd: int) -> str:
        for _ in range(20):  # the holder writes its pid just after locking
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.01)
        return "unknown"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self, remove_folder: bool = False) -> None:
        """Drop the lock; with ``remove_folder`` first remove the parts folder (its lock file
        last, while still holding it)."""
        if self.fd is None:
            return
        try:
            if remove_folder:
                # committed chunks first, state.json (what says which chunks are current) last:
                # a kill in between leaves state.json with fewer chunks, never chunks without it
                last = {self.NAME: 2, "state.json": 1}
                for entry in sorted(self.parts.iterdir(), key=lambda e: last.get(e.name, 0)):
                    if entry.name == self.NAME:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                self.path.unlink(missing_ok=True)
                try:
                    self.parts.rmdir()
                except OSError:  # a new writer has already begun in it
                    pass
        finally:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __del__(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


# --------------------------------------------------------------------------------------
# low-level table and meta I/O


def _write_table(group: h5py.Group, df: pd.DataFrame) -> None:
    group.attrs["columns"] = json.dumps(list(df.columns))
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_bool_dtype(s):
            group.create_dataset(col, data=s.to_numpy(dtype=bool))
        elif pd.api.types.is_integer_dtype(s):
            group.create_dataset(col, data=s.to_numpy(dtype=np.int64))
        elif pd.api.types.is_float_dtype(s):
            group.create_dataset(col, data=s.to_numpy(dtype=np.float64))
        else:
            values = ["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                      for v in s.tolist()]
            group.create_dataset(col, data=np.array(values, dtype=object),
                                 dtype=h5py.string_dtype())


def _read_table(group: h5py.Group) -> pd.DataFrame:
    columns = json.loads(group.attrs["columns"]) if "columns" in group.attrs else list(group)
    data = {}
    for col in columns:
        ds = group[col]
        if h5py.check_string_dtype(ds.dtype) is not None:
            data[col] = list(ds.asstr()[()])
        else:
            data[col] = ds[()]
    return pd.DataFrame(data, columns=columns)


def _read_meta(ds: h5py.Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in ds.attrs.items():
        if key == "tokens":
            out[key] = [v.decode() if isinstance(v, bytes) else str(v) for v in value]
        elif key in _ARRAY_META:
            out[key] = np.asarray(value).astype(_ARRAY_META[key])
        elif isinstance(value, bytes):
            out[key] = value.decode()
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file with one clear error for every way it can fail."""
    if not path.exists():
        raise StoreError(path, "no such file")
    if path.is_dir():
        raise StoreError(path, "is a folder, not a feature file")
    try:
        if not h5py.is_hdf5(str(path)):
            raise StoreError(path, "not an HDF5 file")
        return h5py.File(str(path), mode)
    except StoreError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreError(path, f"cannot be read as HDF5 (truncated or corrupt?): {first}") from None


def _check_store(path: Path, f: h5py.File) -> None:
    """Raise ``StoreError`` unless ``f`` is a complete store of this schema."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise StoreError(path, f"an HDF5 file but not a cm-arr feature store (format attribute is {fmt!r}, expected {FORMAT!r})")
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise StoreError(path, f"feature store schema version {version}; this cm-arr ({project_version()}) reads schema version {SCHEMA_VERSION}")
    if not bool(f.attrs.get("complete", False)):
        raise StoreError(path, "feature store is marked incomplete (an extraction that did not finish)")
    for name in ("utterances", "provenance", "features"):
        if name not in f:
            raise StoreError(path, f"feature store lacks its '/{name}' group (damaged file?)")


# --------------------------------------------------------------------------------------
# per-modality layout helpers


def _read_ragged_meta(group: h5py.Group, n: int) -> list[dict[str, Any]]:
    """Per-utterance meta dicts of one modality (``n`` utterances)."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key in group:
        obj = group[key]
        if isinstance(obj, h5py.Group):
            vals = obj["values"]
            values = list(vals.asstr()[()]) if h5py.check_string_dtype(vals.dtype) is not None else vals[()]
            if key in _ARRAY_META:
                values = np.asarray(values).astype(_ARRAY_META[key])
            offs = obj["offsets"][()]
            for i in range(n):
                v = values[offs[i]:offs[i + 1]]
                out[i][key] = list(v) if isinstance(v, list) else v
        else:
            col = list(obj.asstr()[()]) if h5py.check_string_dtype(obj.dtype) is not None else obj[()]
            encoding = obj.attrs.get("encoding")  # absent in files of earlier versions: JSON-looking strings were JSON
            for i in range(n):
                v = col[i]
                if isinstance(v, str) and (encoding == "json" or (encoding is None and v.startswith(("{", "[")))):
                    v = json.loads(v)
                out[i][key] = v.item() if isinstance(v, np.generic) else v
    return out


def _write_modality(f: h5py.File, modality: str, dim: int, dtype: str,
                    items: list[tuple[str, int]], read, check=None) -> None:
    """Write one modality in the concatenated layout.

    ``items`` is ``[(utterance_id, frames)]`` in output order; ``read(utt)`` returns
    ``(matrix, meta)`` for it. Meta keys holding sequences are stored ragged. ``check()``,
    called after each block written, raises when a write has failed (``_WriteGuard``): the
    rest is not computed in vain.
    """
    g = f["features"].require_group(modality)
    total = int(sum(n for _, n in items))
    data = g.create_dataset("data", shape=(total, dim), dtype=dtype)  # contiguous: memory-mappable
    lengths = np.array([n for _, n in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(items) else np.zeros(0, np.int64)
    g.create_dataset("ids", data=np.array([u for u, _ in items], dtype=object), dtype=h5py.string_dtype())
    g.create_dataset("offsets", data=offsets)
    g.create_dataset("lengths", data=lengths)
    metas: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    pending: list[np.ndarray] = []  # consecutive rows, written together (one HDF5 call per ~8 MB)
    start = size = 0

    def write_pending() -> None:
        nonlocal start, size
        if pending:
            block = pending[0] if len(pending) == 1 else np.concatenate(pending)
            data[start:start + block.shape[0]] = block
            start += block.shape[0]
            pending.clear()
            size = 0
            if check is not None:
                check()

    for utt, n in items:
        arr, meta = read(utt)
        if arr.shape != (n, dim):
            raise ValueError(f"{utt} ({modality}): shape {arr.shape}, expected {(n, dim)}")
        arr = np.ascontiguousarray(arr, dtype=data.dtype)
        digest.update(arr)  # rows in file order
        pending.append(arr)
        size += arr.nbytes
        if size >= WRITE_BLOCK_BYTES:
            write_pending()
        metas.append(meta)
    write_pending()
    g.attrs["data_sha256"] = digest.hexdigest()
    _write_meta_group(g.create_group("meta"), modality, metas)


def _write_meta_group(mg: h5py.Group, modality: str, metas: list[Mapping[str, Any]]) -> None:
    """Per-utterance meta dicts as columns: a ``(U,)`` dataset per scalar or string key, a
    group ``values`` + ``offsets`` per sequence key (read back by ``_read_ragged_meta``)."""
    keys = sorted({k for m in metas for k in m})
    for key in keys:
        vals = [m.get(key) for m in metas]
        if any(v is None for v in vals):
            raise ValueError(f"{modality}: meta {key!r} is set for some utterances only")
        if key == "tokens":
            offs = np.concatenate([[0], np.cumsum([len(v) for v in vals])]).astype(np.int64)
            sub = mg.create_group(key)
            flat = [str(t) for v in vals for t in v]
            sub.create_dataset("values", data=np.array(flat, dtype=object), dtype=h5py.string_dtype())
            sub.create_dataset("offsets", data=offs)
        elif isinstance(vals[0], (np.ndarray, list, tuple)):
            seqs = [np.asarray(v) for v in vals]
            offs = np.concatenate([[0], np.cumsum([len(v) for v in seqs])]).astype(np.int64)
            flat = np.concatenate(seqs)
            sub = mg.create_group(key)
            sub.create_dataset("values", data=flat.astype(np.uint8) if flat.dtype == bool else flat)
            sub.create_dataset("offsets", data=offs)
        elif isinstance(vals[0], (str, dict)):
            kinds = {type(v) for v in vals}
            if len(kinds) > 1 or not kinds <= {str, dict}:
                raise ValueError(f"{modality}: meta {key!r} mixes {', '.join(sorted(k.__name__ for k in kinds))} values")
            text = kinds == {str}
            col = vals if text else [json.dumps(v, sort_keys=True) for v in vals]
            ds = mg.create_dataset(key, data=np.array(col, dtype=object), dtype=h5py.string_dtype())
            ds.attrs["encoding"] = "text" if text else "json"  # what the reader does with the strings
        else:
            mg.create_dataset(key, data=np.asarray(vals))


# --------------------------------------------------------------------------------------
# reading


class FeatureStore:
    """Read access to a feature store.

    Random reads (``get``) go through a memory map of each modality's contiguous frame
    matrix, opened lazily in each process (and reopened after a fork), so a
    ``FeatureStore`` can be handed to DataLoader workers. ``load_all`` reads everything into
    memory (IEMOCAP fits: about 3.3 GB of fp16 speech frames) in one read per modality.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._maps: dict[str, np.ndarray] = {}
        self._pid: int | None = None
        self._meta: dict[str, list[dict[str, Any]]] = {}
        self._meta_pos: dict[str, dict[str, int]] = {}
        f = _open_h5(self.path)
        try:
            _check_store(self.path, f)
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
                          for k, v in f.attrs.items()}
            try:
                self.utterances = _read_table(f["utterances"])
                self.provenance = {m: json.loads(v) for m, v in f["provenance"].attrs.items()}
                self.errors = (_read_table(f["errors"]) if "errors" in f
                               else pd.DataFrame(columns=list(ERROR_COLUMNS)))
                self.modalities = tuple(m for m in MODALITIES if m in f["features"] or m in self.provenance)
                self._index: dict[str, dict[str, tuple[int, int]]] = {}
                self._order: dict[str, list[str]] = {}
                self._layout: dict[str, tuple[int | None, tuple[int, int], str]] = {}
                self.checksums: dict[str, str | None] = {}  # modality -> sha256 of its frames as written
                for m in self.modalities:
                    g = f["features"][m]
                    c = g.attrs.get("data_sha256")
                    self.checksums[m] = c.decode() if isinstance(c, bytes) else (str(c) if c is not None else None)
                    ids = list(g["ids"].asstr()[()])
                    offs, lens = g["offsets"][()], g["lengths"][()]
                    self._order[m] = ids
                    self._index[m] = {u: (int(o), int(n)) for u, o, n in zip(ids, offs, lens)}
                    data = g["data"]
                    self._layout[m] = (data.id.get_offset(), data.shape, data.dtype.str)
            except (KeyError, ValueError, OSError) as e:
                raise StoreError(self.path, f"damaged feature store: {e}") from None
        finally:
            f.close()
        self.dims = {m: int(self._layout[m][1][1]) for m in self.modalities}

    # -- lazy per-process access -------------------------------------------------------
    def _data(self, modality: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps = {}
            self._pid = os.getpid()
        arr = self._maps.get(modality)
        if arr is None:
            offset, shape, dtype = self._layout[modality]
            if offset is not None and shape[0] > 0:
                arr = np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
            else:  # an empty modality, or a layout h5py cannot map: read it once
                with h5py.File(str(self.path), "r") as f:
                    arr = f["features"][modality]["data"][()]
            self._maps[modality] = arr
        return arr

    def close(self) -> None:
        self._maps = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_pid"] = None
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- access --------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return str(self.attrs.get("dtype", "float16"))

    def ids(self, modality: str) -> set[str]:
        return set(self._index.get(modality, ()))

    def lengths(self, modality: str) -> dict[str, int]:
        return {u: n for u, (_, n) in self._index.get(modality, {}).items()}

    def has(self, utterance_id: str, modality: str) -> bool:
        return utterance_id in self._index.get(modality, ())

    def get(self, utterance_id: str, modality: str) -> np.ndarray | None:
        """The ``(T, D)`` matrix (a copy), or None when the modality is missing for the utterance."""
        where = self._index.get(modality, {}).get(utterance_id)
        if where is None:
            return None
        off, n = where
        return np.array(self._data(modality)[off:off + n])

    def meta(self, utterance_id: str, modality: str) -> dict[str, Any]:
        if not self.has(utterance_id, modality):
            return {}
        if modality not in self._meta:
            with h5py.File(str(self.path), "r") as f:
                g = f["features"][modality]
                self._meta[modality] = _read_ragged_meta(g["meta"], len(self._order[modality])) if "meta" in g else \
                    [{} for _ in self._order[modality]]
            self._meta_pos[modality] = {u: i for i, u in enumerate(self._order[modality])}
        return dict(self._meta[modality][self._meta_pos[modality][utterance_id]])

    def pieces(self, modality: str, piece_bytes: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, contiguous block)`` of consecutive rows of ``modality``'s frames, about
        ``piece_bytes`` each, in order: a pass over every frame in bounded memory."""
        data = self._data(modality)
        step = max(1, piece_bytes // max(1, data.shape[1] * data.dtype.itemsize))
        for start in range(0, data.shape[0], step):
            yield start, np.ascontiguousarray(data[start:start + step])

    def verify(self, modalities: Iterable[str] | None = None, piece_bytes: int = 64 << 20,
               each: Callable[[str, int, np.ndarray], None] | None = None) -> None:
        """Check each modality's frames against the sha256 recorded when the store was
        written, reading them in pieces of about ``piece_bytes`` (bounded memory, one pass:
        for stores larger than RAM). Raises ``StoreError`` naming the first modality whose
        frames differ. A modality without a recorded checksum (stores of older versions)
        passes: there is nothing to check it against. ``each(modality, first row, block)``,
        when given, sees every piece of the same pass (another check at no extra read)."""
        for m in (tuple(modalities) if modalities is not None else self.modalities):
            if m not in self.modalities:
                raise StoreError(self.path, f"the store has no {m!r} features (it holds {', '.join(self.modalities)})")
            recorded = self.checksums.get(m)
            if not recorded and each is None:
                continue
            digest = hashlib.sha256()
            for start, block in self.pieces(m, piece_bytes):
                if recorded:
                    digest.update(memoryview(block).cast("B"))
                if each is not None:
                    each(m, start, block)
            if recorded and digest.hexdigest() != recorded:
                raise StoreError(self.path, f"{m}: the frames do not match the checksum recorded when the "
                                 "file was written (damaged or altered since); `cm-arr-features validate` says more")

    def load_all(self, modalities: Iterable[str] | None = None,
                 dtype: Any = None, verify: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Every matrix in memory: ``{modality: {utterance_id: (T, D) array}}``. The arrays
        of one modality are views into one block (one read per modality). With ``verify``,
        each block's sha256 is checked against the one recorded when the store was written
        (``StoreError`` when they differ: the file was damaged or altered since)."""
        mods = tuple(modalities) if modalities is not None else self.modalities
        out: dict[str, dict[str, np.ndarray]] = {}
        with h5py.File(str(self.path), "r") as f:
            for m in mods:
                if m not in self.modalities:
                    raise StoreError(self.path, f"the store has no {m!r} features (it holds {', '.join(self.modalities)})")
                ds = f["features"][m]["data"]
                block = np.empty(ds.shape, dtype=ds.dtype)
                if ds.shape[0]:
                    ds.read_direct(block)
                recorded = self.checksums.get(m)
                if verify and recorded and hashlib.sha256(block.tobytes() if not block.size
                                                          else memoryview(block).cast("B")).hexdigest() != recorded:
                    raise StoreError(self.path, f"{m}: the frames do not match the checksum recorded when the "
                                     "file was written (damaged or altered since); `cm-arr-features validate` "
                                     "says more")
                if dtype is not None:
                    block = block.astype(dtype, copy=False)
                out[m] = {u: block[o:o + n] for u, (o, n) in self._index[m].items()}
        return out


# --------------------------------------------------------------------------------------
# sources of finished utterances: committed chunk files and existing stores


class _ChunkSource:
    """A committed chunk file. Layout 2 (``chunk_format`` attr): per modality the frames
    concatenated as in a store (``data``, ``ids``, ``lengths``, ``meta``); its index and meta
    are read when it is opened, and frames straight from the file (the file is not held
    open, so that a corpus' hundreds of chunks need no file handle each). Layout 1 (chunks
    of earlier versions, still read so that their unfinished extractions resume): one
    dataset per (modality, utterance) with its meta in attributes."""

    def __init__(self, path: Path):
        self.path = path
        self.f: h5py.File | None = h5py.File(str(path), "r")
        self.layout = int(self.f.attrs.get("chunk_format", 1))
        self._index: dict[str, dict[str, tuple[int, int, int]]] = {}  # m -> utt -> (row, offset, frames)
        self._data: dict[str, tuple[int | None, int, np.dtype]] = {}  # m -> (file offset of data, dim, dtype)
        self._metas: dict[str, list[dict[str, Any]]] = {}
        self._rows: dict[str, int] = {}  # m -> frames in the chunk
        self._held: dict[str, np.ndarray | None] = {}  # m -> the whole block, read on first use (see hold)
        self._crc: dict[str, int | None] = {}  # m -> CRC-32 of the block as written (None: older chunks)
        self._checked: set[str] = set()  # modalities whose block matched its CRC
        self._errors: pd.DataFrame | None = None
        if self.layout == 1:
            return
        try:
            if self.layout != 2:
                raise KeyError(f"chunk layout {self.layout} is not one this version reads")
            for m, g in self.f.get("features", {}).items():
                ids = list(g["ids"].asstr()[()])
                lengths = g["lengths"][()]
                offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
                self._index[m] = {u: (i, int(o), int(n)) for i, (u, o, n) in enumerate(zip(ids, offsets, lengths))}
                data = g["data"]
                plain = data.chunks is None and data.compression is None and data.shape[0] > 0
                self._data[m] = (data.id.get_offset() if plain else None, int(data.shape[1]), data.dtype)
                self._rows[m] = int(data.shape[0])
                crc = data.attrs.get("crc32")
                self._crc[m] = None if crc is None else int(crc)
                self._metas[m] = _read_ragged_meta(g["meta"], len(ids))
            self._errors = _read_table(self.f["errors"]) if "errors" in self.f else None
        finally:
            self.f.close()
            self.f = None

    def keys(self) -> Iterator[tuple[str, str, int, int]]:
        if self.layout == 1:
            for m in self.f.get("features", {}):
                for u, ds in self.f["features"][m].items():
                    yield m, u, ds.shape[0], ds.shape[1]
            return
        for m, index in self._index.items():
            dim = self._data[m][1]
            for u, (_, _, n) in index.items():
                yield m, u, n, dim

    def hold(self, m: str) -> None:
        """Read modality ``m``'s block whole on its first ``read`` and keep it until ``release``."""
        if self.layout == 2 and m in self._data and self._data[m][0] is not None:
            self._held.setdefault(m, None)

    def release(self, m: str) -> None:
        self._held.pop(m, None)

    def block_bytes(self, m: str) -> int:
        """Bytes ``hold(m)`` would keep in memory."""
        if self.layout != 2 or m not in self._data or self._data[m][0] is None:
            return 0
        return self._rows[m] * self._data[m][1] * self._data[m][2].itemsize

    def read(self, m: str, u: str):
        if self.layout == 1:
            ds = self.f["features"][m][u]
            return ds[()], _read_meta(ds)
        i, off, n = self._index[m][u]
        start, dim, dtype = self._data[m]
        if m in self._held:
            block = self._held[m]
            if block is None:
                block = self._held[m] = self._block(m)
            arr = block[off:off + n]
        elif m not in self._checked:  # read the block once to check it, then per utterance
            arr = self._block(m)[off:off + n].copy()
        elif start is None:  # a layout h5py does not store as one plain block
            with h5py.File(str(self.path), "r") as f:
                arr = f["features"][m]["data"][off:off + n]
        else:
            arr = np.fromfile(self.path, dtype=dtype, count=n * dim, offset=start + off * dim * dtype.itemsize)
            arr = arr.reshape(n, dim)
        return arr, dict(self._metas[m][i])

    def _block(self, m: str) -> np.ndarray:
        """Modality ``m``'s whole ``(rows, dim)`` block, checked against its CRC-32 once."""
        start, dim, dtype = self._data[m]
        if start is None:
            with h5py.File(str(self.path), "r") as f:
                block = f["features"][m]["data"][()]
        else:
            block = np.fromfile(self.path, dtype=dtype, count=self._rows[m] * dim, offset=start)
            block = block.reshape(self._rows[m], dim)
        if m not in self._checked:
            if self._crc.get(m) is not None and zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B")) != self._crc[m]:
                raise StoreError(self.path, f"{m}: the frames of this committed chunk do not match the checksum "
                                 "recorded when it was written (damaged since); remove this file and run the same "
                                 "command again to recompute its utterances")
            self._checked.add(m)
        return block

    def errors(self) -> pd.DataFrame | None:
        if self.layout == 1:
            return _read_table(self.f["errors"]) if "errors" in self.f else None
        return self._errors

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _StoreSource:
    """A complete store used as input (a base being extended, or a shard being merged).
    Its frames are checked against their recorded checksums first: the output gets a new
    checksum over what is copied, so damage copied unchecked would pass for sound data."""

    def __init__(self, path: Path):
        self.path = path
        self.store = FeatureStore(path)
        self.store.verify()

    def keys(self) -> Iterator[tuple[str, str, int, int]]:
        for m in self.store.modalities:
            for u, (_, n) in self.store._index[m].items():
                yield m, u, n, self.store.dims[m]

    def read(self, m: str, u: str):
        return self.store.get(u, m), self.store.meta(u, m)

    def hold(self, m: str) -> None:
        pass  # a store's frames are read from its contiguous block already

    def release(self, m: str) -> None:
        pass

    def block_bytes(self, m: str) -> int:
        return 0

    def errors(self) -> pd.DataFrame | None:
        return self.store.errors

    def close(self) -> None:
        self.store.close()


class _Without:
    """A source with some ``(modality, utterance)`` pairs hidden: features and error records
    computed from media that have changed since (see ``StoreWriter``'s ``media``)."""

    def __init__(self, src, hidden: set[tuple[str, str]]):
        self.src, self.hidden = src, hidden

    def keys(self) -> Iterator[tuple[str, str, int, int]]:
        return ((m, u, n, d) for m, u, n, d in self.src.keys() if (m, u) not in self.hidden)

    def read(self, m: str, u: str):
        return self.src.read(m, u)

    def hold(self, m: str) -> None:
        self.src.hold(m)

    def release(self, m: str) -> None:
        self.src.release(m)

    def block_bytes(self, m: str) -> int:
        return self.src.block_bytes(m)

    def errors(self) -> pd.DataFrame | None:
        err = self.src.errors()
        if err is None or not len(err):
            return err
        keep = [(m, u) not in self.hidden for u, m in zip(err["utterance_id"], err["modality"])]
        return err[keep]

    def close(self) -> None:
        self.src.close()


def media_fingerprints(table: pd.DataFrame, media: Mapping[str, Sequence[str]]) -> dict[tuple[str, str], str]:
    """``(modality, utterance) -> sha1`` of the table columns that modality's features are
    computed from (``media[modality]``; a column the table lacks counts as empty)."""
    out: dict[tuple[str, str], str] = {}
    ids = table["utterance_id"].astype(str).tolist()
    for m, cols in media.items():
        values = [table[c].tolist() if c in table.columns else [None] * len(ids) for c in cols]
        for i, u in enumerate(ids):
            row = [None if (isinstance(v[i], float) and v[i] != v[i]) else v[i] for v in values]  # NaN -> None
            out[(m, u)] = hashlib.sha1(json.dumps(row, default=str).encode()).hexdigest()
    return out


#: errno values of a write that failed for want of room: the process's file-size limit
#: (``ulimit -f``; CPython ignores SIGXFSZ, so the write fails instead of killing the process),
#: a full disk, an exhausted quota.
NO_ROOM = frozenset({errno.EFBIG, errno.ENOSPC, errno.EDQUOT})


def write_failure(e: OSError, path: str | os.PathLike) -> str:
    """``"<path>: cannot write: <why>"`` for a failed write of ``path``; the caller adds
    what was kept and what to do."""
    if e.errno in NO_ROOM:
        return (f"{path}: cannot write: file too large for this process's file-size limit, or disk full "
                f"({e.strerror or e})")
    return f"{path}: cannot write: {e.strerror or e}"


class _WriteGuard:
    """The file object under an HDF5 file being written (h5py's ``fileobj`` driver).

    HDF5 does not survive a failed write: its metadata cache keeps the dirty entries, every
    later close or object release fails again ("Can't decrement id ref count"), and the
    process may crash at exit. Here a write that fails (a full disk, ``ulimit -f``) is
    recorded and reported to HDF5 as done; later writes are dropped, reads of what was never
    written read zeros. HDF5 thus stays consistent and closes the file normally; the writer
    then finds the error (``check``) and removes the file, which is worthless. A Ctrl-C that
    lands in these callbacks is held likewise and raised by ``check``."""

    def __init__(self, path: Path, shown: str | os.PathLike | None = None):
        self.path = path
        self.shown = str(shown if shown is not None else path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.pos = 0
        self.size = 0  # as HDF5 believes it: failed writes included
        self.error: OSError | None = None
        self.interrupt: BaseException | None = None

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = pos if whence == os.SEEK_SET else (self.pos + pos if whence == os.SEEK_CUR else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _io(self, op) -> None:
        """Run ``op`` (a system call) unless a write has failed; record its failure."""
        while self.error is None:
            try:
                op()
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.error = e
            except KeyboardInterrupt as e:  # never into HDF5: raised by check(), after this call
                self.interrupt = e

    def read(self, n: int = -1) -> bytes:
        n = max(self.size - self.pos, 0) if n is None or n < 0 else n
        got: list[bytes] = []
        self._io(lambda: got.append(os.pread(self.fd, n, self.pos)))
        data = got[0] if got else b""
        if len(data) < n and self.pos + n <= self.size:
            data += bytes(n - len(data))  # never written (a failed write): HDF5 gets its length
        self.pos += len(data)
        return data

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        done = [0]

        def op():
            while done[0] < n:
                done[0] += os.pwrite(self.fd, view[done[0]:], self.pos + done[0])
        self._io(op)
        self.pos += n
        self.size = max(self.size, self.pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self._io(lambda: os.ftruncate(self.fd, size))
        self.size = size
        return size

    def flush(self) -> None:
        pass  # unbuffered; durable_replace fsyncs the finished file

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check(self) -> None:
        """Raise the failed write (``OSError`` naming the file), a held Ctrl-C or a held
        SIGTERM (``raise_held``)."""
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror or str(self.error), self.shown)
        if self.interrupt is not None:
            e, self.interrupt = self.interrupt, None
            raise e
        raise_held()


@contextlib.contextmanager
def _new_h5(path: Path, shown: str | os.PathLike | None = None) -> Iterator[tuple[h5py.File, _WriteGuard]]:
    """Create the HDF5 file ``path`` for writing through a ``_WriteGuard``; yields ``(file,
    guard)``. The file is closed on leaving, then a failed write is raised as ``OSError``
    naming ``shown`` (default ``path``), also when it caused the error the body raised
    (HDF5 reading back what was never written). A SIGTERM meanwhile is raised at the end
    (``interrupts_held``). The caller removes the file on failure."""
    with interrupts_held():
        guard = _WriteGuard(path, shown)
        try:
            f = h5py.File(guard, "w", libver="latest")
        except BaseException:
            guard.close()
            raise
        try:
            yield f, guard
        except Exception:
            _close_h5(f, guard)
            if guard.error is not None:
                guard.check()  # the first cause
            raise
        except BaseException:
            _close_h5(f, guard)
            raise
        _close_h5(f, guard)
        guard.check()


def _close_h5(f: h5py.File, guard: _WriteGuard) -> None:
    try:
        f.close()
    finally:
        guard.close()


def _init_store_file(f: h5py.File, dtype: str) -> h5py.File:
    """The root attributes and groups of a new store (``complete`` False until the end)."""
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["dtype"] = dtype
    f.attrs["cm_arr_version"] = project_version()
    f.attrs["created"] = _now()
    f.attrs["complete"] = False
    f.create_group("features")
    f.create_group("provenance")
    return f


def _assemble(out: Path, utterances: pd.DataFrame, provenance: Mapping[str, dict],
              sources: list, dtype: str, extra_attrs: Mapping[str, Any] | None = None,
              required: Iterable[tuple[str, str]] | None = None) -> None:
    """Write a complete store at ``out`` from ``sources`` (chunk files and/or stores), via
    a temporary file renamed into place.

    A later source's (utterance, modality) replaces an earlier one (a base store being
    extended); an error record is dropped when the pair has features in any source, and of
    several error records of a pair the last is kept. Frames and error records are laid out
    in utterance-table order (errors of one utterance in ``MODALITIES`` order).

    ``required``: ``(utterance, modality)`` pairs that must each have features or an error
    record; when some have neither, ``StoreError`` is raised and nothing is written.
    """
    owner: dict[tuple[str, str], tuple[int, int, int]] = {}
    for i, src in enumerate(sources):
        for m, u, n, d in src.keys():
            owner[(m, u)] = (i, n, d)
    order = {u: k for k, u in enumerate(utterances["utterance_id"])}
    errors = [e for e in (src.errors() for src in sources) if e is not None and len(e)]
    err = (pd.concat(errors, ignore_index=True) if errors
           else pd.DataFrame({c: pd.Series(dtype=object) for c in ERROR_COLUMNS}))
    if len(err):
        keep = [(m, u) not in owner for u, m in zip(err["utterance_id"], err["modality"])]
        err = err[keep].drop_duplicates(subset=["utterance_id", "modality"], keep="last")
        rank = [(order.get(u, len(order)), MODALITIES.index(m) if m in MODALITIES else len(MODALITIES))
                for u, m in zip(err["utterance_id"], err["modality"])]
        err = err.iloc[sorted(range(len(err)), key=rank.__getitem__)]
    err = err.reset_index(drop=True).astype(str)
    if required is not None:
        errored = set(zip(err["utterance_id"], err["modality"]))
        lacking = [(u, m) for u, m in required if (m, u) not in owner and (u, m) not in errored]
        if lacking:
            first = ", ".join(f"{u} ({m})" for u, m in lacking[:5])
            raise StoreError(out, f"not written: {len(lacking)} utterance/modality pairs have neither features nor "
                             f"a recorded error (first: {first}{', ...' if len(lacking) > 5 else ''}); run the same "
                             "command again: what is finished is kept and the rest is extracted")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        with _new_h5(tmp, out) as (f, guard):
            _init_store_file(f, dtype)
            for k, v in (extra_attrs or {}).items():
                f.attrs[k] = v
            _write_table(f.create_group("utterances"), utterances.reset_index(drop=True))
            for m in MODALITIES:
                if m not in provenance:
                    continue
                f["provenance"].attrs[m] = json.dumps(provenance[m], sort_keys=True)
                keys = sorted(((u, n, d, i) for (mm, u), (i, n, d) in owner.items() if mm == m),
                              key=lambda x: order.get(x[0], len(order)))
                dims = {d for _, _, d, _ in keys}
                dim = int(provenance[m].get("dim", next(iter(dims), 0)))
                if dims - {dim}:
                    raise StoreError(out, f"{m} matrices of widths {sorted(dims)}; provenance says {dim}")
                src_of = {u: i for u, _, _, i in keys}
                # small modalities (text): each source's block read once, whole (bounded memory)
                held = sum(src.block_bytes(m) for src in sources) <= WHOLE_BLOCK_READ_BYTES
                try:
                    if held:
                        for src in sources:
                            src.hold(m)
                    _write_modality(f, m, dim, dtype, [(u, n) for u, n, _, _ in keys],
                                    lambda u, m=m: sources[src_of[u]].read(m, u), check=guard.check)
                finally:
                    for src in sources:
                        src.release(m)
            _write_table(f.create_group("errors"), err)
            f.attrs["complete"] = True
        durable_replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------
# writing


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
    propagates into) in the usual case; the reason is worked out only when one fails."""
    if arr.size == 0:
        return None
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


def _canonical_table(df: pd.DataFrame) -> list:
    """A table's columns and cells in a form that compares equal when it would be stored
    the same (numbers as floats, blank text cells as "")."""
    cols = []
    for c in df.columns:
        x = df[c]
        num = _as_numbers(x)
        cols.append((c, [None if v != v else v for v in num.tolist()] if num is not None  # NaN != NaN
                     else x.fillna("").astype(str).tolist()))
    return cols


def _updated_table(base: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``base``'s utterance table with the rows of ``new`` in place of its own, in ``base``'s
    order; when ``new`` adds utterances, the union in ``utterance_order`` (as one run of the
    whole table would write it)."""
    ids = set(new["utterance_id"])
    if not ids & set(base["utterance_id"]):
        return base
    both = pd.concat([base[~base["utterance_id"].isin(ids)], new], ignore_index=True)
    if ids - set(base["utterance_id"]):
        return utterance_order(both)
    rank = {u: i for i, u in enumerate(base["utterance_id"])}
    return both.iloc[sorted(range(len(both)), key=lambda i: rank.get(both["utterance_id"].iat[i], len(rank)))
                     ].reset_index(drop=True)


def _commit_timer(ref: "weakref.ref[StoreWriter]", stop: threading.Event, interval: float) -> None:
    """A writer's commit timer. It holds the writer weakly: a writer dropped without
    ``close`` is collected (releasing its lock), and the timer ends. A failed commit is
    kept for the writer's next call, its traceback's frames cleared so that it holds no
    reference back to the writer."""
    while not stop.wait(interval):
        writer = ref()
        if writer is None:
            return
        try:
            writer._commit_if_overdue()
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)
            with writer._mutex:
                writer._late_error = e
        del writer


def _chunk_job(ref: "weakref.ref[StoreWriter]", buffer: list) -> None:
    """A background commit: ``_write_chunk`` of the writer, which the job holds strongly only
    while it runs; a failure's traceback frames are cleared (no reference cycle through the
    pending future keeps a dropped writer, and its lock, alive)."""
    writer = ref()
    if writer is None:
        raise StoreError(Path("?"), "the writer was dropped before its chunk was committed")
    try:
        writer._write_chunk(buffer)
    except BaseException as e:
        del writer
        traceback.clear_frames(e.__traceback__)
        raise


def _same_state(recorded: Mapping[str, Any] | None, state: Mapping[str, Any]) -> bool:
    """Whether an unfinished extraction's recorded settings are this job's: equal, but
    where a model was loaded from does not count when its weights are the same."""
    if recorded is None:
        return False
    if {k: v for k, v in recorded.items() if k != "provenance"} != {k: v for k, v in state.items() if k != "provenance"}:
        return False
    a, b = recorded.get("provenance") or {}, state.get("provenance") or {}
    return set(a) == set(b) and all(not provenance_differences(a[m], b[m]) for m in a)


class StoreWriter:
    """Writes a store, resumably.

    Finished ``(utterance, modality)`` pairs are buffered and committed into
    ``<out>.parts/chunk-NNNNNN.h5`` (temporary name, fsync, then rename) when the buffer holds
    ``chunk_size`` additions or ``chunk_bytes`` of features, or at the first addition after
    its oldest one has waited ``commit_seconds`` (``None``: no time limit), whichever comes
    first; with ``commit_timer`` (the default) a thread also commits a buffer whose oldest
    addition is overdue when no new result arrives (slow, bursty extractors). A finished
    utterance is thus on disk about ``commit_seconds`` after it was added, and fast
    extractors (text) write few, large chunks. A failed timer or background commit keeps
    its utterances in the buffer; the next ``add``/``flush``/``finalize`` retries it and
    raises if it fails again. A failed ``finalize`` in a ``with`` block closes the writer,
    keeping what it could commit. With ``background`` (the default) a full buffer is committed by one
    worker thread while the caller goes on computing, at most one chunk at a time; a
    failed commit is raised by the next ``add``/``flush``/``finalize`` and its utterances go
    back into the buffer; ``flush`` returns only when everything added is on disk. A rerun
    with the same output and provenance picks up the committed chunks and an existing
    complete store at ``out`` (whose contents are kept), so ``done()`` tells the caller what
    to skip. ``finalize`` checks that every (utterance, modality) of this job has features
    or a recorded error (``StoreError`` otherwise, and nothing is written), writes the
    complete store atomically and removes the parts folder. Nothing exists at ``out`` that is
    not complete.

    A writer holds an exclusive lock on ``out`` (``<out>.parts/lock``; taken at its creation,
    or earlier with ``lock_output`` and passed as ``lock``) until ``finalize`` or ``close``; a second writer on the same output is refused with
    ``StoreError`` naming the holder's pid. Under the lock a new writer removes what dead runs
    left behind: half-written chunks and the temporary ``<out>.tmp-<pid>`` of a run killed
    while it assembled the store.

    ``media`` (modality -> table columns its features are computed from, e.g. speech:
    ``wav_path, start, end``) lets a rerun take a rebuilt manifest: the provenance may then
    name another manifest file (``manifest_sha256``) as long as the utterance ids and every
    other setting are the same, and the pairs whose media columns changed (a wav that was
    missing and is now there, a corrected transcript) are computed again, their earlier
    features or errors (in the existing store or in committed chunks) set aside; the rest is
    kept. The stored table is the new one. Without ``media`` the manifest must be the same.
    """

    def __init__(self, out_path: str | os.PathLike, utterances: pd.DataFrame,
                 provenance: Mapping[str, dict], chunk_size: int = CHUNK_SIZE, dtype: str = "float16",
                 extra_attrs: Mapping[str, Any] | None = None, background: bool = True,
                 media: Mapping[str, Sequence[str]] | None = None, chunk_bytes: int = CHUNK_BYTES,
                 commit_seconds: float | None = COMMIT_SECONDS, lock: "_OutputLock | None" = None,
                 commit_timer: bool = True):
        self.out = Path(out_path)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.chunk_size = int(chunk_size)
        self.chunk_bytes = int(chunk_bytes)
        self.commit_seconds = None if commit_seconds is None else float(commit_seconds)
        if self.chunk_size < 1 or self.chunk_bytes < 1 or (self.commit_seconds is not None and not self.commit_seconds > 0):
            raise StoreError(self.out, f"commit policy chunk_size {chunk_size}, chunk_bytes {chunk_bytes}, "
                             f"commit_seconds {commit_seconds}: each must be positive")
        self.dtype = np.dtype(dtype).name
        self.extra_attrs = dict(extra_attrs or {})
        missing = [c for c in REQUIRED_COLUMNS if c not in utterances.columns]
        if missing:
            raise StoreError(self.out, f"utterance table lacks columns {missing}")
        if utterances["utterance_id"].duplicated().any():
            dup = utterances["utterance_id"][utterances["utterance_id"].duplicated()].iloc[0]
            raise StoreError(self.out, f"utterance table has duplicate id {dup!r}")
        self.utterances = utterances.reset_index(drop=True)
        stamp = {"library_versions": library_versions(), "cm_arr_version": project_version(),
                 "created": _now(), "host": platform.node()}
        self.provenance = {m: {**stamp, **dict(p)} for m, p in provenance.items()}
        for m in self.provenance:
            if m not in MODALITIES:
                raise StoreError(self.out, f"unknown modality {m!r} (expected one of {MODALITIES})")
        self._mutex = threading.RLock()  # the buffer is shared with the commit timer
        self._late_error: BaseException | None = None  # a failed timer commit, raised at the next call
        self._buffer: list[tuple[str, str, np.ndarray | None, dict, str | None]] = []
        self._buffer_bytes = 0
        self._buffer_since = 0.0  # time.monotonic() of the buffer's oldest addition
        self._done: set[tuple[str, str]] = set()
        self._retry: set[tuple[str, str]] = set()  # recorded errors of earlier runs: tried again
        self._dims: dict[str, int] = {m: int(p["dim"]) for m, p in self.provenance.items() if "dim" in p}
        self._base: Path | None = None
        self._meta_keys: dict[str, frozenset[str]] = {}
        self._requested = tuple(self.provenance)  # the modalities this job must cover
        self._media_all = {m: tuple(c) for m, c in (media or {}).items()}
        self._media = {m: c for m, c in self._media_all.items() if m in self.provenance}
        self._fingerprints = media_fingerprints(self.utterances, self._media) if media is not None else None
        # (modality, utterance) -> the first chunk number whose entries of the pair are current
        # (earlier chunks, and an existing store, hold results of media that changed since)
        self._stale: dict[tuple[str, str], int] = {}
        self._next_chunk = 0
        self._pending: Future | None = None
        self._inflight: list[tuple[str, str, np.ndarray | None, dict, str | None]] = []  # what _pending writes
        self._pool: ThreadPoolExecutor | None = None
        if lock is not None and not (lock.held and lock.parts == self.parts):
            raise StoreError(self.out, "the lock given is not a held lock on this output")
        self._lock = lock if lock is not None else _OutputLock(self.out, self.parts)
        try:
            self._resume()
        except BaseException:
            self._lock.release(remove_folder=self._lock.created)  # a folder made just now holds nothing
            raise
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cmarr-store") if background else None
        self._stop_timer = threading.Event()
        self._timer: threading.Thread | None = None
        if commit_timer and self.commit_seconds is not None:
            self._timer = threading.Thread(target=_commit_timer, name="cmarr-store-timer", daemon=True,
                                           args=(weakref.ref(self), self._stop_timer, min(self.commit_seconds, 1.0)))
            self._timer.start()

    # -- resume ----------------------------------------------------------------------
    def _comparable(self, prov: Mapping[str, Any]) -> dict[str, Any]:
        """Provenance as compared on resume: with ``media``, the manifest file may differ."""
        p = comparable_provenance(prov)
        if self._fingerprints is not None:
            p.pop("manifest_sha256", None)
        return p

    def _state(self) -> dict:
        return {"provenance": {m: self._comparable(p) for m, p in self.provenance.items()},
                "dtype": self.dtype,
                "utterance_ids_sha256": hashlib.sha256("\n".join(self.utterances["utterance_id"]).encode()).hexdigest()}

    def _check_other_media(self, store: "FeatureStore") -> None:
        """Refuse a new table that changes the media of a modality the existing store holds
        and this job does not extract: the stored table would then describe media its
        features were not made from."""
        if self._fingerprints is None or not self._media_all:
            return
        others = {m: c for m, c in self._media_all.items() if m in store.modalities and m not in self._media}
        if not others:
            return
        new = media_fingerprints(self.utterances, others)
        if any(c not in store.utterances.columns for cols in others.values() for c in cols):
            return  # a table without these columns: nothing to compare
        old = media_fingerprints(store.utterances, others)
        for m in others:
            changed = sorted(u for (mm, u), fp in new.items() if mm == m and old.get((mm, u)) != fp)
            if changed:
                raise StoreError(self.out, f"the manifest changes the {m} media of {len(changed)} utterances "
                                 f"(first: {changed[0]!r}), but this job does not extract {m}; add {m} to "
                                 "--modalities so that they are computed again, or use the earlier manifest")

    def _changed_media(self, table: pd.DataFrame, recorded: Mapping[str, str] | None = None) -> set[tuple[str, str]]:
        """This job's pairs whose media columns differ from ``table``'s (or from ``recorded``
        fingerprints, keyed ``"modality\tutterance"``)."""
        if self._fingerprints is None:
            return set()
        if recorded is None:
            if any(c not in table.columns for cols in self._media.values() for c in cols):
                return {pair for pair in self._fingerprints}  # cannot tell: compute again
            old = media_fingerprints(table, self._media)
        else:
            old = {tuple(k.split("\t", 1)): v for k, v in recorded.items()}
        known = set(table["utterance_id"]) if recorded is None else {u for _, u in old}
        return {pair for pair, fp in self._fingerprints.items() if pair[1] in known and old.get(pair) != fp}

    def _resume(self) -> None:
        state = self._state()
        base_stale: set[tuple[str, str]] = set()
        base_done: set[tuple[str, str]] = set()
        base_errors: set[tuple[str, str]] = set()
        if self.out.exists():
            store = FeatureStore(self.out)  # raises StoreError for anything unreadable
            for m, p in store.provenance.items():
                if m in self.provenance:
                    # the finished store records the width it found; a job that did not declare one compares equal
                    mine = {**self.provenance[m], "dim": self.provenance[m].get("dim", p.get("dim"))}
                    diff = provenance_differences(self._comparable(p), self._comparable(mine))
                    if diff:
                        raise StoreError(self.out, f"exists with {m} features made differently ({'; '.join(diff[:3])}); "
                                         "write to another --out or remove it")
            if store.dtype != self.dtype:
                raise StoreError(self.out, f"exists with dtype {store.dtype}, this job writes {self.dtype}")
            mine, theirs = set(self.utterances["utterance_id"]), set(store.utterances["utterance_id"])
            lacking = sorted(theirs - mine)
            if lacking:  # kept, they would stay in a store whose provenance names this manifest
                raise StoreError(self.out, f"holds {len(lacking)} utterances this job's table lacks (first: "
                                 f"{lacking[0]!r}); a store follows its manifest and nothing is dropped silently: "
                                 "use the manifest the store was made from, or write to another --out")
            added = sorted(mine - theirs)
            others = [m for m in store.modalities if m not in self.provenance]
            if added and others:  # the new utterances would have neither features nor errors there
                raise StoreError(self.out, f"this job's table adds {len(added)} utterances (first: {added[0]!r}), "
                                 f"but does not extract {', '.join(others)}, which the store holds: add "
                                 f"{', '.join(others)} to --modalities so that the store stays complete")
            try:  # its frames are copied into the new store under a new checksum: they must be sound
                store.verify()
            except StoreError as e:
                raise StoreError(self.out, f"{e.problem}; this job would carry them into the new store: "
                                 "write to another --out, or remove it and extract again") from None
            self._base = self.out
            base_stale = self._changed_media(store.utterances)
            self._check_other_media(store)
            for m in store.modalities:
                base_done |= {(u, m) for u in store.ids(m)}
                self._dims.setdefault(m, store.dims[m])
            base_errors = set(zip(store.errors["utterance_id"], store.errors["modality"]))
            for m, p in store.provenance.items():
                self.provenance.setdefault(m, p)
            store.close()
        self._stale = {pair: 0 for pair in base_stale}
        # the parts folder exists (it holds the lock); everything in it is ours or a dead run's
        chunks = sorted(self.parts.glob("chunk-*.h5"))
        for chunk in chunks:
            number = chunk.name[len("chunk-"):-len(".h5")]
            if number.isdigit():
                self._next_chunk = max(self._next_chunk, int(number) + 1)
        state_file = self.parts / "state.json"
        recorded = None
        if state_file.exists():
            try:
                recorded = json.loads(state_file.read_text())
            except (OSError, ValueError) as e:
                if chunks:
                    why = e.strerror if isinstance(e, OSError) else "empty or damaged"
                    raise StoreError(state_file, f"cannot be read ({why}), so the settings of the unfinished "
                                     f"extraction in {self.parts} are unknown; if it was started by this same "
                                     "command, remove this file and run it again to resume; otherwise remove "
                                     "the folder to start over") from None
                recorded = None  # nothing committed yet: nothing to keep apart
            settings = {k: (recorded or {}).get(k) for k in state}
            if recorded is not None and "media" not in recorded and self._fingerprints is not None:
                # written without media fingerprints: only the very same manifest can resume
                settings["provenance"] = {m: {k: v for k, v in p.items() if k != "manifest_sha256"}
                                          for m, p in (settings["provenance"] or {}).items()}
                same_manifest = all(p.get("manifest_sha256") == self.provenance.get(m, {}).get("manifest_sha256")
                                    for m, p in (recorded.get("provenance") or {}).items())
                if not same_manifest:
                    settings = None
            if recorded is not None and not _same_state(settings, state):
                raise StoreError(self.parts, "holds an unfinished extraction made with other settings or another "
                                 "manifest; remove the folder or write to another --out")
        if recorded is not None:
            for m_u, first in (recorded.get("stale") or {}).items():  # kept by every later run
                pair = tuple(m_u.split("\t", 1))
                self._stale[pair] = max(self._stale.get(pair, 0), int(first))
            if self._fingerprints is not None and "media" in recorded:
                for pair in self._changed_media(self.utterances, recorded["media"]):
                    self._stale[pair] = self._next_chunk  # every chunk so far holds the old media's result
        # the existing store's results count, less the pairs set aside (their copy there is
        # hidden at assembly); the committed chunks below add what is current
        stale_pairs = {(u, m) for m, u in self._stale}
        self._done |= base_done - stale_pairs
        self._retry |= base_errors - base_done - stale_pairs
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()  # a file that was being written when a run died
        self._remove_dead_leftovers()
        for chunk in chunks:
            try:
                src = self._chunk_source(chunk)
                self._done |= {(u, m) for m, u, _, _ in src.keys()}
                errs = src.errors()
                if errs is not None:
                    self._retry |= set(zip(errs["utterance_id"], errs["modality"]))
                src.close()
            except (OSError, KeyError) as e:
                raise StoreError(chunk, f"committed chunk cannot be read ({e}); remove it to recompute its utterances") from None
        self._retry -= self._done
        saved = dict(state)
        if self._fingerprints is not None:
            saved["media"] = {f"{m}\t{u}": fp for (m, u), fp in self._fingerprints.items()}
        if self._stale:
            saved["stale"] = {f"{m}\t{u}": n for (m, u), n in self._stale.items()}
        _write_json_atomic(state_file, saved)

    def _chunk_source(self, chunk: Path):
        """A committed chunk as a source, without its pairs whose media changed after it."""
        src = _ChunkSource(chunk)
        number = chunk.name[len("chunk-"):-len(".h5")]
        n = int(number) if number.isdigit() else -1
        hidden = {pair for pair, first in self._stale.items() if n < first}
        return _Without(src, hidden) if hidden else src

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
                if int(pid) == os.getpid() or not _pid_alive(int(pid)):
                    p.unlink(missing_ok=True)

    # -- API -------------------------------------------------------------------------
    def done(self) -> set[tuple[str, str]]:
        """The (utterance, modality) pairs whose features are stored. Pairs recorded as
        errors by an earlier run are not done: a rerun tries them again (the media may have
        been fixed), and the newest outcome is kept."""
        return set(self._done)

    def changed(self) -> set[tuple[str, str]]:
        """Pairs whose earlier result was set aside because their media columns changed (see
        ``media``) and that are not computed again yet."""
        return {(u, m) for m, u in self._stale} - self._done

    def retried(self) -> set[tuple[str, str]]:
        """Pairs an earlier run recorded as errors and this run tries again."""
        return set(self._retry)

    def add(self, utterance_id: str, modality: str, matrix: np.ndarray, **meta: Any) -> bool:
        """Queue one utterance's ``(T, D)`` matrix. Returns False (and records an error
        for the utterance) when the matrix is not storable: non-finite values, or values
        that overflow the store dtype. A call that raises (e.g. a failed commit, retried
        here) has not queued its matrix."""
        with self._mutex:
            self._retry_failed_commit()
            return self._add(utterance_id, modality, matrix, meta)

    def _add(self, utterance_id: str, modality: str, matrix: np.ndarray, meta: dict[str, Any]) -> bool:
        if modality not in self.provenance:
            raise StoreError(self.out, f"no provenance was given for modality {modality!r}")
        arr = np.asarray(matrix)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError(f"{utterance_id} ({modality}): expected a non-empty (T, D) matrix, got shape {arr.shape}")
        dim = self._dims.setdefault(modality, arr.shape[1])
        if arr.shape[1] != dim:
            raise ValueError(f"{utterance_id} ({modality}): width {arr.shape[1]}, the store's {modality} width is {dim}")
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
        with self._mutex:
            self._retry_failed_commit()
            self._append((utterance_id, modality, None, {}, str(reason)), 0)

    def _retry_failed_commit(self) -> None:
        """After a failed timer commit, or a failed background commit that has finished (its
        utterances are back in the buffer), commit the buffer again now; raise if that fails
        too (the utterances stay buffered). A transient failure thus costs nothing."""
        pending = self._pending
        failed = pending is not None and pending.done() and pending.exception() is not None
        if self._late_error is None and not failed:
            return
        self._late_error = None
        if failed:
            try:
                self._wait()  # puts the chunk's utterances back into the buffer
            except Exception:
                pass  # retried just below
        self._commit_buffer()
        self._wait()

    def _commit_if_overdue(self) -> None:
        """The commit timer's work: commit the buffer once its oldest addition has waited
        ``commit_seconds``. Raises what the commit raised (its utterances back in the buffer)."""
        with self._mutex:
            if (self._late_error is not None or not self._buffer or not self._lock.held
                    or time.monotonic() - self._buffer_since < self.commit_seconds):
                return
            self._commit_buffer()

    def _append(self, item: tuple[str, str, np.ndarray | None, dict, str | None], nbytes: int) -> None:
        """Buffer ``item`` and commit the buffer when the commit policy says so."""
        now = time.monotonic()
        if not self._buffer:
            self._buffer_since = now
        self._buffer.append(item)
        self._buffer_bytes += nbytes
        if (len(self._buffer) >= self.chunk_size or self._buffer_bytes >= self.chunk_bytes
                or (self.commit_seconds is not None and now - self._buffer_since >= self.commit_seconds)):
            self._commit_buffer()

    def flush(self) -> None:
        """Commit everything added so far; returns when it is on disk."""
        with self._mutex:
            self._retry_failed_commit()
            self._commit_buffer()
            self._settle()

    def _settle(self) -> None:
        """Wait for the chunk being committed in the background. If it failed, its
        utterances (back in the buffer) are committed again now with whatever is buffered,
        and only a second failure is raised: the same rule whether the failure is found
        here or by ``_retry_failed_commit``, so that what a call does does not depend on
        whether the background write has finished yet."""
        try:
            self._wait()
        except Exception:
            self._commit_buffer()  # nothing in flight now
            self._wait()

    def _wait(self) -> None:
        """Wait for the chunk being committed in the background and raise its error; what it
        held then goes back into the buffer, so that nothing added is lost."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except BaseException:
            self._restore(self._inflight)
            raise
        finally:
            self._inflight = []

    def _restore(self, items: list[tuple[str, str, np.ndarray | None, dict, str | None]]) -> None:
        """Put the items of a failed commit back in front of the buffer."""
        if not self._buffer:
            self._buffer_since = time.monotonic()
        self._buffer[:0] = items
        self._buffer_bytes = sum(a.nbytes for _, _, a, _, _ in self._buffer if a is not None)

    def _commit_buffer(self) -> None:
        if not self._buffer:
            return
        self._settle()  # one chunk in flight at most
        if not self._buffer:  # the retry of a failed one took it
            return
        buffer, self._buffer = self._buffer, []
        self._buffer_bytes = 0
        if self._pool is None:
            try:
                self._write_chunk(buffer)
            except BaseException:
                self._restore(buffer)  # not on disk: kept for the next flush
                raise
        else:
            try:
                pending = self._pool.submit(_chunk_job, weakref.ref(self), buffer)
            except BaseException:  # e.g. the pool was shut down: nothing is in flight
                self._restore(buffer)
                raise
            self._inflight, self._pending = buffer, pending

    def _write_chunk(self, buffer: list[tuple[str, str, np.ndarray | None, dict, str | None]]) -> None:
        """One chunk file (layout 2: each modality's frames concatenated, as in a store),
        written under a temporary name and renamed into place after an fsync."""
        if not self._lock.held:
            raise StoreError(self.out, "the writer is closed; nothing more can be committed")
        # numbers are taken only by the holder of the lock, one chunk at a time: no two runs
        # or commits share a name, and no committed chunk is ever replaced
        final = self.parts / f"chunk-{self._next_chunk:06d}.h5"
        while final.exists():
            self._next_chunk += 1
            final = self.parts / f"chunk-{self._next_chunk:06d}.h5"
        self._next_chunk += 1
        tmp = final.with_name(final.name + ".tmp")
        errors = []
        feats: dict[str, dict[str, tuple[np.ndarray, dict]]] = {}
        for utt, m, arr, meta, err in buffer:
            if err is not None:
                errors.append((utt, m, err))
            else:
                feats.setdefault(m, {})[utt] = (arr, meta)  # the newest result of a pair wins
        try:
            with _new_h5(tmp, final) as (f, _):  # a failed write: OSError naming the chunk, HDF5 left sound
                f.attrs["chunk_format"] = 2
                fg = f.create_group("features")
                for m, items in feats.items():
                    g = fg.create_group(m)
                    block = np.concatenate([a for a, _ in items.values()])
                    # CRC-32 (3-4 GB/s here, over twice sha256's speed): a chunk damaged before
                    # assembly must not enter the store under the store's fresh sha256
                    g.create_dataset("data", data=block).attrs["crc32"] = zlib.crc32(memoryview(block).cast("B"))
                    g.create_dataset("ids", data=np.array(list(items), dtype=object), dtype=h5py.string_dtype())
                    g.create_dataset("lengths", data=np.array([a.shape[0] for a, _ in items.values()], dtype=np.int64))
                    _write_meta_group(g.create_group("meta"), m, [meta for _, meta in items.values()])
                if errors:
                    _write_table(f.create_group("errors"), pd.DataFrame(errors, columns=list(ERROR_COLUMNS)))
            durable_replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)  # present only when the commit failed

    def finalize(self) -> Path:
        """Write the complete store at ``out`` (atomically), remove the parts folder and
        release the lock. Raises ``StoreError`` (writing nothing, keeping the parts folder for
        a rerun, releasing the lock) when some (utterance, modality) of this job has neither
        features nor a recorded error."""
        if not self._lock.held:
            raise StoreError(self.out, "the writer is closed; nothing more can be written")
        self.flush()  # a failed commit is raised here, the writer still open: nothing is lost, finalize again
        try:
            self._stop()
            provenance = {m: dict(p) for m, p in self.provenance.items()}
            for m, dim in self._dims.items():
                provenance[m].setdefault("dim", dim)
            required = [(u, m) for m in self._requested for u in self.utterances["utterance_id"]]
            chunks = sorted(self.parts.glob("chunk-*.h5"))
            if self._base is not None and not chunks and self._unchanged_base(provenance, required):
                self._lock.release(remove_folder=True)  # nothing to add: the store stays as it is, untouched
                return self.out
            sources: list = []
            try:
                utterances = self.utterances
                if self._base is not None:
                    base = _StoreSource(self._base)
                    sources.append(base)
                    utterances = _updated_table(base.store.utterances, self.utterances)  # holds every id (checked in _resume)
                    hidden = {pair for pair, first in self._stale.items() if first >= 0}
                    if hidden:
                        sources[0] = _Without(base, hidden)
                sources += [self._chunk_source(c) for c in chunks]
                if self._base is not None:  # a modality this run computed nothing of keeps its stamp
                    fresh = {m for src in sources[1:] for m, _, _, _ in src.keys()} | {m for m, _ in self._stale}
                    for src in sources[1:]:
                        err = src.errors()
                        fresh |= set(err["modality"]) if err is not None else set()
                    for m, p in base.store.provenance.items():
                        if m not in fresh and m in provenance:
                            provenance[m].update({k: p[k] for k in STAMP_KEYS if k in p})
                _assemble(self.out, utterances, provenance, sources, self.dtype, self.extra_attrs,
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
        nothing to do): same table, dtype, attributes and provenance (its own stamps kept,
        as nothing was computed), and every required pair has features or an error there."""
        store = FeatureStore(self._base)
        try:
            if store.dtype != self.dtype or any(store.attrs.get(k) != v for k, v in self.extra_attrs.items()):
                return False
            if _canonical_table(_updated_table(store.utterances, self.utterances)) != _canonical_table(store.utterances):
                return False
            mine = {m: {**p, **{k: v for k, v in store.provenance.get(m, {}).items() if k in STAMP_KEYS}}
                    for m, p in provenance.items()}
            if json.dumps(mine, sort_keys=True, default=str) != json.dumps(store.provenance, sort_keys=True, default=str):
                return False
            have = {(u, m) for m in store.modalities for u in store.ids(m)}
            have |= set(zip(store.errors["utterance_id"], store.errors["modality"]))
            return all(pair in have for pair in required)
        finally:
            store.close()

    def _abandon(self) -> None:
        """After a failed ``finalize``: keep what can be kept, then close (a rerun resumes)."""
        try:
            if self._lock.held:
                self.flush()
        except Exception:
            pass  # finalize's own error is the one to report
        finally:
            self.close()

    def _stop(self) -> None:
        """Stop the commit timer, wait for a background commit and stop the worker thread."""
        self._stop_timer.set()
        try:
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.join()
            with self._mutex:
                self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()

    def close(self) -> None:
        """Wait for a background commit, stop the worker thread and release the lock on the
        output (``flush`` first to keep what is buffered; a later run resumes from it)."""
        try:
            self._stop()
        finally:
            with self._mutex:  # a timer commit under way finishes first; later ones see the lock gone
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:
                self._abandon()
                raise
        else:
            try:
                if self._lock.held:
                    self.flush()  # keep what was finished; a rerun resumes from it
            finally:
                self.close()


# --------------------------------------------------------------------------------------
# merge and validate


def _check_shard_set(stores: list[FeatureStore]) -> None:
    """The shards of one extraction must all be there, each once."""
    tags = [(s, s.attrs.get("shard")) for s in stores]
    tagged = [(s, t) for s, t in tags if t]
    if not tagged:
        return  # stores that are not shards of one job (e.g. stores of one manifest made by hand, or merged stores)
    s0, t0 = tagged[0]
    for s, t in tags:
        if not t:
            raise StoreError(s.path, f"is not a shard of an extraction, while {s0.path.name} is shard {t0}; "
                             "merge the shards of one job first")
    n = {int(str(t).split("/")[1]) for _, t in tagged}
    if len(n) > 1:
        raise StoreError(s0.path, f"shards of different splits are mixed ({', '.join(sorted({str(t) for _, t in tagged}))})")
    total = n.pop()
    seen: dict[int, Path] = {}
    for s, t in tagged:
        k = int(str(t).split("/")[0])
        if k in seen:
            raise StoreError(s.path, f"is shard {t}, as is {seen[k].name}")
        seen[k] = s.path
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise StoreError(s0.path, f"shard(s) {', '.join(f'{k}/{total}' for k in missing)} of this extraction are not "
                         f"given; the merged store would lack their utterances (merge all {total})")


def merge_stores(shard_paths: Iterable[str | os.PathLike], out_path: str | os.PathLike,
                 allow_library_mismatch: bool = False) -> Path:
    """Join shard stores into one. Refuses shards of another schema, shards whose
    provenance differs (other models or settings, another corpus or manifest), shards that
    share an utterance id, shards whose frames fail their checksums, and, for the shards of
    one extraction (``shard`` attribute ``"k/N"``, written by ``cm-arr-extract features
    --shard``), a set that lacks any of the N. Never overwrites an existing file.

    Shards made on other machines may have loaded the same weights from other folders (equal
    weights sha256): accepted. The merged store's provenance is the first shard's; what the
    others recorded differently (those folders; with ``allow_library_mismatch``, their
    library versions) is kept in the ``shard_provenance`` attribute, per shard file."""
    paths = [Path(p) for p in shard_paths]
    out = Path(out_path)
    if not paths:
        raise StoreError(out, "no shards to merge")
    if out.exists():
        raise StoreError(out, "already exists; merge never overwrites a file (choose another --out or remove it)")
    if not out.parent.is_dir():
        raise StoreError(out, f"its folder {out.parent} does not exist")
    given: dict[Path, Path] = {}
    for p in paths:
        real = p.resolve()
        if real in given:
            same = "" if given[real] == p else f" (as {given[real]} and as {p})"
            raise StoreError(p, f"the same shard is given twice{same}")
        given[real] = p
    stores = [FeatureStore(p) for p in paths]
    first = stores[0]
    _check_shard_set(stores)
    for s in stores[1:]:
        if s.dtype != first.dtype:
            raise StoreError(s.path, f"dtype {s.dtype} differs from {first.path.name}'s {first.dtype}")
        if set(s.provenance) != set(first.provenance):
            raise StoreError(s.path, f"holds modalities {sorted(s.provenance)}, {first.path.name} holds {sorted(first.provenance)}")
        for m in first.provenance:
            a, b = first.provenance[m], s.provenance[m]
            if allow_library_mismatch:
                a = {k: v for k, v in a.items() if k != "library_versions"}
                b = {k: v for k, v in b.items() if k != "library_versions"}
            diff = provenance_differences(a, b)
            if diff:
                raise StoreError(s.path, f"{m} features were made differently from {first.path.name}'s: {'; '.join(diff[:4])}")
    # what the merged store's provenance (the first shard's) does not say of the others: where
    # their models were loaded from, and (allowed by the caller) their library versions
    by_shard: dict[str, dict[str, dict[str, Any]]] = {}
    for s in stores[1:]:
        for m in first.provenance:
            a, b = comparable_provenance(first.provenance[m]), comparable_provenance(s.provenance[m])
            own = {k: b.get(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            if own:
                by_shard.setdefault(s.path.name, {})[m] = own
    seen: dict[str, Path] = {}
    for s in stores:
        for utt in s.utterances["utterance_id"]:
            if utt in seen:
                raise StoreError(s.path, f"shares utterance id {utt!r} with {seen[utt]} (shards must be disjoint)")
            seen[utt] = s.path
    # the single-process store's order (utterance_order), not shard after shard: the merged
    # store lists utterances, frames and errors as one process writing the whole job would
    table = utterance_order(pd.concat([s.utterances for s in stores], ignore_index=True))
    sources = [_StoreSource(p) for p in paths]
    try:
        attrs = {"merged_from": json.dumps([p.name for p in paths])}
        if by_shard:
            attrs["shard_provenance"] = json.dumps(by_shard, sort_keys=True, default=str)
        _assemble(out, table, first.provenance, sources, first.dtype, extra_attrs=attrs)
    finally:
        for src in sources:
            src.close()
    return out


def _as_numbers(x: pd.Series) -> pd.Series | None:
    """``x`` as floats (blank cells NaN), or None when some non-blank cell is not a number."""
    blank = x.isna() | (x.astype(str).str.strip() == "")
    num = pd.to_numeric(x.where(~blank), errors="coerce")
    return num.astype(float) if bool((num.notna() | blank).all()) else None


def _table_disagreements(table: pd.DataFrame, manifest: pd.DataFrame) -> list[str]:
    """Per column both hold, the utterances whose value in the store's table differs from
    the manifest's (times to 1e-6 s; an empty cell equals a missing one)."""
    m = manifest.assign(utterance_id=manifest["utterance_id"].astype(str)).drop_duplicates("utterance_id")
    m = m.set_index("utterance_id")
    t = table.assign(utterance_id=table["utterance_id"].astype(str)).set_index("utterance_id")
    common = t.index.intersection(m.index)
    out = []
    for col in [c for c in t.columns if c in m.columns]:
        a, b = t.loc[common, col], m.loc[common, col]
        num_a, num_b = _as_numbers(a), _as_numbers(b)
        if num_a is not None and num_b is not None:
            same = ((num_a - num_b).abs() <= 1e-6) | (num_a.isna() & num_b.isna())
        else:
            same = a.fillna("").astype(str) == b.fillna("").astype(str)
        bad = same.index[~same.to_numpy()]
        if len(bad):
            u = bad[0]
            plain = [v.item() if isinstance(v, np.generic) else v for v in (t.at[u, col], m.at[u, col])]
            out.append(f"{len(bad)} utterances' {col} disagree with the manifest (first: {u!r}: store "
                       f"{plain[0]!r}, manifest {plain[1]!r})")
    return out


def validate_store(path: str | os.PathLike, manifest: pd.DataFrame | None = None,
                   manifest_sha256: str | None = None) -> tuple[list[str], list[str]]:
    """Check a store thoroughly. Returns ``(problems, notes)``; problems make it unusable.

    ``manifest``: check coverage against it, and every column the store's utterance table
    shares with it (labels, folds, speakers, times, media paths, ...); a shard store
    (``shard`` attribute ``"k/N"``) is checked against its share of the manifest
    (``select_shard``, as extraction split it), and a note says so. ``manifest_sha256``: the
    manifest file's; a note when the store was extracted from another file. Raises
    ``StoreError`` only when the file cannot be opened as a store at all.
    """
    store = FeatureStore(path)
    problems: list[str] = []
    notes: list[str] = []
    t = store.utterances
    for col in REQUIRED_COLUMNS:
        if col not in t.columns:
            problems.append(f"utterance table lacks column {col!r}")
    ids = set(t["utterance_id"]) if "utterance_id" in t.columns else set()
    if "utterance_id" in t.columns:
        dup = t["utterance_id"][t["utterance_id"].duplicated()]
        if len(dup):
            problems.append(f"utterance table repeats {len(dup)} ids (first: {dup.iloc[0]!r})")
    if "label" in t.columns:
        bad = sorted(set(t["label"]) - set(LABELS))
        if bad:
            problems.append(f"labels outside {LABELS}: {bad}")
    problems += [f"utterance table: {leak}" for leak in fold_leaks(t)]
    for m in store.modalities:
        prov = store.provenance.get(m)
        if prov is None:
            problems.append(f"{m}: features without provenance")
            continue
        for key in ("dim", "cm_arr_version", "library_versions"):
            if key not in prov:
                problems.append(f"{m}: provenance lacks {key!r}")
        named = any(v for k, v in prov.items() if k == "model" or k.endswith("checkpoint_sha256"))
        if not named and prov.get("random_weights") is not True:
            problems.append(f"{m}: provenance names no model or checkpoint (nor says the weights are random)")
        dim = int(prov.get("dim", -1))
        if store.dims[m] != dim:
            problems.append(f"{m}: frames have width {store.dims[m]}, provenance says {dim}")
        _, shape, dtype = store._layout[m]
        if np.dtype(dtype).name != store.dtype:
            problems.append(f"{m}: dtype {np.dtype(dtype).name}, the store's dtype is {store.dtype}")
        strays = store.ids(m) - ids
        if strays:
            problems.append(f"{m}: {len(strays)} feature entries for ids not in the utterance table (first: {sorted(strays)[0]!r})")
        index = store._index[m]
        if len(index) != len(store._order[m]):
            problems.append(f"{m}: repeated ids in the frame index")
        spans = sorted(index.values())
        end = 0
        for off, n in spans:
            if n <= 0 or off < end or off + n > shape[0]:
                problems.append(f"{m}: frame index is inconsistent (offset {off}, length {n}, {shape[0]} rows)")
                break
            end = off + n
        with h5py.File(str(store.path), "r") as f:
            recorded = f["features"][m].attrs.get("data_sha256")
        digest = hashlib.sha256()
        if shape[0]:
            bad_rows = []
            for start, block in store.pieces(m):
                digest.update(memoryview(block).cast("B"))
                rows = np.nonzero(~np.isfinite(block).all(axis=1))[0]
                bad_rows.extend((rows + start).tolist())
            if bad_rows:
                starts = np.array([o for o, _ in spans])
                by_utt: dict[str, int] = {}
                inv = {v: u for u, v in index.items()}
                for r in bad_rows:
                    k = int(np.searchsorted(starts, r, side="right")) - 1
                    u = inv[spans[k]]
                    by_utt[u] = by_utt.get(u, 0) + 1
                for u, k in sorted(by_utt.items())[:20]:
                    problems.append(f"{m}/{u}: {k} frames with NaN/Inf values")
                if len(by_utt) > 20:
                    problems.append(f"{m}: {len(by_utt) - 20} more utterances with NaN/Inf values")
        if recorded is None:
            notes.append(f"{m}: no checksum of the frames recorded (a store from an older version)")
        elif (recorded.decode() if isinstance(recorded, bytes) else str(recorded)) != digest.hexdigest():
            problems.append(f"{m}: the frames do not match the checksum recorded when the file was written "
                            "(damaged or altered since)")
        for u in (sorted(index) if m in ("text", "video") else ()):
            meta = store.meta(u, m)
            n = index[u][1]
            if m == "text" and "tokens" in meta and len(meta["tokens"]) != n:
                problems.append(f"{m}/{u}: {len(meta['tokens'])} tokens for {n} frames")
            if m == "video" and "face_mask" in meta:
                if int(meta["face_mask"].sum()) != n:
                    problems.append(f"{m}/{u}: face_mask marks {int(meta['face_mask'].sum())} face frames, matrix has {n}")
                if "frame_times" in meta and len(meta["frame_times"]) != len(meta["face_mask"]):
                    problems.append(f"{m}/{u}: frame_times and face_mask lengths differ")
        errored = {u for u, mm in zip(store.errors["utterance_id"], store.errors["modality"]) if mm == m}
        unaccounted = ids - store.ids(m) - errored
        if unaccounted:
            problems.append(f"{m}: {len(unaccounted)} utterances have neither features nor a recorded reason (first: {sorted(unaccounted)[0]!r})")
        if errored and ids and errored >= ids:  # a wrong --root, a missing media folder: not a feature store
            first = store.errors[store.errors["modality"] == m]["reason"].iloc[0]
            problems.append(f"{m}: no utterance has features: all {len(ids)} are recorded as errors "
                            f"(first reason: {first})")
        elif errored:
            notes.append(f"{m}: {len(errored)} utterances missing, with reasons recorded "
                         f"({errors_hint(store.path)} lists them)")
    if manifest is not None:
        problems += [f"manifest: {leak}" for leak in fold_leaks(manifest)]
        shard = parse_shard_tag(store.attrs.get("shard"))
        if shard is not None:
            share = select_shard(manifest.assign(utterance_id=manifest["utterance_id"].astype(str)), *shard)
            notes.append(f"the store is shard {shard[0]}/{shard[1]} of an extraction: checked against that shard's "
                         f"share of the manifest ({len(share)} of {len(manifest)} utterances)")
            manifest = share
        mids = set(manifest["utterance_id"].astype(str))
        lacking, extra = mids - ids, ids - mids
        if lacking:
            problems.append(f"{len(lacking)} manifest utterances are not in the store (first: {sorted(lacking)[0]!r})")
        if extra:
            problems.append(f"{len(extra)} store utterances are not in the manifest (first: {sorted(extra)[0]!r})")
        problems += _table_disagreements(t, manifest)
        if manifest_sha256 is not None:
            made_from = sorted({str(p.get("manifest_sha256")) for p in store.provenance.values()
                                if p.get("manifest_sha256")})
            if made_from and manifest_sha256 not in made_from:
                notes.append(f"the store was extracted from another manifest file (sha256 {', '.join(x[:12] for x in made_from)}"
                             f", this one {manifest_sha256[:12]}); its table was compared with this one row by row")
    store.close()
    return problems, notes
