"""How each modality's features were made, and when two such records describe the same features.

A store records per modality what its extractor reported (model, revision, weights sha256,
layer, ...) plus the stamp the writer adds (library versions, project version, host, time).
Resuming, extending and merging compare these records: features made differently never
share a store.
"""
from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from typing import Any, Mapping

#: Provenance keys that legitimately differ between shards of one extraction.
VOLATILE_PROVENANCE_KEYS = frozenset({"created", "host"})
#: When, where and with what software a modality's frames were made: kept from the existing
#: store for a modality of which a rerun computed nothing.
STAMP_KEYS = ("created", "host", "library_versions", "cm_arr_version")
#: Where a model or checkpoint was loaded from does not matter when its weights are the same
#: (copies in different folders, on different machines): weights sha256 key -> location
#: keys. The sha256 is recorded for models loaded from a folder and for Denseface
#: checkpoints; a hub id is compared as such (with its revision and commit).
LOCATION_KEYS = {"weights_sha256": ("model", "revision", "commit_hash"),
                 "denseface_checkpoint_sha256": ("denseface_checkpoint",)}


def project_version() -> str:
    """The installed cm-arr version ("0+unknown" when running from a source tree)."""
    try:
        return metadata.version("cm-arr")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the features."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "numpy", "h5py", "librosa", "soundfile",
                 "soxr", "opencv-python-headless", "torchvision", "facenet-pytorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stamp() -> dict[str, Any]:
    """What the writer adds to every modality's provenance (``STAMP_KEYS``)."""
    return {"library_versions": library_versions(), "cm_arr_version": project_version(),
            "created": now(), "host": platform.node()}


def comparable_provenance(prov: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance without the keys that may differ between shards of one job."""
    return {k: v for k, v in prov.items() if k not in VOLATILE_PROVENANCE_KEYS}


def without_locations(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``a`` and ``b`` without the keys that say where their weights were loaded from, for
    each weights sha256 they record equally (``LOCATION_KEYS``; the tokenizer's folder too)."""
    a, b = dict(a), dict(b)
    for sha, keys in LOCATION_KEYS.items():
        if a.get(sha) and a.get(sha) == b.get(sha):
            for d in (a, b):
                for k in keys:
                    d.pop(k, None)
                if sha == "weights_sha256" and isinstance(d.get("tokenizer"), dict):
                    d["tokenizer"] = {k: v for k, v in d["tokenizer"].items() if k != "name_or_path"}
    return a, b


def provenance_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable list of keys whose values differ: volatile keys ignored, and where a
    model was loaded from when its weights' sha256 are equal (``without_locations``)."""
    a, b = without_locations(comparable_provenance(a), comparable_provenance(b))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    return out
