"""HDF5 files written so that a failed write or a SIGTERM never breaks the HDF5 library.

``new_h5`` creates a file through ``WriteGuard``: a write that fails (a full disk, the
process's file-size limit) is recorded instead of being raised into HDF5, the file is
closed normally and the failure is then raised as one ``OSError`` naming the file;
``write_failure`` words it for the user.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

import h5py

from cmarr.extract.interrupts import interrupts_held, raise_held

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


class WriteGuard:
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
def new_h5(path: Path, shown: str | os.PathLike | None = None,
           libver: str = "latest") -> Iterator[tuple[h5py.File, WriteGuard]]:
    """Create the HDF5 file ``path`` for writing through a ``WriteGuard``; yields ``(file,
    guard)``. The file is closed on leaving, then a failed write is raised as ``OSError``
    naming ``shown`` (default ``path``), also when it caused the error the body raised
    (HDF5 reading back what was never written). A SIGTERM meanwhile is raised at the end
    (``interrupts_held``). The caller removes the file on failure. ``libver``: h5py's format
    bounds ("earliest": files that old HDF5 releases read)."""
    with interrupts_held():
        guard = WriteGuard(path, shown)
        try:
            f = h5py.File(guard, "w", libver=libver)
        except BaseException:
            guard.close()
            raise
        try:
            yield f, guard
        except Exception:
            close_h5(f, guard)
            if guard.error is not None:
                guard.check()  # the first cause
            raise
        except BaseException:
            close_h5(f, guard)
            raise
        close_h5(f, guard)
        guard.check()


def close_h5(f: h5py.File, guard: WriteGuard) -> None:
    try:
        f.close()
    finally:
        guard.close()
