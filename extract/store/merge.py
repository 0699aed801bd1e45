"""Joining the shard stores of one extraction into one store (``cm-arr-features merge``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from cmarr.extract.store.assemble import StoreSource, assemble
from cmarr.extract.store.format import StoreError, utterance_order
from cmarr.extract.store.provenance import comparable_provenance, provenance_differences
from cmarr.extract.store.reader import FeatureStore


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
        splits = ", ".join(sorted({str(t) for _, t in tagged}))
        raise StoreError(s0.path, f"shards of different splits are mixed ({splits})")
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
            raise StoreError(s.path, f"holds modalities {sorted(s.provenance)}, {first.path.name} holds "
                             f"{sorted(first.provenance)}")
        for m in first.provenance:
            a, b = first.provenance[m], s.provenance[m]
            if allow_library_mismatch:
                a = {k: v for k, v in a.items() if k != "library_versions"}
                b = {k: v for k, v in b.items() if k != "library_versions"}
            diff = provenance_differences(a, b)
            if diff:
                raise StoreError(s.path, f"{m} features were made differently from {first.path.name}'s: "
                                 f"{'; '.join(diff[:4])}")
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
    sources = [StoreSource(p) for p in paths]
    try:
        attrs = {"merged_from": json.dumps([p.name for p in paths])}
        if by_shard:
            attrs["shard_provenance"] = json.dumps(by_shard, sort_keys=True, default=str)
        assemble(out, table, first.provenance, sources, first.dtype, extra_attrs=attrs)
    finally:
        for src in sources:
            src.close()
    return out
