"""Reading a feature store for training, batching with masks, and missing conditions.

Batch contract (every pipeline yields the same; B batch, T_m frames or steps of modality m,
D_m its width, M = 3 modalities in the order ``MODALITIES`` = speech, text, video):

    feats[m]   (B, T_m, D_m) float32   padded frames; rows of a modality that is absent (or,
                                        in evaluation, unavailable) hold ``DataConfig.fill_absent``
                                        (NaN by default), so a model that reads them shows it
    masks[m]   (B, T_m) bool           True = valid frame / step
    present    (B, M) bool             the store has this modality for the utterance
    labels     (B,) int64              index into LABELS
    index      (B,) int64              row of the utterance table

Two pipelines:

- **eager**: a ``DataLoader`` over utterances that pads raw frame sequences per batch; the
  model pools them to ``seq_len`` steps itself. Works from memory (``load="memory"``) or
  lazily from the HDF5 file opened in each worker (``load="lazy"``).
- **resident**: every utterance is pooled once to ``seq_len`` steps with
  ``cmarr.model.pool_to_steps`` (parameter-free and the model's first operation, so the
  model sees the same numbers) and the fold's tensors stay on the device; batches are
  indexed there with no DataLoader and no host-device copies.

Which modalities a sample may use is decided in :mod:`.conditions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cmarr.extract.base import LABELS, MODALITIES


class DataError(Exception):
    """A store that cannot be trained on. ``str(e)`` names the file and the problem."""


# ----------------------------------------------------------------------------------------
# the store in memory (or lazily)


class StoreData:
    """The utterance table, labels, folds and features of a store, checked for training.

    Raises :class:`DataError` for a store without labels or folds (or with some utterances
    lacking either: a store built from a media folder; a partly labelled store is refused,
    naming the count, rather than trained on its labelled part), labels outside the four
    classes, a modality that is absent from every utterance (or not in the store at all),
    and utterances that have no modality at all.
    """

    def __init__(self, path: str | Path, load: str = "memory", utterances: pd.DataFrame | None = None,
                 features: dict[str, dict[str, np.ndarray]] | None = None,
                 provenance: dict | None = None):
        self.path = Path(path)
        self.load = load
        where = str(self.path)
        self._store = None
        if utterances is None:
            from cmarr.extract.store import FeatureStore, StoreError

            try:
                store = FeatureStore(self.path)
            except StoreError as e:
                raise DataError(str(e)) from None
            if store.attrs.get("shard"):
                raise DataError(f"{where}: is shard {store.attrs['shard']} of an extraction, not the whole corpus; "
                                "join the shards first (cm-arr-features merge)")
            table = store.utterances
            self.provenance = store.provenance
            self.checksums = dict(store.checksums)  # sha256 of each modality's frames
            self.dims = dict(store.dims)
            have = {m: store.ids(m) for m in store.modalities}
            lacking = [m for m in MODALITIES if m not in store.modalities or not have[m]]
            if lacking:
                raise DataError(f"{where}: the store has no {', '.join(lacking)} features at all "
                                f"(it holds {', '.join(m for m in store.modalities if have.get(m)) or 'none'}); "
                                "CM-ARR needs speech, text and video")
            self._store = store
        else:
            table = utterances
            self.provenance = dict(provenance or {})
            self.checksums = {}
            have = {m: set(features[m]) for m in MODALITIES}
            self.dims = {m: int(next(iter(features[m].values())).shape[1]) for m in MODALITIES if features[m]}
            lacking = [m for m in MODALITIES if not features.get(m)]
            if lacking:
                raise DataError(f"{where}: no {', '.join(lacking)} features at all; "
                                "CM-ARR needs speech, text and video")
        self.table = self._check_table(table, where)
        self.ids = self.table["utterance_id"].astype(str).tolist()
        self.labels = np.array([LABELS.index(x) for x in self.table["label"]], dtype=np.int64)
        self.folds = self.table["fold"].to_numpy(dtype=np.int64)
        self.speakers = (self.table["speaker"].astype(str).to_numpy() if "speaker" in self.table
                         else np.array([""] * len(self.ids)))
        self.present = np.array([[u in have[m] for m in MODALITIES] for u in self.ids], dtype=bool)  # (N, 3)
        none = np.flatnonzero(~self.present.any(axis=1))
        if len(none):
            raise DataError(f"{where}: {len(none)} utterances have no features in any modality "
                            f"(first: {self.ids[none[0]]!r}); remove them from the store's table or re-extract")
        if features is not None:
            self.features = features
            bad = nonfinite_utterances(features)
        elif load == "memory":
            from cmarr.extract.store import StoreError

            try:  # checked against the recorded checksums: training never runs on altered frames
                self.features = self._store.load_all(MODALITIES, verify=True)
            except StoreError as e:
                raise DataError(str(e)) from None
            bad = nonfinite_utterances(self.features)  # in memory already: no second read
        elif load == "lazy":
            from cmarr.extract.store import StoreError

            try:  # one pass in bounded memory: lazy training never runs on altered frames either
                bad = verify_frames(self._store, MODALITIES)
            except StoreError as e:
                raise DataError(str(e)) from None
            self.features = None
        else:
            raise DataError(f"{where}: unknown load mode {load!r}")
        if bad:  # before any fold trains: a NaN frame would only show as a failed evaluation
            raise DataError(nonfinite_message(where, bad))

    @staticmethod
    def _check_table(table: pd.DataFrame, where: str) -> pd.DataFrame:
        dup = table["utterance_id"].astype(str).duplicated()
        if dup.any():
            raise DataError(f"{where}: the utterance table lists {int(dup.sum())} ids more than once "
                            f"(first: {table['utterance_id'].astype(str)[dup].iloc[0]!r})")
        for col, what in (("label", "labels"), ("fold", "folds")):
            if col not in table.columns:
                raise DataError(f"{where}: the store has no {what} (no '{col}' column in its utterance table); "
                                "training needs a labelled store with folds")
        labels = table["label"].fillna("").astype(str).str.strip()
        blank = labels.eq("")
        if blank.all():
            raise DataError(f"{where}: the store has no labels: {int(blank.sum())} of {len(labels)} utterances have "
                            "no label (a store built from an unlabelled media folder); training needs labels: "
                            "build the manifest with --labels and extract again")
        if blank.any():  # a partly labelled store: refused, not trained on its labelled part unseen
            first = table["utterance_id"].astype(str)[blank].iloc[0]
            raise DataError(f"{where}: {int(blank.sum())} of {len(labels)} utterances have no label (first: "
                            f"{first!r}); training needs every utterance labelled: label them in the --labels "
                            "file, or leave them out of the manifest, and extract again")
        bad = sorted(set(labels) - set(LABELS))
        if bad:
            n = int((~labels.isin(LABELS)).sum())
            raise DataError(f"{where}: {n} utterances have labels outside the four classes {', '.join(LABELS)}: "
                            f"{', '.join(repr(b) for b in bad[:6])}")
        fold_text = table["fold"].astype(object).where(table["fold"].notna(), "").astype(str).str.strip()
        no_fold = fold_text.eq("") | fold_text.str.lower().eq("nan")
        if no_fold.any():  # a media folder has no sessions: nothing says which utterances test a fold
            first = table["utterance_id"].astype(str)[no_fold].iloc[0]
            whole = " (the store has no folds)" if no_fold.all() else ""
            raise DataError(f"{where}: {int(no_fold.sum())} of {len(table)} utterances have no fold{whole} (first: "
                            f"{first!r}; a store built from a media folder has no sessions); training needs "
                            "folds: fill the manifest's fold column (1-based, every speaker in one fold) and "
                            "extract again")
        try:
            folds = pd.to_numeric(table["fold"], errors="raise")
        except (ValueError, TypeError):
            raise DataError(f"{where}: the 'fold' column is not numeric "
                            f"(first values: {table['fold'].head(3).tolist()})") from None
        if folds.isna().any() or (folds < 1).any() or (folds != folds.round()).any():
            raise DataError(f"{where}: the store has no usable folds ('fold' must be 1-based integers; "
                            f"found {sorted(set(folds.tolist()))[:6]})")
        out = table.copy()
        out["fold"] = folds.astype(np.int64)
        return out.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, i: int, m: str) -> np.ndarray | None:
        """The ``(T, D)`` frames of utterance row ``i`` in modality ``m`` (None if absent)."""
        u = self.ids[i]
        if self.features is not None:
            return self.features[m].get(u)
        return self._store.get(u, m)

    @property
    def fold_ids(self) -> list[int]:
        return sorted(int(f) for f in np.unique(self.folds))

    def __getstate__(self):
        return self.__dict__.copy()


def nonfinite_utterances(features: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, list[str]]:
    """Per modality, the utterances whose ``(T, D)`` frames hold NaN or Inf (modalities
    without any are left out). The store writer refuses such frames, so they come from a
    file changed behind its back (with its checksums recomputed) or a foreign writer."""
    out = {}
    for m, mats in features.items():
        bad = [u for u, a in mats.items() if not np.isfinite(a).all()]
        if bad:
            out[m] = bad
    return out


def verify_frames(store, modalities: Sequence[str], piece_bytes: int = 64 << 20) -> dict[str, list[str]]:
    """One pass over the frames of ``modalities`` of ``store`` (a ``FeatureStore``) in pieces
    of about ``piece_bytes``: the sha256 against the one recorded when the store was written
    (``StoreError`` as ``FeatureStore.verify`` raises it) and whether any value is NaN or
    Inf. Returns :func:`nonfinite_utterances` of them (the utterances are looked up, one by
    one, only for a modality that has such values)."""
    nonfinite: set[str] = set()

    def check(m: str, _start: int, block: np.ndarray) -> None:
        if m not in nonfinite and not np.isfinite(block).all():
            nonfinite.add(m)

    store.verify(modalities, piece_bytes, each=check)
    out: dict[str, list[str]] = {}
    for m in modalities:
        if m in nonfinite:
            out.update(nonfinite_utterances({m: {u: store.get(u, m) for u in sorted(store.ids(m))}}))
    return out


def nonfinite_message(where: str, bad: Mapping[str, Sequence[str]], shown: int = 8) -> str:
    """One line naming the utterances of :func:`nonfinite_utterances` (``shown`` per modality)."""
    n = sum(len(v) for v in bad.values())
    parts = [f"{m} of {', '.join(map(repr, us[:shown]))}{f' and {len(us) - shown} more' if len(us) > shown else ''}"
             for m, us in bad.items()]
    return (f"{where}: {n} feature matri{'ces hold' if n > 1 else 'x holds'} NaN/Inf values: {'; '.join(parts)} "
            "(no model can train on or score them); re-extract these utterances or remove them from the store")


# ----------------------------------------------------------------------------------------
# batches


@dataclass
class Batch:
    feats: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    present: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch({m: x.to(device, non_blocking=non_blocking) for m, x in self.feats.items()},
                     {m: x.to(device, non_blocking=non_blocking) for m, x in self.masks.items()},
                     self.present.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking),
                     self.index.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def hide_unavailable(feats: dict[str, torch.Tensor], available: torch.Tensor, fill: float) -> dict[str, torch.Tensor]:
    """Copies of ``feats`` whose unavailable rows hold ``fill`` (NaN: a leak would show)."""
    out = {}
    for j, m in enumerate(MODALITIES):
        keep = available[:, j].view(-1, 1, 1)
        out[m] = torch.where(keep, feats[m], torch.full((), fill, dtype=feats[m].dtype, device=feats[m].device))
    return out


def fill_value(setting: str) -> float:
    return float("nan") if setting == "nan" else 0.0


class UtteranceDataset(torch.utils.data.Dataset):
    """Items ``(index, {m: (T, D) array or None})`` of the given table rows (eager pipeline)."""

    def __init__(self, data: StoreData, indices: Sequence[int]):
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        return i, {m: self.data.get(i, m) for m in MODALITIES}


class Collate:
    """Pads a list of items into a :class:`Batch` (absent rows filled with ``fill``)."""

    def __init__(self, data: StoreData, fill: float):
        self.labels = data.labels
        self.present = data.present
        self.dims = data.dims
        self.fill = fill

    def __call__(self, items) -> Batch:
        idx = np.array([i for i, _ in items], dtype=np.int64)
        feats, masks = {}, {}
        for m in MODALITIES:
            mats = [x[m] for _, x in items]
            T = max([a.shape[0] for a in mats if a is not None] or [1])
            out = np.full((len(items), T, self.dims[m]), self.fill, dtype=np.float32)  # (B, T, D)
            mask = np.zeros((len(items), T), dtype=bool)  # (B, T)
            for b, a in enumerate(mats):
                if a is None:
                    continue
                out[b, :a.shape[0]] = a
                out[b, a.shape[0]:] = 0.0  # padding after valid frames is masked out
                mask[b, :a.shape[0]] = True
            feats[m] = torch.from_numpy(out)
            masks[m] = torch.from_numpy(mask)
        return Batch(feats, masks, torch.from_numpy(self.present[idx]), torch.from_numpy(self.labels[idx]),
                     torch.from_numpy(idx))


def eager_loader(data: StoreData, indices: Sequence[int], batch_size: int, shuffle: bool, seed: int,
                 fill: float, num_workers: int = 0, sampler=None, drop_last: bool = False):
    """A DataLoader of padded :class:`Batch` es over ``indices``."""
    ds = UtteranceDataset(data, indices)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        collate_fn=Collate(data, fill), num_workers=num_workers, generator=gen, drop_last=drop_last,
        persistent_workers=False)


class ResidentData:
    """Every utterance of ``indices`` pooled to ``steps`` steps, held on ``device``.

    ``x[m]`` (N, S, D_m) float32 (absent rows hold ``fill``), ``mask[m]`` (N, S) bool,
    ``present`` (N, 3), ``labels`` (N,), ``index`` (N,) rows of the utterance table.

    Checked once when built (one host sync): every present row's mask is all True and every
    absent row's all False, which is what the model's per-step value checks verify; so the
    trainer's steps on these batches skip them.
    """

    def __init__(self, data: StoreData, indices: Sequence[int], steps: int, device: torch.device,
                 fill: float, chunk: int = 256):
        from cmarr.model import pool_to_steps

        self.indices = np.asarray(indices, dtype=np.int64)
        self.device = device
        n = len(self.indices)
        self.present = torch.from_numpy(data.present[self.indices]).to(device)
        self.labels = torch.from_numpy(data.labels[self.indices]).to(device)
        self.index = torch.from_numpy(self.indices).to(device)
        self.x: dict[str, torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor] = {}
        collate = Collate(data, 0.0)
        for m in MODALITIES:
            self.x[m] = torch.empty((n, steps, data.dims[m]), dtype=torch.float32, device=device)
            self.mask[m] = torch.zeros((n, steps), dtype=torch.bool, device=device)
        for s in range(0, n, chunk):
            part = self.indices[s:s + chunk]
            b = collate([(int(i), {m: data.get(int(i), m) for m in MODALITIES}) for i in part]).to(device)
            for m in MODALITIES:
                pooled, step_mask = pool_to_steps(b.feats[m], b.masks[m], steps)  # (b, S, D), (b, S)
                self.x[m][s:s + len(part)] = pooled
                self.mask[m][s:s + len(part)] = step_mask
        for j, m in enumerate(MODALITIES):
            absent = ~self.present[:, j]
            self.x[m][absent] = fill
        ok = torch.stack([torch.where(self.present[:, j], self.mask[m].all(dim=1), ~self.mask[m].any(dim=1))
                          for j, m in enumerate(MODALITIES)])  # (3, N)
        if not bool(ok.all()):
            j, i = (int(v) for v in torch.nonzero(~ok)[0])
            raise DataError(f"{data.path}: utterance {data.ids[int(self.indices[i])]!r}: pooled {MODALITIES[j]} steps "
                            "are neither all valid nor all absent (a bug in pooling; please report it)")

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, rows: torch.Tensor) -> Batch:
        """The batch of positions ``rows`` (a device tensor of indices into this set)."""
        return Batch({m: self.x[m][rows] for m in MODALITIES}, {m: self.mask[m][rows] for m in MODALITIES},
                     self.present[rows], self.labels[rows], self.index[rows])

    def batches(self, batch_size: int, order: torch.Tensor | None = None) -> Iterator[Batch]:
        n = len(self)
        order = order if order is not None else torch.arange(n, device=self.device)
        for s in range(0, len(order), batch_size):
            yield self.batch(order[s:s + batch_size])


class ResidentSubset:
    """Positions ``indices`` (rows of the utterance table) of a :class:`ResidentData` built over
    every row (``full.indices == arange(N)``), with the same interface: the folds' parts share
    one copy of the pooled tensors."""

    def __init__(self, full: ResidentData, indices: Sequence[int]):
        if not np.array_equal(full.indices, np.arange(len(full.indices))):
            raise ValueError("ResidentSubset: the full set must hold every row in order")
        self.full = full
        self.indices = np.asarray(indices, dtype=np.int64)
        self.rows = torch.as_tensor(self.indices, device=full.device)
        self.device = full.device

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, rows: torch.Tensor) -> Batch:
        """The batch of positions ``rows`` (a device tensor of indices into this set)."""
        return self.full.batch(self.rows[rows])

    def batches(self, batch_size: int, order: torch.Tensor | None = None) -> Iterator[Batch]:
        n = len(self)
        order = order if order is not None else torch.arange(n, device=self.device)
        for s in range(0, len(order), batch_size):
            yield self.batch(order[s:s + batch_size])
