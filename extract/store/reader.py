"""Reading a feature store: ``FeatureStore``.

Random reads go through a memory map of each modality's contiguous frame matrix; ``load_all``
reads everything in one read per modality. The layout is in ``docs/feature-store.md``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np

from cmarr.extract.base import MODALITIES
from cmarr.extract.store.format import StoreError, check_store, open_h5, read_meta, read_table


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
        f = open_h5(self.path)
        try:
            check_store(self.path, f)
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
                          for k, v in f.attrs.items()}
            try:
                self.utterances = read_table(f["utterances"])
                self.provenance = {m: json.loads(v) for m, v in f["provenance"].attrs.items()}
                self.errors = read_table(f["errors"])
                self.modalities = tuple(m for m in MODALITIES if m in f["features"] or m in self.provenance)
                self._index: dict[str, dict[str, tuple[int, int]]] = {}
                self._order: dict[str, list[str]] = {}
                self._layout: dict[str, tuple[int | None, tuple[int, int], str]] = {}
                self.checksums: dict[str, str] = {}  # modality -> sha256 of its frames as written
                for m in self.modalities:
                    g = f["features"][m]
                    c = g.attrs["data_sha256"]
                    self.checksums[m] = c.decode() if isinstance(c, bytes) else str(c)
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
                self._meta[modality] = read_meta(g["meta"], len(self._order[modality]))
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
        frames differ. ``each(modality, first row, block)``, when given, sees every piece of
        the same pass (another check at no extra read)."""
        for m in (tuple(modalities) if modalities is not None else self.modalities):
            self._check_has(m)
            digest = hashlib.sha256()
            for start, block in self.pieces(m, piece_bytes):
                digest.update(memoryview(block).cast("B"))
                if each is not None:
                    each(m, start, block)
            if digest.hexdigest() != self.checksums[m]:
                raise self._damaged(m)

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
                self._check_has(m)
                ds = f["features"][m]["data"]
                block = np.empty(ds.shape, dtype=ds.dtype)
                if ds.shape[0]:
                    ds.read_direct(block)
                if verify and hashlib.sha256(block.tobytes() if not block.size
                                             else memoryview(block).cast("B")).hexdigest() != self.checksums[m]:
                    raise self._damaged(m)
                if dtype is not None:
                    block = block.astype(dtype, copy=False)
                out[m] = {u: block[o:o + n] for u, (o, n) in self._index[m].items()}
        return out

    def _check_has(self, modality: str) -> None:
        if modality not in self.modalities:
            raise StoreError(self.path, f"the store has no {modality!r} features "
                             f"(it holds {', '.join(self.modalities)})")

    def _damaged(self, modality: str) -> StoreError:
        return StoreError(self.path, f"{modality}: the frames do not match the checksum recorded when the file was "
                          "written (damaged or altered since); `cm-arr-features validate` says more")
