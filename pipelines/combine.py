"""Per-fold RUN_DIRs of separate jobs combined into one result (``cm-arr-results``,
:mod:`cmarr.pipelines.cli.results`).

Each RUN_DIR was written by ``cm-arr-train --folds k`` (one or more folds each). The runs
must share one config (apart from folds, device and seed) and one store; a fold present in
two RUN_DIRs of one seed is an error. Writes ``metrics.json`` and ``results.md`` (Table 2
layout) into ``--out`` and prints the table.

Runs of several seeds (configs that differ only in ``seed``; each seed must cover the same
folds) are combined as repeats: ``metrics.json`` then holds ``seeds`` (the list),
``per_seed`` (seed -> that seed's folds, summary, best epochs, sizes and RUN_DIRs),
``folds`` (per fold the mean over seeds), ``summary`` (mean ± std over all fold x seed runs),
``seed_summary`` (mean ± std over seeds of each seed's mean over folds) and the ``config``
of the first seed; see :func:`cmarr.pipelines.metrics.summarize_seeds`. ``results.md``
names the seeds and folds and shows both spreads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .config import config_from_dict, with_overrides
from .metrics import summarize_seeds, write_results
from .run_dir import (
    check_same_processes,
    read_fold_result,
    read_run_record,
    read_run_yaml,
    run_identity,
    store_difference,
    summary_document,
)


class CombineError(Exception):
    """RUN_DIRs that cannot be combined; ``str(e)`` names the RUN_DIR and why."""


def combine_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, overwrite: bool = False,
                 allow_unfinished: bool = False) -> dict:
    """Merge the finished folds of ``run_dirs``; write metrics.json / results.md in ``out_dir``.

    Refuses a RUN_DIR with an unfinished fold (a fold folder without metrics.json, or a fold
    its config asks for that is not there) unless ``allow_unfinished``, configs that differ in
    more than folds, device and seed, seeds that do not cover the same folds, folds trained
    with different numbers of processes, and an ``out_dir`` that already holds results unless
    ``overwrite``."""
    if not run_dirs:
        raise CombineError("no RUN_DIRs given")
    held = [n for n in ("metrics.json", "results.md") if (Path(out_dir) / n).exists()]
    if held and not overwrite:
        raise CombineError(f"{out_dir}: already holds {' and '.join(held)}; choose another --out, or pass --overwrite")
    results: dict[int, dict[int, dict]] = {}  # seed -> fold -> the fold's metrics.json
    dirs_of: dict[int, list[str]] = {}  # seed -> its RUN_DIRs
    first_cfg, first_dir, store, model_cfg = None, None, None, None
    for d in map(Path, run_dirs):
        cfg_path = d / "config.yaml"
        if not cfg_path.is_file():
            raise CombineError(f"{d}: not a cm-arr-train RUN_DIR (no config.yaml)")
        cfg_doc = read_run_yaml(cfg_path)
        side_path = d / "model_config.yaml"
        if not side_path.is_file():
            raise CombineError(f"{d}: not a complete cm-arr-train RUN_DIR (no model_config.yaml)")
        side = read_run_record(side_path)
        if first_cfg is None:
            first_cfg, first_dir = cfg_doc, d
            store, model_cfg = dict(side["store"]), side.get("model", {})
        else:
            differs = _config_difference(run_identity(first_cfg), run_identity(cfg_doc))
            if differs:
                raise CombineError(f"{d}: its config differs from {first_dir}'s in {', '.join(differs)} (only "
                                   "folds, device and seed may differ)")
            diff = store_difference(store, side["store"])
            if diff:
                raise CombineError(f"{d}: was trained on another store than {first_dir} ({diff})")
        found = sorted(d.glob("fold*/metrics.json"))
        if not found:
            raise CombineError(f"{d}: has no finished fold (no fold*/metrics.json)")
        unfinished = sorted(f.name for f in d.glob("fold*") if f.is_dir() and not (f / "metrics.json").exists())
        protocol = cfg_doc.get("protocol") if isinstance(cfg_doc.get("protocol"), dict) else {}
        asked = protocol.get("folds") or side["store"]["folds"]  # none listed: every fold
        unfinished += [f"fold{k}" for k in asked if not (d / f"fold{k}").exists()]
        if unfinished and not allow_unfinished:
            raise CombineError(f"{d}: {', '.join(sorted(set(unfinished)))} not finished (no metrics.json); finish "
                               "them (run that RUN_DIR's cm-arr-train command again: it resumes) or pass "
                               "--allow-unfinished to combine the finished folds only")
        seed = int(cfg_doc.get("seed", 0))
        dirs_of.setdefault(seed, []).append(str(d))
        for p in found:
            r = read_fold_result(p)  # TrainError naming the file
            k = int(r["fold"])
            if k in results.setdefault(seed, {}):
                raise CombineError(f"{d}: fold {k} is also in another RUN_DIR"
                                   f"{f' of seed {seed}' if len(results) > 1 else ''}; give each fold once")
            results[seed][k] = r
    seeds = sorted(results)
    fold_sets = {s: tuple(sorted(results[s])) for s in seeds}
    if len(set(fold_sets.values())) > 1:
        raise CombineError("the seeds cover different folds (" + "; ".join(
            f"seed {s}: {', '.join(map(str, f))}" for s, f in fold_sets.items()) + "); every seed must cover the same "
            "folds to be averaged over seeds")
    cfg = config_from_dict(first_cfg, str(first_dir / "config.yaml"))
    cfg_folds = fold_sets[seeds[0]]
    cfg = with_overrides(cfg, {"protocol.folds": list(cfg_folds)})
    check_same_processes({f"{k}" + (f" (seed {s})" if len(seeds) > 1 else ""): r
                          for s in seeds for k, r in results[s].items()}, "the RUN_DIRs")
    title = f"{cfg.variant}, folds {', '.join(map(str, cfg_folds))}"
    if len(seeds) == 1:
        metrics = summary_document(with_overrides(cfg, {"seed": seeds[0]}), results[seeds[0]], store, model_cfg)
        metrics["combined_from"] = [str(d) for d in run_dirs]
        write_results(out_dir, metrics, title=f"{title} (combined)")
        return metrics
    per_seed = {s: summary_document(with_overrides(cfg, {"seed": s}), results[s], store, model_cfg) for s in seeds}
    pooled = summarize_seeds({s: per_seed[s]["folds"] for s in seeds})
    metrics = {k: v for k, v in per_seed[seeds[0]].items() if k not in ("folds", "summary", "best_epochs", "sizes")}
    metrics.update(pooled)
    metrics["seeds"] = seeds
    metrics["per_seed"] = {str(s): {"folds": per_seed[s]["folds"], "summary": per_seed[s]["summary"],
                                    "best_epochs": per_seed[s]["best_epochs"], "sizes": per_seed[s]["sizes"],
                                    "run_dirs": dirs_of[s]} for s in seeds}
    metrics["combined_from"] = [str(d) for d in run_dirs]
    write_results(out_dir, metrics, title=f"{title}, seeds {', '.join(map(str, seeds))} (combined)")
    return metrics


def _config_difference(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config documents, ``seed`` left out."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}{key}"
        if name == "seed":
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_difference(va, vb, f"{name}.")
        elif va != vb or (key in a) != (key in b):
            out.append(name)
    return out
