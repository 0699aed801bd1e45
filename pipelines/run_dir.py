"""RUN_DIR: the files of a training run, what identifies its store, and the lock of a fold.

    RUN_DIR/config.yaml          the resolved TrainConfig (usable as ``--config``)
    RUN_DIR/model_config.yaml    the run format, the CMARRConfig it gives, the store fingerprint
    RUN_DIR/fold<k>/log.csv      one row per epoch (:mod:`.fold`)
    RUN_DIR/fold<k>/best.pt      best epoch on validation (:mod:`.checkpoint`)
    RUN_DIR/fold<k>/last.pt      the resume point, every epoch
    RUN_DIR/fold<k>/metrics.json test metrics of best.pt under the seven conditions
    RUN_DIR/fold<k>/lock         held while the fold trains (:func:`lock_fold`)
    RUN_DIR/tensorboard/fold<k>/ TensorBoard event files of the fold (``log.tensorboard``)
    RUN_DIR/plots/               figures drawn by ``cm-arr-results RUN_DIR --plots`` (:mod:`.plots`)
    RUN_DIR/metrics.json         per fold and condition WAR, UAR, confusion; mean/std; Avg
    RUN_DIR/results.md           Table 2 layout

Files of another run format (``RUN_FORMAT``: ``model_config.yaml``, a fold's
``metrics.json``, checkpoints) are refused with a message naming the file: a run is resumed,
extended or combined only by the version that wrote it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from cmarr.extract.base import LABELS, PathError
from cmarr.extract.files import FileLock, LockBusy

from .config import TrainConfig
from .data import StoreData
from .errors import TrainError
from .metrics import build_metrics, paper_reference

#: The format of what a run writes into RUN_DIR (``model_config.yaml``, each fold's
#: checkpoints and ``metrics.json``). Files of another format are refused.
RUN_FORMAT = 2

#: What a fold's metrics.json holds (written by ``FoldRecipe.test_best``).
FOLD_RESULT_KEYS = ("format", "fold", "best_epoch", "n_train", "n_val", "n_test", "processes", "conditions")


def store_fingerprint(data: StoreData) -> dict[str, Any]:
    """What identifies the store a run trained on: its utterance ids, its table (ids, labels,
    folds, speakers) and the sha256 of each modality's frames (as the store records them)."""
    ids = "\n".join(data.ids).encode()
    table = "\n".join(f"{u}\t{y}\t{k}\t{s}" for u, y, k, s in zip(data.ids, data.labels, data.folds, data.speakers))
    corpora = sorted(set(data.table["corpus"].astype(str))) if "corpus" in data.table else []
    counts = {lab: int((data.labels == i).sum()) for i, lab in enumerate(LABELS)}
    return {"path": str(data.path), "n_utterances": len(data), "utterance_ids_sha256": hashlib.sha256(ids).hexdigest(),
            "table_sha256": hashlib.sha256(table.encode()).hexdigest(),
            "dims": dict(data.dims), "frames_sha256": dict(data.checksums),
            "corpus": corpora[0] if len(corpora) == 1 else None, "label_counts": counts, "folds": data.fold_ids}


def store_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """How the store fingerprint ``new`` differs from ``old`` (None: the same store). The
    frames are compared where both record their sha256 (a store built in memory has none)."""
    if old.get("utterance_ids_sha256") != new.get("utterance_ids_sha256"):
        return "its utterance ids differ"
    if old.get("table_sha256") != new.get("table_sha256"):
        return "its labels, folds or speakers differ"
    a, b = old.get("frames_sha256") or {}, new.get("frames_sha256") or {}
    changed = sorted(m for m in set(a) & set(b) if a[m] and b[m] and a[m] != b[m])
    if changed or (a and b and set(a) != set(b)):
        return f"its {', '.join(changed) or 'modalities'} features differ (frames_sha256)"
    return None


