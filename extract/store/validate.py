"""Checking a store thoroughly (``cm-arr-features validate``), optionally against its manifest."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd

from cmarr.extract.base import LABELS
from cmarr.extract.corpora.manifest import fold_leaks
from cmarr.extract.store.format import REQUIRED_COLUMNS, as_numbers, parse_shard_tag, select_shard
from cmarr.extract.store.reader import FeatureStore


def errors_hint(path: str | os.PathLike) -> str:
    """The command that lists a store's recorded extraction failures."""
    return f"`cm-arr-features errors {path}`"


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
        num_a, num_b = as_numbers(a), as_numbers(b)
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
        from cmarr.extract.corpora.manifest import UNLABELLED_CORPORA

        # a media folder's utterances may be unlabelled (the trainer refuses such a store)
        unlabelled = (t["corpus"].isin(UNLABELLED_CORPORA) & t["label"].eq("")) if "corpus" in t.columns else False
        bad = sorted(set(t["label"][~unlabelled]) - set(LABELS))
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
            problems.append(f"{m}: {len(strays)} feature entries for ids not in the utterance table "
                            f"(first: {sorted(strays)[0]!r})")
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
        if store.checksums[m] != digest.hexdigest():
            problems.append(f"{m}: the frames do not match the checksum recorded when the file was written "
                            "(damaged or altered since)")
        for u in (sorted(index) if m in ("text", "video") else ()):
            meta = store.meta(u, m)
            n = index[u][1]
            if m == "text" and "tokens" in meta and len(meta["tokens"]) != n:
                problems.append(f"{m}/{u}: {len(meta['tokens'])} tokens for {n} frames")
            if m == "video" and "face_mask" in meta:
                if int(meta["face_mask"].sum()) != n:
                    problems.append(f"{m}/{u}: face_mask marks {int(meta['face_mask'].sum())} face frames, "
                                    f"matrix has {n}")
                if "frame_times" in meta and len(meta["frame_times"]) != len(meta["face_mask"]):
                    problems.append(f"{m}/{u}: frame_times and face_mask lengths differ")
        errored = {u for u, mm in zip(store.errors["utterance_id"], store.errors["modality"]) if mm == m}
        unaccounted = ids - store.ids(m) - errored
        if unaccounted:
            problems.append(f"{m}: {len(unaccounted)} utterances have neither features nor a recorded reason "
                            f"(first: {sorted(unaccounted)[0]!r})")
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
                files = ", ".join(x[:12] for x in made_from)
                notes.append(f"the store was extracted from another manifest file (sha256 {files}"
                             f", this one {manifest_sha256[:12]}); its table was compared with this one row by row")
    store.close()
    return problems, notes
