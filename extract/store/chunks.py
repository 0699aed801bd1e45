"""Chunk files: the finished utterances a writer has committed, in ``<out>.parts/``.

A chunk holds, per modality, the frames of its utterances concatenated as in a store
(``features/<modality>/data``, ``ids``, ``lengths``, ``meta``; ``data`` carries the CRC-32 of
its bytes) and the errors recorded meanwhile (``errors``). Each is written under a temporary
name, fsynced and renamed (``write_chunk``), so a chunk on disk is always whole; when the
store is assembled its frames are checked against their CRC (``ChunkSource``).
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from cmarr.extract.files import durable_replace
from cmarr.extract.store.format import (
    CHUNK_FORMAT,
    ERROR_COLUMNS,
    StoreError,
    read_meta,
    read_table,
    write_meta,
    write_table,
)
from cmarr.extract.store.h5io import new_h5

#: One buffered result: ``(utterance id, modality, frames or None, meta, error reason or None)``.
Pending = tuple[str, str, "np.ndarray | None", dict, "str | None"]


def write_chunk(final: Path, items: Sequence[Pending]) -> None:
    """Write ``items`` as the chunk file ``final`` (temporary name, fsync, rename). Of several
    results of one (utterance, modality), the last is kept. A failed write raises
    ``OSError`` naming ``final`` and leaves no file."""
    tmp = final.with_name(final.name + ".tmp")
    errors = []
    feats: dict[str, dict[str, tuple[np.ndarray, dict]]] = {}
    for utt, m, arr, meta, err in items:
        if err is not None:
            errors.append((utt, m, err))
        else:
            feats.setdefault(m, {})[utt] = (arr, meta)
    try:
        with new_h5(tmp, final) as (f, _):
            f.attrs["chunk_format"] = CHUNK_FORMAT
            fg = f.create_group("features")
            for m, done in feats.items():
                g = fg.create_group(m)
                block = np.concatenate([a for a, _ in done.values()])
                # CRC-32 (3-4 GB/s, over twice sha256's speed): a chunk damaged before assembly
                # must not enter the store under the store's fresh sha256
                g.create_dataset("data", data=block).attrs["crc32"] = zlib.crc32(memoryview(block).cast("B"))
                g.create_dataset("ids", data=np.array(list(done), dtype=object), dtype=h5py.string_dtype())
                g.create_dataset("lengths", data=np.array([a.shape[0] for a, _ in done.values()], dtype=np.int64))
                write_meta(g.create_group("meta"), m, [meta for _, meta in done.values()])
            if errors:
                write_table(f.create_group("errors"), pd.DataFrame(errors, columns=list(ERROR_COLUMNS)))
        durable_replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # present only when the commit failed


class ChunkSource:
    """A committed chunk file as a source of finished utterances for ``assemble``.

    Its index and meta are read when it is opened, frames straight from the file when asked
    for (the file is not held open, so that a corpus' hundreds of chunks need no file handle
    each). A modality's block is checked against its CRC-32 on its first read. ``hold``
    keeps a modality's whole block in memory from its first read until ``release`` (small
    modalities: one read per chunk instead of one per utterance)."""

    def __init__(self, path: Path):
        self.path = path
        self._index: dict[str, dict[str, tuple[int, int, int]]] = {}  # m -> utt -> (row, offset, frames)
        self._data: dict[str, tuple[int | None, int, np.dtype]] = {}  # m -> (file offset of data, dim, dtype)
        self._metas: dict[str, list[dict[str, Any]]] = {}
        self._rows: dict[str, int] = {}  # m -> frames in the chunk
        self._crc: dict[str, int] = {}  # m -> CRC-32 of the block as written
        self._held: dict[str, np.ndarray | None] = {}  # m -> the whole block, read on first use
        self._checked: set[str] = set()  # modalities whose block matched its CRC
        with h5py.File(str(path), "r") as f:
            version = int(f.attrs.get("chunk_format", -1))
            if version != CHUNK_FORMAT:
                raise StoreError(path, f"a chunk of format version {version}, not this cm-arr's {CHUNK_FORMAT}: "
                                 f"remove the folder {path.parent} and extract again")
            for m, g in f["features"].items():
                ids = list(g["ids"].asstr()[()])
                lengths = g["lengths"][()]
                offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
                self._index[m] = {u: (i, int(o), int(n)) for i, (u, o, n) in enumerate(zip(ids, offsets, lengths))}
                data = g["data"]
                plain = data.chunks is None and data.compression is None and data.shape[0] > 0
                self._data[m] = (data.id.get_offset() if plain else None, int(data.shape[1]), data.dtype)
                self._rows[m] = int(data.shape[0])
                self._crc[m] = int(data.attrs["crc32"])
                self._metas[m] = read_meta(g["meta"], len(ids))
            self._errors = read_table(f["errors"]) if "errors" in f else None

    def keys(self) -> Iterator[tuple[str, str, int, int]]:
        """``(modality, utterance, frames, width)`` of every stored matrix."""
        for m, index in self._index.items():
            dim = self._data[m][1]
            for u, (_, _, n) in index.items():
                yield m, u, n, dim

    def errors(self) -> pd.DataFrame | None:
        return self._errors

    def hold(self, m: str) -> None:
        """Read modality ``m``'s block whole on its first ``read`` and keep it until ``release``."""
        if m in self._data and self._data[m][0] is not None:
            self._held.setdefault(m, None)

    def release(self, m: str) -> None:
        self._held.pop(m, None)

    def block_bytes(self, m: str) -> int:
        """Bytes ``hold(m)`` would keep in memory."""
        if m not in self._data or self._data[m][0] is None:
            return 0
        return self._rows[m] * self._data[m][1] * self._data[m][2].itemsize

    def read(self, m: str, u: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The frames and meta of utterance ``u``'s modality ``m``."""
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
            if zlib.crc32(memoryview(np.ascontiguousarray(block)).cast("B")) != self._crc[m]:
                raise StoreError(self.path, f"{m}: the frames of this committed chunk do not match the checksum "
                                 "recorded when it was written (damaged since); remove this file and run the same "
                                 "command again to recompute its utterances")
            self._checked.add(m)
        return block

    def close(self) -> None:
        """Drop held blocks (the file itself is never held open)."""
        self._held.clear()
