"""Figures of a training run: confusion matrices, training curves and the t-SNE of Fig. 5.

One set of writers for every figure the project draws: the demo's report
(:mod:`cmarr.pipelines.demo.report`) and ``cm-arr-results RUN_DIR --plots``
(:func:`write_run_plots`) both call them. Each writer takes arrays or documents already in
memory (the trainer's ``metrics.json`` documents, its ``fold<k>/log.csv`` files read by
:func:`read_training_logs`, the arrays of :func:`cmarr.pipelines.reps.collect_reps`) and
writes one PNG file, drawn with matplotlib's Agg backend (no display) and put in place whole
(a temporary file renamed), so an interrupted run never leaves half a figure.

Legend: ``C`` classes, ``N`` real representations, ``M`` reconstructed ones, ``d`` width.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cmarr.extract.base import LABELS, MODALITIES

from .conditions import MISSING_CONDITIONS

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
    """Write ``fig`` to ``path`` whole: drawn into a temporary file beside it, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _plt().close(fig)
    return path


def display_name(variant: str) -> str:
    """The name of ``variant`` in tables and figures."""
    return VARIANT_NAMES.get(variant, variant)


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
            ax.set_title(f"{display_name(v)}, {titles.get(g, g)}\nUAR {100 * uar:.1f} %", fontsize=9)
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
            try:
                out[int(k)] = pd.read_csv(p)
            except ValueError as e:  # empty, truncated, not CSV or not UTF-8
                raise ValueError(f"{p}: not a training log ({str(e).splitlines()[0]})") from None
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
        axes[0][j].set_title(display_name(v), fontsize=10)
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
            ax.set_title(f"{display_name(v)}: {m} (real {len(real)}, recon. {len(recon)})", fontsize=9)
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



# --------------------------------------------------------------------------------------
# the figures of one RUN_DIR (cm-arr-results RUN_DIR --plots)

#: What :func:`write_run_plots` writes into ``RUN_DIR/plots/``, by kind.
RUN_PLOTS = {"confusion": "confusion.png", "curves": "training_curves.png", "tsne": "tsne.png"}


@dataclass(frozen=True)
class RunPlots:
    """What the figures of one RUN_DIR are drawn from, checked before any is drawn
    (:meth:`read`): ``variant`` and ``seed`` (config.yaml), the finished ``folds`` (those
    with a ``fold<k>/metrics.json``), and for the t-SNE the ``store`` and the ``tsne_fold``
    (None: no t-SNE)."""

    run_dir: Path
    variant: str
    seed: int
    folds: tuple[int, ...]
    store: Path | None = None
    tsne_fold: int | None = None

    @classmethod
    def read(cls, run_dir: str | os.PathLike, tsne: bool = False, features: str | os.PathLike | None = None,
             tsne_fold: int | None = None) -> "RunPlots":
        """Check ``run_dir`` (``TrainError`` naming it and what is wrong: not a cm-arr-train
        RUN_DIR, no finished fold, the t-SNE's fold not finished or its store not found).
        ``features``: the store the run trained on (default: the path in model_config.yaml;
        give it when the store has moved). ``tsne_fold``: default the first finished fold."""
        from .errors import TrainError
        from .run_dir import finished_folds, read_run_record, read_run_yaml

        d = Path(run_dir)
        if not (d / "config.yaml").is_file():
            raise TrainError(f"{d}: not a cm-arr-train RUN_DIR (no config.yaml)")
        cfg = read_run_yaml(d / "config.yaml")
        folds = tuple(finished_folds(d))
        if not folds:
            raise TrainError(f"{d}: no finished fold (no fold*/metrics.json); the figures need a fold trained and "
                             "tested: run that RUN_DIR's cm-arr-train command again (it resumes)")
        store, fold = None, None
        if tsne:
            fold = folds[0] if tsne_fold is None else int(tsne_fold)
            if fold not in folds:
                raise TrainError(f"{d}: fold {fold} is not finished (no fold{fold}/metrics.json); finished folds: "
                                 f"{', '.join(map(str, folds))}")
            if features is None:
                side = d / "model_config.yaml"
                if not side.is_file():
                    raise TrainError(f"{d}: not a complete cm-arr-train RUN_DIR (no model_config.yaml)")
                features = read_run_record(side)["store"].get("path")
            store = Path(features)
            if not store.is_file():
                raise TrainError(f"{d}: its feature store {store} is not there (moved?); give the store the run "
                                 "trained on with --features")
        return cls(d, str(cfg.get("variant", "cm-arr")), int(cfg.get("seed", 0)), folds, store, fold)


def write_run_plots(plan: RunPlots) -> dict[str, Path]:
    """Draw the figures of ``plan``'s RUN_DIR into ``RUN_DIR/plots/`` (:data:`RUN_PLOTS`),
    with the writers above (the demo's); returns their paths by kind.

    - confusion: the test confusion matrices of the finished folds, summed over them: the
      full condition {s, v, t} and the six missing conditions together. Built from each
      fold's ``metrics.json``, not the run's: the run's is written when a command ends, so an
      interrupted run's finished folds would be missing from it.
    - curves: training loss and validation UAR (average of the conditions) per epoch, one
      line per fold with a log.csv (unfinished folds too: how far they got).
    - tsne (``plan.tsne_fold`` set): the paper's Fig. 5 for the test part of that fold,
      from its ``best.pt`` on the CPU, under the six missing conditions
      (:func:`cmarr.pipelines.reps.collect_reps`), embedded with the run's seed. t-SNE runs on
      one thread: seconds for a small fold, minutes for an IEMOCAP session.
    """
    from cmarr.extract.base import LABELS as labels

    from .metrics import build_metrics
    from .run_dir import collect_fold_results

    out = plan.run_dir / "plots"
    results = collect_fold_results(plan.run_dir, plan.folds)  # TrainError naming a damaged metrics.json
    doc = build_metrics({k: r["conditions"] for k, r in results.items()}, labels)
    paths = {"confusion": write_confusion_figure(out / RUN_PLOTS["confusion"],
                                                 {plan.variant: confusion_totals(doc)})}
    paths["curves"] = write_training_curves(out / RUN_PLOTS["curves"], {plan.variant: read_training_logs(plan.run_dir)})
    if plan.tsne_fold is not None:
        from .data import StoreData
        from .reps import collect_reps

        data = StoreData(plan.store)
        best = plan.run_dir / f"fold{plan.tsne_fold}" / "best.pt"
        reps = {plan.variant: {c: collect_reps(best, data, fold=plan.tsne_fold, condition=c)
                               for c in MISSING_CONDITIONS}}
        paths["tsne"] = write_tsne_figure(out / RUN_PLOTS["tsne"], tsne_panels(reps), seed=plan.seed,
                                          title=f"fold {plan.tsne_fold} test session")
    return paths


__all__ = ["VARIANT_NAMES", "EMOTION_COLOURS", "display_name", "confusion_totals", "write_confusion_figure",
           "read_training_logs", "write_training_curves", "tsne_panels", "tsne_embed", "write_tsne_figure",
           "RUN_PLOTS", "RunPlots", "write_run_plots"]
