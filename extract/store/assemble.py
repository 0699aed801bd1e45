"""Assembling a complete store from sources of finished utterances.

The writer's ``finalize`` joins its committed chunks (and the store being extended) and
``merge_stores`` joins shards; both end here, in ``assemble``: one temporary file, written
in the store's order with a fresh sha256 per modality, renamed onto the output only when
whole. Sources are ``ChunkSource`` and ``StoreSource`` (a complete store, whose frames are
checked against their recorded sha256 before they are copied).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import h5py
import numpy as np
import pandas as pd

from cmarr.extract.base import MODALITIES
from cmarr.extract.files import durable_replace
from cmarr.extract.store.chunks import ChunkSource
from cmarr.extract.store.format import ERROR_COLUMNS, FORMAT, SCHEMA_VERSION, StoreError, write_meta, write_table
from cmarr.extract.store.h5io import new_h5
from cmarr.extract.store.provenance import now, project_version
from cmarr.extract.store.reader import FeatureStore

#: Bytes of consecutive frames gathered before one write when a store is assembled.
WRITE_BLOCK_BYTES = 8 << 20
#: When a modality's frames in committed chunks total at most this many bytes, assembling
#: the store reads each chunk's block of that modality once, whole, instead of once per
#: utterance (text: a read per utterance cost more than copying its rows).
WHOLE_BLOCK_READ_BYTES = 1 << 30


class StoreSource:
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

    def read(self, m: str, u: str) -> tuple[np.ndarray, dict[str, Any]]:
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


Source = Union[ChunkSource, StoreSource]


def write_modality(f: h5py.File, modality: str, dim: int, dtype: str, items: list[tuple[str, int]],
                   read: Callable[[str], tuple[np.ndarray, dict[str, Any]]], check: Callable[[], None]) -> None:
    """Write one modality in the concatenated layout.

    ``items`` is ``[(utterance_id, frames)]`` in output order; ``read(utt)`` returns
    ``(matrix, meta)`` for it. Meta keys holding sequences are stored ragged. ``check()``,
    called after each block written, raises when a write has failed (``WriteGuard``): the
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
    write_meta(g.create_group("meta"), modality, metas)


def _init_store_file(f: h5py.File, dtype: str) -> None:
    """The root attributes and groups of a new store (``complete`` False until the end)."""
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["dtype"] = dtype
    f.attrs["cm_arr_version"] = project_version()
    f.attrs["created"] = now()
    f.attrs["complete"] = False
    f.create_group("features")
    f.create_group("provenance")


def assemble(out: Path, utterances: pd.DataFrame, provenance: Mapping[str, dict], sources: Sequence[Source],
             dtype: str, extra_attrs: Mapping[str, Any] | None = None,
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
        with new_h5(tmp, out) as (f, guard):
            _init_store_file(f, dtype)
            for k, v in (extra_attrs or {}).items():
                f.attrs[k] = v
            write_table(f.create_group("utterances"), utterances.reset_index(drop=True))
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
                    write_modality(f, m, dim, dtype, [(u, n) for u, n, _, _ in keys],
                                   lambda u, m=m, src_of=src_of: sources[src_of[u]].read(m, u), check=guard.check)
                finally:
                    for src in sources:
                        src.release(m)
            write_table(f.create_group("errors"), err)
            f.attrs["complete"] = True
        durable_replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
