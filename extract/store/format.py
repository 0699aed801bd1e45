"""The feature store's file layout: its names and versions, the utterance table and its
order, per-utterance meta, and opening a file as a store.

``docs/feature-store.md`` describes the layout; this module is its one implementation,
shared by the reader, the writer, merge and validate.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import pandas as pd

from cmarr.extract.base import PathError

FORMAT = "cm-arr-features"
#: Version of the store layout; a file of another version is refused (extract it again).
SCHEMA_VERSION = 2
#: Version of the chunk files in ``<out>.parts/``; an unfinished extraction of another
#: version is refused (remove its folder and extract again).
CHUNK_FORMAT = 3
REQUIRED_COLUMNS = ("utterance_id", "corpus", "session", "speaker", "label", "fold", "start", "end")
ERROR_COLUMNS = ("utterance_id", "modality", "reason")
#: Meta keys stored as arrays and the dtype they are read back with.
ARRAY_META = {"frame_times": np.float32, "face_mask": bool}


class StoreError(PathError):
    """A store that cannot be read, written or merged. ``str(e)`` is ``"<path>: <problem>"``."""


# --------------------------------------------------------------------------------------
# the utterance table: its columns, its order, and how two tables compare


def write_table(group: h5py.Group, df: pd.DataFrame) -> None:
    """``df`` as one 1-D dataset per column (text as UTF-8, blank cells as "")."""
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


def read_table(group: h5py.Group) -> pd.DataFrame:
    """The table ``write_table`` wrote, columns in their order."""
    columns = json.loads(group.attrs["columns"])
    data = {}
    for col in columns:
        ds = group[col]
        data[col] = list(ds.asstr()[()]) if h5py.check_string_dtype(ds.dtype) is not None else ds[()]
    return pd.DataFrame(data, columns=columns)


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


def as_numbers(x: pd.Series) -> pd.Series | None:
    """``x`` as floats (blank cells NaN), or None when some non-blank cell is not a number."""
    blank = x.isna() | (x.astype(str).str.strip() == "")
    num = pd.to_numeric(x.where(~blank), errors="coerce")
    return num.astype(float) if bool((num.notna() | blank).all()) else None


def _cell(v: Any) -> float | str | None:
    """A table cell as it compares once stored: numbers (and text that reads as one) as
    floats, blank cells and NaN as None, other text as itself."""
    if v is None:
        return None
    if isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)):
        f = float(v)
        return None if f != f else f
    s = str(v)
    if not s.strip():
        return None
    try:
        f = float(s)
    except ValueError:
        return s
    return None if f != f else f


def row_digests(table: pd.DataFrame) -> dict[str, str]:
    """utterance id -> a digest of its row as it would be stored (``_cell`` of every column,
    by column name): equal for a manifest and the table a store holds of it, so a resumed
    extraction can say which utterances a rebuilt manifest added, removed or changed."""
    cols = sorted(str(c) for c in table.columns)
    values = [table[c].tolist() for c in cols]
    out = {}
    for i, u in enumerate(table["utterance_id"].astype(str)):
        row = json.dumps([(c, _cell(v[i])) for c, v in zip(cols, values)])
        out[u] = hashlib.blake2b(row.encode(), digest_size=8).hexdigest()
    return out


def table_changes(old: Mapping[str, str], new: Mapping[str, str]) -> str | None:
    """What turns the table of ``old`` row digests into ``new``'s ("2 added (first: 'x');
    1 changed (first: 'y')"), or None when they are the same."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(u for u in set(old) & set(new) if old[u] != new[u])
    said = [f"{len(ids)} {what} (first: {ids[0]!r})"
            for what, ids in (("added", added), ("removed", removed), ("changed", changed)) if ids]
    return "; ".join(said) or None


# --------------------------------------------------------------------------------------
# per-utterance meta


