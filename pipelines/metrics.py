"""Metrics of the protocol (Sec. 4.2) and the Table 2 layout.

WAR = weighted average recall = accuracy. UAR = unweighted average recall = the mean over
classes of per-class recall; a class absent from a fold's true labels has no recall and is
left out of that mean (and the row of the confusion matrix is all zero).

Per fold and condition: WAR, UAR, confusion matrix (rows true, columns predicted, in the
order of ``LABELS``), the number of utterances scored and the number with no input in that
condition (an utterance that lacks every modality of a condition cannot be scored; it is
counted, never silently dropped). "Avg" is the plain mean over the six missing conditions
(Table 2); mean and std are over folds (std with ``ddof=1``, 0 for a single fold).

Runs that differ only in ``seed`` (each over the same folds) are summarised by
:func:`summarize_seeds`: per fold the mean over seeds, mean ± std over all fold x seed runs
("summary"), and mean ± std over seeds of each seed's mean over folds ("seed_summary").

A run on the paper's 4-class set of IEMOCAP or MSP-IMPROV (the store's corpus and its
per-class counts equal Table 1's) carries the paper's reported numbers for its variant
(``PAPER_RESULTS``: Table 2 for CM-ARR, Table 3 for the ablations on IEMOCAP) in
``metrics.json`` ("paper"), and ``results.md`` and the printed table show them beside the
run's own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .conditions import FULL_CONDITION, MISSING_CONDITIONS

#: Row order of Table 2: the six missing conditions, their average, then the full one.
TABLE_ROWS = MISSING_CONDITIONS + ("avg", FULL_CONDITION)
ROW_NAMES = {"t": "{t}", "s": "{s}", "v": "{v}", "vt": "{v, t}", "sv": "{s, v}", "st": "{s, t}",
             "avg": "Avg.", "svt": "{s, v, t}"}


def _rows(*pairs: tuple[float, float]) -> dict[str, tuple[float, float]]:
    return dict(zip(TABLE_ROWS, pairs))


#: WAR / UAR (%) the paper reports, by (corpus, variant): Table 2 ("Ours") and Table 3
#: (ablations, IEMOCAP only; no full-modality row there).
PAPER_RESULTS: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("iemocap", "cm-arr"): _rows((69.74, 70.92), (74.15, 75.38), (54.06, 52.42), (73.04, 74.09), (75.51, 76.38),
                                 (78.95, 79.70), (70.90, 71.48), (79.86, 81.06)),
    ("msp-improv", "cm-arr"): _rows((63.57, 61.49), (55.55, 50.87), (62.04, 51.01), (68.47, 65.88), (63.84, 54.25),
                                    (69.49, 66.85), (63.82, 58.39), (72.37, 69.69)),
    ("iemocap", "baseline"): _rows((66.63, 67.15), (55.57, 57.75), (42.91, 37.54), (68.71, 68.94), (61.10, 62.84),
                                   (75.34, 76.61), (61.71, 61.80)),
    ("iemocap", "no-udcl"): _rows((69.44, 70.20), (71.90, 72.67), (50.24, 48.35), (71.59, 72.90), (72.06, 72.96),
                                  (76.51, 78.04), (68.62, 69.18)),
    ("iemocap", "no-spcl"): _rows((69.49, 70.45), (71.89, 72.99), (51.14, 48.56), (72.55, 73.33), (73.37, 73.86),
                                  (77.80, 78.83), (69.37, 69.67)),
    ("iemocap", "no-attention"): _rows((68.71, 69.75), (71.68, 72.72), (50.00, 47.76), (70.72, 71.53), (72.10, 73.47),
                                       (76.77, 77.91), (68.33, 68.85)),
    ("iemocap", "point"): _rows((66.71, 67.96), (70.48, 71.74), (50.35, 48.99), (71.06, 72.19), (72.65, 73.26),
                                (75.53, 76.67), (67.79, 68.46)),
}


def paper_reference(corpus: str | None, label_counts: Mapping[str, int] | None, variant: str) -> dict[str, Any] | None:
    """The paper's numbers for a run of ``variant`` on a store of ``corpus`` with these
    per-class counts, when that store is the paper's 4-class set (Table 1's counts) and the
    paper reports the variant there; else None."""
    from cmarr.extract.corpora.manifest import PAPER_COUNTS

    rows = PAPER_RESULTS.get((str(corpus), str(variant)))
    if rows is None or not label_counts or dict(label_counts) != PAPER_COUNTS.get(str(corpus)):
        return None
    table = "Table 2" if variant == "cm-arr" else "Table 3"
    return {"source": f"CM-ARR paper, {table} ({'IEMOCAP' if corpus == 'iemocap' else 'MSP-IMPROV'}, "
                      f"{'Ours' if variant == 'cm-arr' else variant})",
            "rows": {r: {"war": w / 100, "uar": u / 100} for r, (w, u) in rows.items()}}


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


def summarize_seeds(per_seed: Mapping[Any, Mapping[Any, Mapping[str, Mapping[str, Any]]]]) -> dict[str, Any]:
    """Runs of one protocol that differ only in seed, each seed over the same folds.

    ``per_seed``: seed -> fold -> row -> ``{"war", "uar", "confusion", "n", ...}`` (rows as in
    ``build_metrics``' "folds", "avg" included). Returns

    - ``"folds"``: fold -> row -> WAR and UAR averaged over seeds, their std over seeds
      (``war_std``, ``uar_std``), the confusion summed over seeds, and the counts ``n``,
      ``n_no_input``, ``n_reduced`` of one seed (the test data is the same for every seed);
    - ``"summary"``: row -> mean and std (ddof=1) over all fold x seed runs, the confusion
      summed over them (``confusion_total``), and ``n_runs``;
    - ``"seed_summary"``: row -> mean and std (ddof=1, 0 for one seed) over seeds of each
      seed's mean over folds, and ``n_seeds``.

    ``ValueError`` when the seeds do not cover the same folds."""
    seeds = list(per_seed)
    if not seeds:
        raise ValueError("no seeds to summarize")
    folds = list(per_seed[seeds[0]])
    for s in seeds:
        if set(per_seed[s]) != set(folds):
            raise ValueError(f"seed {s} covers folds {sorted(per_seed[s], key=int)}, seed {seeds[0]} covers "
                             f"{sorted(folds, key=int)}; every seed must cover the same folds")
    rows = [r for r in TABLE_ROWS if all(r in per_seed[s][f] for s in seeds for f in folds)]
    folds_out: dict[str, Any] = {str(f): {} for f in folds}
    summary: dict[str, Any] = {}
    seed_summary: dict[str, Any] = {}
    for r in rows:
        entry: dict[str, Any] = {"n_runs": len(seeds) * len(folds)}
        seed_entry: dict[str, Any] = {"n_seeds": len(seeds)}
        for k in ("war", "uar"):
            vals = np.array([[per_seed[s][f][r][k] for f in folds] for s in seeds], dtype=np.float64)  # (S, F)
            entry[f"{k}_mean"] = float(vals.mean())
            entry[f"{k}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            fold_means = vals.mean(axis=1)  # (S,) each seed's mean over folds
            seed_entry[f"{k}_mean"] = float(fold_means.mean())
            seed_entry[f"{k}_std"] = float(fold_means.std(ddof=1)) if len(seeds) > 1 else 0.0
            for j, f in enumerate(folds):
                e = folds_out[str(f)].setdefault(r, {})
                e[k] = float(vals[:, j].mean())
                e[f"{k}_std"] = float(vals[:, j].std(ddof=1)) if len(seeds) > 1 else 0.0
        if r != "avg":
            cms = {f: np.sum([np.asarray(per_seed[s][f][r]["confusion"]) for s in seeds], axis=0) for f in folds}
            entry["confusion_total"] = np.sum(list(cms.values()), axis=0).tolist()
            for f in folds:
                e = folds_out[str(f)][r]
                e["confusion"] = cms[f].tolist()
                for key in ("n", "n_no_input", "n_reduced"):
                    if key in per_seed[seeds[0]][f][r]:
                        e[key] = int(per_seed[seeds[0]][f][r][key])
        summary[r] = entry
        seed_summary[r] = seed_entry
    return {"folds": folds_out, "summary": summary, "seed_summary": seed_summary}


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
    """Table 2 layout: conditions as rows, WAR / UAR (%) as columns, mean ± std over folds.
    A document of several seeds (``seed_summary``, see :func:`summarize_seeds`) gets two more
    columns: mean ± std over seeds of each seed's mean over folds."""
    summary = metrics["summary"]
    n_folds = len(metrics["folds"])
    seeds = metrics.get("seed_summary") and metrics.get("seeds")
    lines = []
    if title:
        lines += [f"# {title}", ""]
    fold_text = f"{n_folds} fold{'s' if n_folds != 1 else ''} ({', '.join(metrics['folds'])})"
    if seeds:
        n_runs = len(seeds) * n_folds
        lines.append(f"WAR / UAR in %, {len(seeds)} seeds ({', '.join(map(str, seeds))}) x {fold_text}. "
                     f"WAR, UAR: mean ± std over the {n_runs} fold x seed runs; over seeds: mean ± std over "
                     "the seeds of each seed's mean over folds.")
    else:
        lines.append(f"WAR / UAR in %, mean ± std over {fold_text}.")
    paper = (metrics.get("paper") or {}).get("rows")
    lines.append("")
    lines.append("| Avail. | WAR | UAR |" + (" WAR over seeds | UAR over seeds |" if seeds else "")
                 + (" paper WAR | paper UAR |" if paper else ""))
    lines.append("|---|---:|---:|" + ("---:|---:|" if seeds else "") + ("---:|---:|" if paper else ""))
    for r in TABLE_ROWS:
        if r not in summary:
            continue
        e = summary[r]
        line = (f"| {ROW_NAMES[r]} | {100 * e['war_mean']:.2f} ± {100 * e['war_std']:.2f} "
                f"| {100 * e['uar_mean']:.2f} ± {100 * e['uar_std']:.2f} |")
        if seeds:
            se = metrics["seed_summary"].get(r)
            line += (f" {100 * se['war_mean']:.2f} ± {100 * se['war_std']:.2f} "
                     f"| {100 * se['uar_mean']:.2f} ± {100 * se['uar_std']:.2f} |") if se else " - | - |"
        if paper:
            ref = paper.get(r)
            line += f" {100 * ref['war']:.2f} | {100 * ref['uar']:.2f} |" if ref else " - | - |"
        lines.append(line)
    if paper:
        lines.append("")
        lines.append(f"paper: {metrics['paper']['source']}, as reported (mean over its folds).")
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

    paper = (metrics.get("paper") or {}).get("rows")
    seeds = metrics.get("seed_summary") and metrics.get("seeds")
    t = Table(title=title, caption=f"paper: {metrics['paper']['source']}" if paper else None)
    t.add_column("Avail.")
    t.add_column("WAR %", justify="right")
    t.add_column("UAR %", justify="right")
    if seeds:
        t.add_column(f"WAR % over {len(seeds)} seeds", justify="right")
        t.add_column(f"UAR % over {len(seeds)} seeds", justify="right")
    if paper:
        t.add_column("paper WAR", justify="right")
        t.add_column("paper UAR", justify="right")
    for r in TABLE_ROWS:
        if r not in metrics["summary"]:
            continue
        e = metrics["summary"][r]
        cells = [ROW_NAMES[r], f"{100 * e['war_mean']:.2f} ± {100 * e['war_std']:.2f}",
                 f"{100 * e['uar_mean']:.2f} ± {100 * e['uar_std']:.2f}"]
        if seeds:
            se = metrics["seed_summary"].get(r)
            cells += [f"{100 * se['war_mean']:.2f} ± {100 * se['war_std']:.2f}",
                      f"{100 * se['uar_mean']:.2f} ± {100 * se['uar_std']:.2f}"] if se else ["-", "-"]
        if paper:
            ref = paper.get(r)
            cells += [f"{100 * ref['war']:.2f}", f"{100 * ref['uar']:.2f}"] if ref else ["-", "-"]
        t.add_row(*cells)
    return t
