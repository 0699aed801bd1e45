"""Files that are either old or complete, their checksums, and exclusive locks.

Every file the project writes for later use (feature stores, chunks, checkpoints,
manifests, progress records) goes through a temporary name and ``durable_replace``, so that
a crash or a full disk never leaves a half-written file under the real name. ``FileLock``
gives one process at a time the right to write something (a store, a training fold).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cmarr.extract.base import PathError


def durable_replace(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished file ``tmp`` to ``dst`` so that after a crash or power loss ``dst``
    is either the old file or the complete new one: the data reach the disk (fsync) before
    the rename, and the rename itself is flushed with the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the file itself is safe
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that it is either the old or the complete new file.
    A failed write (e.g. a full disk) raises ``OSError`` naming ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, sort_keys=True))
        durable_replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed flush names no file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_csv_atomic(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write ``df`` (no index) to ``out`` through a temporary file in the same folder and a
    rename; the temporary file is removed on failure. The file gets the permissions
    ``open`` would give it (manifests and predictions are shared)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's file is owner-only
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in blocks of ``bufsize``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (someone else's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockBusy(PathError):
    """``FileLock``: another process holds the lock; ``pid`` is what it recorded ("unknown"
    when it recorded nothing readable)."""

    def __init__(self, path: str | os.PathLike, pid: str):
        self.pid = pid
        super().__init__(path, f"is locked by another process (pid {pid})")


class FileLock:
    """The exclusive right to something, held by one process: ``flock`` on the file ``path``
    (its folder is created), taken at once or refused with ``LockBusy``.

    The holder's pid is written into the file, for the message a refused process gets. The
    kernel drops the flock of a process that dies, so a killed holder never blocks the next
    one; its file, left behind, is simply locked again. ``release`` removes the file while
    still holding the lock: a process that opened the file just before may then lock the
    removed file, so after locking each process checks that ``path`` still names the file it
    locked and otherwise tries again on the new one. ``fcntl`` is imported here only, when a
    lock is taken: reading stores needs no POSIX locks.
    """

    def __init__(self, path: str | os.PathLike):
        import fcntl

        self.path = Path(path)
        self._fd: int | None = None
        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise PathError(self.path.parent, f"cannot create the folder ({e.strerror or e})") from None
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a holder that just finished
                continue
            except OSError as e:
                raise PathError(self.path, f"cannot create the lock file ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockBusy(self.path, holder) from None
                raise PathError(self.path, f"cannot be locked ({e.strerror or e}); the folder must be on a file "
                                "system that supports flock") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # locked a file that its holder removed when it released it
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise PathError(self.path, "could not be locked: it keeps being removed by another process")

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
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        """A lock dropped without ``release`` is freed (its file stays, as a killed holder's)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