def run_identity(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that make two configs one run: the config without the keys that may
    differ between the jobs of one run (``protocol.folds``, ``device``) and without what is
    only recorded, not trained on (``log``: a resume may switch TensorBoard on; configs
    written before the section existed have none)."""
    d = json.loads(json.dumps(cfg_dict))
    d.get("protocol", {}).pop("folds", None)
    d.pop("device", None)
    d.pop("log", None)
    return d


def lock_fold(run_dir: Path, fold: int) -> FileLock:
    """The exclusive right to train ``fold`` into ``run_dir``: a ``FileLock`` on
    ``fold<k>/lock``, released (and the file removed) when the fold ends. A second process on
    the same fold (a rerun while the first still runs, or left-over ``--jobs`` processes) is
    refused with a ``TrainError`` naming the holder, instead of writing the same checkpoints."""
    folder = Path(run_dir) / f"fold{fold}"
    try:
        return FileLock(folder / "lock")
    except LockBusy as e:
        raise TrainError(f"{folder}: fold {fold} is being trained by pid {e.pid}; wait for it to end, or stop it "
                         "(a rerun resumes from its last checkpoint)") from None
    except PathError as e:
        raise TrainError(str(e)) from None


def read_fold_result(p: Path) -> dict[str, Any]:
    """A fold's ``metrics.json``, checked; ``TrainError`` naming the file when it is not one,
    or one of another run format."""
    try:
        r = json.loads(Path(p).read_text())
        if isinstance(r, dict) and "conditions" in r and r.get("format") != RUN_FORMAT:
            raise TrainError(f"{p}: is a fold's result of run format {r.get('format', 1)}, this version reads format "
                             f"{RUN_FORMAT}; train the run again, or use the cm-arr version that wrote it")
        lacking = [k for k in FOLD_RESULT_KEYS if k not in r] if isinstance(r, dict) else list(FOLD_RESULT_KEYS)
        if lacking:
            raise KeyError(", ".join(lacking))
        int(r["fold"])
        int(r["processes"])
        if not isinstance(r["conditions"], dict) or not r["conditions"]:
            raise ValueError("no conditions")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{p}: not a fold's metrics.json ({type(e).__name__}: {e}); remove it and run the same "
                         "cm-arr-train command again: the fold is tested again from its best checkpoint") from None
    return r


def write_fold_result(folder: Path, result: Mapping[str, Any]) -> None:
    """Write a fold's ``metrics.json`` (``result`` and the run format) whole."""
    tmp = folder / f"metrics.json.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"format": RUN_FORMAT, **result}, indent=1))
        os.replace(tmp, folder / "metrics.json")
    finally:
        tmp.unlink(missing_ok=True)


def finished_folds(run_dir: Path) -> list[int]:
    """The folds of ``run_dir`` that have a ``fold<k>/metrics.json``."""
    out = []
    for p in Path(run_dir).glob("fold*/metrics.json"):
        k = p.parent.name[len("fold"):]
        if k.isdigit():
            out.append(int(k))
    return sorted(out)


def collect_fold_results(run_dir: Path, folds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The checked ``metrics.json`` of each of ``folds`` that ``run_dir`` holds."""
    out = {}
    for k in folds:
        p = Path(run_dir) / f"fold{k}" / "metrics.json"
        if p.exists():
            out[k] = read_fold_result(p)
    return out


def check_same_processes(results: Mapping[Any, Mapping[str, Any]], where: str) -> None:
    """Folds trained with different numbers of processes saw different batches per step
    (``optim.batch_size`` is per process): not one protocol, so not averaged together."""
    procs = {k: int(r["processes"]) for k, r in results.items()}
    if len(set(procs.values())) > 1:
        raise TrainError(f"{where}: folds trained with different numbers of processes (optim.batch_size is per "
                         f"process): {', '.join(f'fold {k}: {n}' for k, n in sorted(procs.items()))}; train them "
                         "alike before combining them")


def summary_document(cfg: TrainConfig, fold_results: Mapping[int, Mapping[str, Any]], store: Mapping[str, Any],
                     model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``metrics.json`` document: per fold and condition scores, their summary,
    best epochs, part sizes, the store, the configs, and the paper's numbers where they apply."""
    per_fold = {k: r["conditions"] for k, r in fold_results.items()}
    extra = {"variant": cfg.variant, "best_epochs": {str(k): r["best_epoch"] for k, r in fold_results.items()},
             "sizes": {str(k): {s: r[f"n_{s}"] for s in ("train", "val", "test")} for k, r in fold_results.items()},
             "store": dict(store), "config": cfg.to_dict(), "model_config": dict(model_config)}
    paper = paper_reference(store.get("corpus"), store.get("label_counts"), cfg.variant)
    if paper is not None:
        extra["paper"] = paper
    return build_metrics(per_fold, LABELS, extra)


def read_run_yaml(path: Path) -> dict:
    """A RUN_DIR YAML file that must be a mapping; ``TrainError`` naming it otherwise."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise TrainError(f"{path}: cannot be read ({str(e).splitlines()[0]}); this RUN_DIR's record of its "
                         "settings is damaged: restore it or use another --out") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise TrainError(f"{path}: expected a mapping, found a {type(doc).__name__} (damaged?); restore it or use "
                         "another --out")
    return doc


def read_run_record(path: Path) -> dict:
    """A RUN_DIR's ``model_config.yaml`` (run format, model config, store), checked to be of
    this version's run format and to hold a store mapping; ``TrainError`` naming it otherwise."""
    doc = read_run_yaml(path)
    if doc.get("format") != RUN_FORMAT:
        raise TrainError(f"{path}: is the record of a run of format {doc.get('format', 1)}, this version reads "
                         f"format {RUN_FORMAT}; use another --out, or the cm-arr version that wrote it")
    if not isinstance(doc.get("store"), dict):
        raise TrainError(f"{path}: 'store' is not a mapping (damaged?); restore it or use another --out")
    return doc


def write_run_config(run_dir: Path, cfg: TrainConfig, model_cfg: Mapping[str, Any], store: Mapping[str, Any]) -> None:
    """Write RUN_DIR/config.yaml (the resolved TrainConfig, usable as ``--config``) and
    RUN_DIR/model_config.yaml (the run format, the CMARRConfig it gives and the store it ran
    on), or check that existing ones match (resume, concurrent fold jobs)."""
    path = run_dir / "config.yaml"
    side = run_dir / "model_config.yaml"
    if path.exists():
        if run_identity(read_run_yaml(path)) != run_identity(cfg.to_dict()):
            raise TrainError(f"{run_dir}: holds a run with another config (see its config.yaml); use another --out")
        if side.exists():
            diff = store_difference(read_run_record(side)["store"], store)
            if diff:
                raise TrainError(f"{run_dir}: holds a run on another store than {store['path']} ({diff}); "
                                 "use another --out")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"format": RUN_FORMAT, "model": dict(model_cfg), "store": dict(store)}
    for p, text in ((side, yaml.safe_dump(record, sort_keys=False)),
                    (path, "# resolved configuration of this run: cm-arr-train --config THIS_FILE reruns it\n"
                           + cfg.to_yaml())):
        _write_atomic(p, text)


def _write_atomic(p: Path, text: str) -> None:
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