def read_meta(group: h5py.Group, n: int) -> list[dict[str, Any]]:
    """Per-utterance meta dicts of one modality (``n`` utterances), as ``write_meta`` wrote them."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key in group:
        obj = group[key]
        if isinstance(obj, h5py.Group):
            vals = obj["values"]
            values = list(vals.asstr()[()]) if h5py.check_string_dtype(vals.dtype) is not None else vals[()]
            if key in ARRAY_META:
                values = np.asarray(values).astype(ARRAY_META[key])
            offs = obj["offsets"][()]
            for i in range(n):
                v = values[offs[i]:offs[i + 1]]
                out[i][key] = list(v) if isinstance(v, list) else v
        else:
            text = h5py.check_string_dtype(obj.dtype) is not None
            col = list(obj.asstr()[()]) if text else obj[()]
            as_json = text and obj.attrs["encoding"] == "json"
            for i in range(n):
                v = json.loads(col[i]) if as_json else col[i]
                out[i][key] = v.item() if isinstance(v, np.generic) else v
    return out


def write_meta(group: h5py.Group, modality: str, metas: list[Mapping[str, Any]]) -> None:
    """Per-utterance meta dicts as columns: a ``(U,)`` dataset per scalar or string key (a
    string dataset's ``encoding`` attribute says whether it holds text or JSON of dicts), a
    group ``values`` + ``offsets`` per sequence key (read back by ``read_meta``)."""
    keys = sorted({k for m in metas for k in m})
    for key in keys:
        vals = [m.get(key) for m in metas]
        if any(v is None for v in vals):
            raise ValueError(f"{modality}: meta {key!r} is set for some utterances only")
        if key == "tokens":
            offs = np.concatenate([[0], np.cumsum([len(v) for v in vals])]).astype(np.int64)
            sub = group.create_group(key)
            flat = [str(t) for v in vals for t in v]
            sub.create_dataset("values", data=np.array(flat, dtype=object), dtype=h5py.string_dtype())
            sub.create_dataset("offsets", data=offs)
        elif isinstance(vals[0], (np.ndarray, list, tuple)):
            seqs = [np.asarray(v) for v in vals]
            offs = np.concatenate([[0], np.cumsum([len(v) for v in seqs])]).astype(np.int64)
            flat = np.concatenate(seqs)
            sub = group.create_group(key)
            sub.create_dataset("values", data=flat.astype(np.uint8) if flat.dtype == bool else flat)
            sub.create_dataset("offsets", data=offs)
        elif isinstance(vals[0], (str, dict)):
            kinds = {type(v) for v in vals}
            if len(kinds) > 1 or not kinds <= {str, dict}:
                names = ", ".join(sorted(k.__name__ for k in kinds))
                raise ValueError(f"{modality}: meta {key!r} mixes {names} values")
            text = kinds == {str}
            col = vals if text else [json.dumps(v, sort_keys=True) for v in vals]
            ds = group.create_dataset(key, data=np.array(col, dtype=object), dtype=h5py.string_dtype())
            ds.attrs["encoding"] = "text" if text else "json"
        else:
            group.create_dataset(key, data=np.asarray(vals))


# --------------------------------------------------------------------------------------
# opening a file as a store


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file with one clear ``StoreError`` for every way it can fail."""
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


def check_store(path: Path, f: h5py.File) -> None:
    """Raise ``StoreError`` unless ``f`` is a complete store of this schema version."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise StoreError(path, f"an HDF5 file but not a cm-arr feature store (format attribute is {fmt!r}, "
                         f"expected {FORMAT!r})")
    version = int(f.attrs.get("schema_version", -1))
    if version < SCHEMA_VERSION:
        raise StoreError(path, f"feature store schema version {version}, written by an earlier cm-arr; this one reads "
                         f"schema version {SCHEMA_VERSION}: extract the features again")
    if version > SCHEMA_VERSION:
        raise StoreError(path, f"feature store schema version {version}, written by a later cm-arr; this one reads "
                         f"schema version {SCHEMA_VERSION}: update cm-arr")
    if not bool(f.attrs.get("complete", False)):
        raise StoreError(path, "feature store is marked incomplete (an extraction that did not finish)")
    for name in ("utterances", "provenance", "features"):
        if name not in f:
            raise StoreError(path, f"feature store lacks its '/{name}' group (damaged file?)")
