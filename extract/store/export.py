"""Export a feature store to the folder layout of the MMIN family of code.

MMIN (Zhao et al., ACL 2021, github.com/AIM3-RUC/MMIN) and the code built on it (IF-MMIN,
CIF-MMIN, ...) read features and splits with ``data/multimodal_dataset.py`` and
``data/multimodal_miss_dataset.py``; ``data/config/<corpus_name>_config.json`` gives the two
roots. What they read, and what ``export_mmin`` writes::

    <feature_root>/A/<A_type>.h5        one dataset per utterance id, frames (T, D); speech
    <feature_root>/V/<V_type>.h5        video (Denseface frames)
    <feature_root>/L/<L_type>.h5        text (word pieces)
    <target_root>/<cvNo>/{trn,val,tst}_label.npy
    <target_root>/<cvNo>/{trn,val,tst}_int2name.npy

- ``--A_type``, ``--V_type``, ``--L_type`` name the files (MMIN's scripts: comparE,
  denseface, bert_large). An ``A_type`` of ``comparE`` or ``comparE_raw`` makes MMIN
  normalise with statistics this export does not write, so those two names are refused.
- ``corpus_name`` "IEMOCAP": labels one-hot ``(N, 4)`` (the loader takes their argmax) and
  int2name ``(N, 1)`` bytes (it reads ``int2name[i][0].decode()``). "MSP": labels ``(N,)``
  integers and int2name ``(N,)`` strings. Classes in the order ang, hap, neu, sad = 0..3.
- Splits (``cvNo`` from 1): per fold of the store (sorted), one cv per speaker of the fold,
  that speaker being validation and the fold's other speakers test; every other fold
  trains. IEMOCAP's 5 sessions of 2 speakers give MMIN's 10 cvs, MSP-IMPROV's 6 give 12.
- Frames are float32 (the store's float16 values, exactly). MMIN reads all three modalities
  of every utterance it lists; ``missing`` says what happens to an utterance the store has no
  frames for: "refuse" (default), "drop" (left out of the target files), "empty" (a ``(0, D)``
  dataset, which MMIN's collate pads with zeros). Either way ``export.json`` lists them.

The folder is written under a temporary sibling name and renamed when complete, so
``out_dir`` is never half-written; ``export.json`` and ``README.md`` in it say what the
store was (its sha256), the mapping, the splits and the MMIN options that read it.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from cmarr.extract.base import LABELS, PathError
from cmarr.extract.files import file_sha256
from cmarr.extract.store.h5io import new_h5
from cmarr.extract.store.reader import FeatureStore

#: MMIN's modality letters and the store's modalities they hold.
MMIN_MODALITIES = {"A": "speech", "V": "video", "L": "text"}
#: Default ``<X>_type`` names: the paper's wav2vec2 speech, Denseface video, BERT text.
MMIN_TYPES = {"A": "wav2vec2", "V": "denseface", "L": "bert"}
#: The store's corpus -> MMIN's ``corpus_name`` (it decides the target files' encoding).
MMIN_CORPUS_NAMES = {"iemocap": "IEMOCAP", "msp-improv": "MSP"}
MISSING_POLICIES = ("refuse", "drop", "empty")
#: Names MMIN's loaders treat specially (normalisation statistics read or computed).
_RESERVED_A_TYPES = ("comparE", "comparE_raw")


class ExportError(PathError):
    """A store that cannot be exported, or an output folder that cannot be written."""


def mmin_splits(table, where: str) -> list[dict[str, Any]]:
    """MMIN's cross-validation of the utterance ``table``: per fold, one cv per speaker (see
    the module docstring). Each cv: ``cvNo, fold, val_speaker, tst_speakers`` and the row
    indices ``trn, val, tst``; ``cm_arr_speaker_rule`` marks the cv that ``cm-arr-train``'s
    ``data.validation: speaker`` holds out for that fold (the same train/val/test parts)."""
    try:
        folds = table["fold"].to_numpy().astype(np.int64)
    except (KeyError, ValueError, TypeError):
        raise ExportError(where, "the utterance table's 'fold' column is missing or not integers") from None
    speakers = table["speaker"].astype(str).to_numpy() if "speaker" in table else np.full(len(table), "")
    all_folds = sorted(set(folds.tolist()))
    if len(all_folds) < 2:
        raise ExportError(where, f"only one fold ({all_folds}); MMIN's splits train on the other folds")
    cvs = []
    for p, fold in enumerate(all_folds):
        in_fold = folds == fold
        spk = sorted(set(speakers[in_fold].tolist()))
        if "" in spk or len(spk) < 2:
            raise ExportError(where, f"fold {fold}: MMIN's splits need two speakers per fold (one validation, one "
                              f"test), found {spk if '' not in spk else 'no speaker values'}")
        for j, s in enumerate(spk):
            val = in_fold & (speakers == s)
            cvs.append({"cvNo": len(cvs) + 1, "fold": fold, "val_speaker": s,
                        "tst_speakers": [t for t in spk if t != s], "cm_arr_speaker_rule": j == p % len(spk),
                        "trn": np.flatnonzero(~in_fold), "val": np.flatnonzero(val),
                        "tst": np.flatnonzero(in_fold & ~val)})
    return cvs


def _check_out_dir(out_dir: Path, store_path: Path, overwrite: bool) -> None:
    if store_path.resolve().is_relative_to(out_dir.resolve()):
        raise ExportError(out_dir, f"holds the store being exported ({store_path}); choose another folder")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ExportError(out_dir, "exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise ExportError(out_dir, "already exists and is not empty; choose another folder or pass --overwrite")


def _check_type_names(types: dict[str, str], where: str) -> None:
    for x, name in types.items():
        if not name or "/" in name or name in (".", "..") or name != name.strip():
            raise ExportError(where, f"{x}_type {name!r}: a file name without '/' is needed ({x}/<{x}_type>.h5)")
    if types["A"] in _RESERVED_A_TYPES:
        raise ExportError(where, f"A_type {types['A']!r}: MMIN normalises an A_type of that name with openSMILE "
                          "statistics (A/comparE_mean_std.h5) that this export does not write; choose another name")


def _write_h5(path: Path, fill: Callable[[h5py.File], None]) -> None:
    """``path`` written by ``fill``, through a ``WriteGuard`` (a full disk is one ``OSError``
    naming the file). Earliest format bounds (superblock 0): older HDF5 releases read it."""
    with new_h5(path, libver="earliest") as (f, _):
        fill(f)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True) + [folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_mmin(store_path: str | os.PathLike, out_dir: str | os.PathLike, *, types: dict[str, str] | None = None,
                corpus_name: str | None = None, missing: str = "refuse", overwrite: bool = False,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write ``store_path`` in MMIN's layout into the folder ``out_dir`` (see the module
    docstring) and return what ``export.json`` records. ``types`` overrides ``MMIN_TYPES``
    per letter; ``corpus_name`` ("IEMOCAP" | "MSP") defaults from the store's corpus.
    Raises ``StoreError`` / ``ExportError`` (nothing written) or ``OSError`` from a failed
    write (nothing left behind)."""
    store_path, out_dir = Path(store_path), Path(out_dir)
    types = {**MMIN_TYPES, **(types or {})}
    _check_type_names(types, str(store_path))
    if missing not in MISSING_POLICIES:
        raise ExportError(store_path, f"missing policy {missing!r}: expected one of {', '.join(MISSING_POLICIES)}")
    store = FeatureStore(store_path)
    table = store.utterances
    for x, m in MMIN_MODALITIES.items():
        if m not in store.modalities:
            raise ExportError(store_path, f"the store has no {m} features; MMIN reads {x} ({m}) for every utterance")

    corpora = sorted(set(table["corpus"].astype(str))) if "corpus" in table else []
    if corpus_name is None:
        names = {MMIN_CORPUS_NAMES.get(c) for c in corpora}
        if len(names) != 1 or None in names:
            raise ExportError(store_path, f"corpus {', '.join(corpora) or '(none)'}: say which MMIN layout to write "
                              "with --corpus-name IEMOCAP (one-hot labels) or MSP (integer labels)")
        corpus_name = names.pop()
    if corpus_name not in ("IEMOCAP", "MSP"):
        raise ExportError(store_path, f"corpus name {corpus_name!r}: MMIN's loaders know IEMOCAP and MSP")
    labels = table["label"].astype(str)
    bad = sorted(set(labels) - set(LABELS))
    if bad:
        raise ExportError(store_path, f"labels {bad} are not among MMIN's four classes {', '.join(LABELS)}")
    ids = table["utterance_id"].astype(str).tolist()
    if any("/" in u for u in ids):
        raise ExportError(store_path, f"utterance id {next(u for u in ids if '/' in u)!r} holds a '/', which an HDF5 "
                          "dataset name cannot")

    absent = {x: [u for u in ids if not store.has(u, m)] for x, m in MMIN_MODALITIES.items()}
    if missing == "refuse" and any(absent.values()):
        said = "; ".join(f"{len(v)} without {x} ({MMIN_MODALITIES[x]}), first {v[0]!r}" for x, v in absent.items() if v)
        raise ExportError(store_path, f"{said}. MMIN reads all three modalities of every utterance: pass "
                          "--missing drop (leave them out) or --missing empty (write (0, D) entries)")
    dropped = sorted({u for v in absent.values() for u in v}) if missing == "drop" else []
    if dropped:
        keep = ~table["utterance_id"].astype(str).isin(dropped).to_numpy()
        table = table[keep].reset_index(drop=True)
        ids = table["utterance_id"].astype(str).tolist()
    cvs = mmin_splits(table, str(store_path))
    for cv in cvs:
        for part in ("trn", "val", "tst"):
            if not len(cv[part]):
                raise ExportError(store_path, f"cv {cv['cvNo']} (fold {cv['fold']}): its {part} part is empty")
    _check_out_dir(out_dir, store_path, overwrite)

    log(f"checking {store_path} against its recorded checksums")
    store.verify(MMIN_MODALITIES.values())
    record = _record(store, store_path, out_dir, types, corpus_name, missing, absent, dropped, cvs)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for x, m in MMIN_MODALITIES.items():
            (tmp / x).mkdir()
            log(f"writing {x}/{types[x]}.h5 ({m})")
            _write_h5(tmp / x / f"{types[x]}.h5", lambda f, m=m: _fill_features(f, store, m, ids))
        y = np.array([LABELS.index(v) for v in table["label"].astype(str)], dtype=np.int64)
        for cv in cvs:
            folder = tmp / "target" / str(cv["cvNo"])
            folder.mkdir(parents=True)
            for part in ("trn", "val", "tst"):
                rows = cv[part]
                names = [ids[i] for i in rows]
                if corpus_name == "IEMOCAP":
                    label = np.eye(len(LABELS), dtype=np.float32)[y[rows]]
                    int2name = np.array([u.encode() for u in names], dtype=np.bytes_).reshape(-1, 1)
                else:
                    label, int2name = y[rows], np.array(names, dtype=np.str_)
                np.save(folder / f"{part}_label.npy", label)
                np.save(folder / f"{part}_int2name.npy", int2name)
        (tmp / "config").mkdir()
        config = json.dumps(record["mmin"]["config"], indent=4) + "\n"
        (tmp / "config" / f"{corpus_name}_config.json").write_text(config)
        (tmp / "export.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(_readme(record))
        _fsync_tree(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _fill_features(f: h5py.File, store: FeatureStore, modality: str, ids: list[str]) -> None:
    dim = store.dims[modality]
    for u in ids:
        x = store.get(u, modality)
        f.create_dataset(u, data=np.zeros((0, dim), np.float32) if x is None else x.astype(np.float32))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` (an existing one is moved aside first
    and removed once the new one is in place)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _record(store, store_path, out_dir, types, corpus_name, missing, absent, dropped, cvs) -> dict[str, Any]:
    import cmarr

    root = out_dir.resolve()
    empty = {x: v for x, v in absent.items() if v} if missing == "empty" else {}
    flags = " ".join([f"--corpus_name={corpus_name}"]
                     + [f"--{x}_type={types[x]} --input_dim_{x.lower()}={store.dims[m]}"
                        for x, m in MMIN_MODALITIES.items()]
                     + [f"--output_dim={len(LABELS)}", f"--cvNo=<1..{len(cvs)}>"])
    return {
        "format": "mmin",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cm_arr_version": cmarr.__version__,
        "source": {"path": str(store_path.resolve()), "sha256": file_sha256(store_path),
                   "schema_version": store.attrs.get("schema_version"), "frames_sha256": dict(store.checksums)},
        "corpus_name": corpus_name,
        "modalities": {x: {"modality": m, "file": f"{x}/{types[x]}.h5", "dim": store.dims[m], "dtype": "float32",
                           "store_dtype": store.dtype, "provenance": store.provenance.get(m, {})}
                       for x, m in MMIN_MODALITIES.items()},
        "labels": {"classes": list(LABELS),
                   "encoding": ("one-hot (N, 4) float32; int2name (N, 1) bytes" if corpus_name == "IEMOCAP"
                                else "class index (N,) int64; int2name (N,) str")},
        "missing": {"policy": missing, "dropped_utterances": dropped, "empty_entries": empty},
        "cv": [{k: (len(v) if k in ("trn", "val", "tst") else v) for k, v in cv.items()} for cv in cvs],
        "mmin": {
            "config": {"feature_root": str(root), "target_root": str(root / "target"), "total_cv": len(cvs)},
            "flags": flags,
            "read_by": ["data/multimodal_dataset.py (MultimodalDataset)",
                        "data/multimodal_miss_dataset.py (MultimodalMissDataset)",
                        f"data/config/{corpus_name}_config.json (feature_root, target_root)"],
        },
    }


def _readme(r: dict[str, Any]) -> str:
    mods = "\n".join(f"- `{v['file']}`: {v['modality']} frames, (T, {v['dim']}) float32 per utterance id"
                     for v in r["modalities"].values())
    cvs = "\n".join(f"| {c['cvNo']} | {c['fold']} | {c['val_speaker']} | {', '.join(c['tst_speakers'])} | {c['trn']} "
                    f"| {c['val']} | {c['tst']} |" for c in r["cv"])
    miss = r["missing"]
    if miss["dropped_utterances"]:
        said = (f"{len(miss['dropped_utterances'])} utterances lacking a modality are left out of the target files "
                "(`export.json` lists them).")
    elif miss["empty_entries"]:
        said = ("Utterances lacking a modality have a (0, D) entry in its file, which MMIN's collate_fn pads with "
                "zeros: " + "; ".join(f"{x}: {len(v)}" for x, v in miss["empty_entries"].items())
                + " (`export.json` lists them).")
    else:
        said = "Every utterance has all three modalities."
    name = r["corpus_name"]
    same = ", ".join(str(c["cvNo"]) for c in r["cv"] if c["cm_arr_speaker_rule"])
    return f"""# Features in MMIN's layout

Exported from `{r['source']['path']}` (sha256 `{r['source']['sha256']}`) by cm-arr {r['cm_arr_version']}
on {r['created']}. `export.json` holds the same record, with each modality's provenance.

{mods}
- `target/<cvNo>/{{trn,val,tst}}_label.npy`, `_int2name.npy`: {r['labels']['encoding']};
  classes {', '.join(f'{i} = {c}' for i, c in enumerate(r['labels']['classes']))}

{said}

## Reading it with MMIN (IF-MMIN, CIF-MMIN)

Copy `config/{name}_config.json` to the code's `data/config/` (its `feature_root` and
`target_root` point here); `data/multimodal_dataset.py` and `data/multimodal_miss_dataset.py`
read the files above. Options:

    {r['mmin']['flags']}

## Splits

Per fold of the store, one cv per speaker: that speaker validates, the fold's other speakers
test, the other folds train. cm-arr-train's `data.validation: speaker` uses the splits of
cvs {same} (one per fold).

| cvNo | fold | val speaker | test speakers | trn | val | tst |
|---|---|---|---|---|---|---|
{cvs}
"""
