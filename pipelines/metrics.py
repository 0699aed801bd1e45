"""Metrics of the protocol (Sec. 4.2) and the Table 2 layout.

WAR = weighted average recall = accuracy. UAR = unweighted average recall = the mean over
classes of per-class recall; a class absent from a fold's true labels has no recall and is
left out of that mean (and the row of the confusion matrix is all zero).

Per fold and condition: WAR, UAR, confusion matrix (rows true, columns predicted, in the
order of ``LABELS``), the number of utterances scored and the number with no input in that
condition (an utterance that lacks every modality of a condition cannot be scored; it is
counted, never silently dropped). "Avg" is the plain mean over the six missing conditions
(Table 2); mean and std are over folds (std with ``ddof=1``, 0 for a single fold).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

#: Row order of Table 2: the six missing conditions, their average, then the full one.
MISSING_CONDITIONS = ("t", "s", "v", "vt", "sv", "st")
FULL_CONDITION = "svt"
TABLE_ROWS = MISSING_CONDITIONS + ("avg", FULL_CONDITION)
ROW_NAMES = {"t": "{t}", "s": "{s}", "v": "{v}", "vt": "{v, t}", "sv": "{s, v}", "st": "{s, t}",
             "avg": "Avg.", "svt": "{s, v, t}"}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def war_uar(cm: np.ndarray) -> tuple[float, float]:
    """WAR (accuracy) and UAR (mean recall over classes that occur) from a confusion matrix."""
    total = cm.sum()
    if total == 0:
        raise ValueError("no utterances to score")
    war = float(np.trace(cm) / total)
    support = cm.sum(axis=1)
    recalls = np.diag(cm)[support > 0] / support[support > 0]
    return war, float(recalls.mean())


def score(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_no_input: int = 0,
          n_reduced: int = 0) -> dict[str, Any]:
    """WAR, UAR and confusion of one condition. ``n_no_input``: utterances not scored (no
    input in the condition); ``n_reduced``: scored with fewer modalities than the condition
    names, because the store lacks one of them."""
    cm = confusion(y_true, y_pred, num_classes)
    war, uar = war_uar(cm)
    return {"war": war, "uar": uar, "confusion": cm.tolist(), "n": int(cm.sum()), "n_no_input": int(n_no_input),
            "n_reduced": int(n_reduced)}


def with_average(per_condition: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Adds the "avg" row: plain mean of WAR and UAR over the six missing conditions."""
    out = {k: dict(v) for k, v in per_condition.items()}
    if all(c in out for c in MISSING_CONDITIONS):
        out["avg"] = {"war": float(np.mean([out[c]["war"] for c in MISSING_CONDITIONS])),
                      "uar": float(np.mean([out[c]["uar"] for c in MISSING_CONDITIONS]))}
    return out


def summarize(per_fold: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Mean and std over folds for every row present in all folds (WAR, UAR in [0, 1])."""
    folds = list(per_fold)
    if not folds:
        raise ValueError("no folds to summarize")
    rows = [r for r in TABLE_ROWS if all(r in per_fold[f] for f in folds)]
    out: dict[str, Any] = {}
    for r in rows:
        entry: dict[str, Any] = {}
        for k in ("war", "uar"):
            vals = np.array([per_fold[f][r][k] for f in folds], dtype=np.float64)
            entry[f"{k}_mean"] = float(vals.mean())
            entry[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        if r != "avg":
            cms = [np.asarray(per_fold[f][r]["confusion"]) for f in folds]
            entry["confusion_total"] = np.sum(cms, axis=0).tolist()
        out[r] = entry
    return out


def build_metrics(per_fold: Mapping[Any, Mapping[str, Any]], labels: Sequence[str],
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``metrics.json`` document from per-fold condition scores."""
    folds = {str(k): with_average(v) for k, v in sorted(per_fold.items(), key=lambda kv: int(kv[0]))}
    doc = {"labels": list(labels), "conditions": list(TABLE_ROWS), "folds": folds,
           "summary": summarize(folds)}
    if extra:
        doc.update(extra)
    return doc


def results_markdown(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Table 2 layout: conditions as rows, WAR / UAR (%) as columns, mean ± std over folds."""
    summary = metrics["summary"]
    n_folds = len(metrics["folds"])
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines.append(f"WAR / UAR in %, mean ± std over {n_folds} fold{'s' if n_folds != 1 else ''} "
                 f"({', '.join(metrics['folds'])}).")
    lines.append("")
    lines.append("| Avail. | WAR | UAR |")
    lines.append("|---|---:|---:|")
    for r in TABLE_ROWS:
        if r not in summary:
            continue
        e = summary[r]
        lines.append(f"| {ROW_NAMES[r]} | {100 * e['war_mean']:.2f} ± {100 * e['war_std']:.2f} "
                     f"| {100 * e['uar_mean']:.2f} ± {100 * e['uar_std']:.2f} |")
    for key, what in (("n_no_input", "Utterances without any input in a condition (not scored there)"),
                      ("n_reduced", "Utterances scored with fewer modalities than the condition names "
                                    "(the store lacks one)")):
        counts = {c: sum(int(metrics["folds"][f].get(c, {}).get(key, 0)) for f in metrics["folds"])
                  for c in TABLE_ROWS if c != "avg"}
        counts = {c: n for c, n in counts.items() if n}
        if counts:
            lines.append("")
            lines.append(f"{what}: " + ", ".join(f"{ROW_NAMES[c]} {n}" for c, n in counts.items()) + ".")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, metrics: Mapping[str, Any], title: str | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mj = out / "metrics.json"
    md = out / "results.md"
    tmp = mj.with_name(f"metrics.json.tmp-{os.getpid()}")  # concurrent fold jobs write here too
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(mj)
    md.write_text(results_markdown(metrics, title))
    return mj, md


def rich_table(metrics: Mapping[str, Any], title: str = "Results"):
    """The same table as ``results.md`` for printing with rich."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("Avail.")
    t.add_column("WAR %", justify="right")
    t.add_column("UAR %", justify="right")
    for r in TABLE_ROWS:
        if r not in metrics["summary"]:
            continue
        e = metrics["summary"][r]
        t.add_row(ROW_NAMES[r], f"{100 * e['war_mean']:.2f} ± {100 * e['war_std']:.2f}",
                  f"{100 * e['uar_mean']:.2f} ± {100 * e['uar_std']:.2f}")
    return t
