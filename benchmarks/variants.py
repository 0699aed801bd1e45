"""Every variant on synthetic IEMOCAP-shaped stores, over several seeds and all folds.

    python benchmarks/variants.py [--out runs/variants] [--seeds 0,1,2] [--variants all]
        [--generators shared,crossmodal] [--n-per-class 50] [--epochs 12]

For each generator (``cmarr.pipelines.demo.synthetic``: ``shared``, every modality carries
its own class evidence; ``crossmodal``, an absent modality's evidence is recoverable only
through its relation to the others) a store at IEMOCAP widths (768/768/342, 5 sessions,
``n_per_class`` utterances per class and session) is written once, then each variant is
trained with ``pipelines/configs/synthetic_quick.yaml`` for each seed, the five folds one
after another on the resident pipeline (``data.pipeline: resident``: the same numbers as the
eager one, several times faster on a CPU). UAR (%) per condition is printed as the
mean over seeds of the fold means, ± the std over seeds, and, in a second column group,
± the std over all fold x seed runs. Runs already in ``--out`` (a ``metrics.json``) are not
trained again, so an interrupted evaluation resumes. The tables are also written to
``OUT/table.md``.

This is an evaluation, not a speed benchmark: its numbers are what the README's results
section quotes. On a 2-core CPU one run (five folds, 1,000 utterances, 12 epochs) takes
about a minute.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cmarr.pipelines.conditions import MISSING_CONDITIONS
from cmarr.pipelines.config import VARIANT_NAMES, parse_set_option
from cmarr.pipelines.train import run_training

CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "synthetic_quick.yaml"
DIMS = {"speech": 768, "text": 768, "video": 342}
SHOWN = (*MISSING_CONDITIONS, "avg", "svt")


def make_store(path: Path, kind: str, n_per_class: int) -> Path:
    from cmarr.pipelines.demo.synthetic import make_synthetic_store

    if not path.exists():
        make_synthetic_store(path, n_per_class=n_per_class, sessions=5, seed=0, dims=DIMS, kind=kind)
    return path


def fold_uars(run_dir: Path) -> dict[str, list[float]]:
    """Condition -> each fold's UAR (%) of one run."""
    m = json.loads((run_dir / "metrics.json").read_text())
    out: dict[str, list[float]] = {}
    for conds in m["folds"].values():  # fold -> condition -> metrics ("avg": over the six missing ones)
        for c in SHOWN:
            out.setdefault(c, []).append(100 * conds[c]["uar"])
    return out


def label(c: str) -> str:
    return {"avg": "Avg", "svt": "{s,v,t}"}.get(c, "{" + ",".join(c) + "}")


def table(results: dict[str, list[dict[str, list[float]]]], seeds: list[int]) -> str:
    head = "| variant | " + " | ".join(label(c) for c in SHOWN) + " |"
    lines = [head, "|---|" + "---:|" * len(SHOWN)]
    for variant, runs in results.items():
        cells = []
        for c in SHOWN:
            per_seed = [float(np.mean(r[c])) for r in runs]
            every = [u for r in runs for u in r[c]]
            cells.append(f"{np.mean(per_seed):.1f} ± {np.std(per_seed, ddof=1) if len(per_seed) > 1 else 0:.1f} "
                         f"({np.std(every, ddof=1):.1f})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append(f"\nUAR %: mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) of the 5-fold means ± std "
                 "over seeds (std over all fold x seed runs).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/variants")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--generators", default="shared,crossmodal")
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (all runs)")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = list(VARIANT_NAMES) if args.variants == "all" else args.variants.split(",")
    extra = dict(parse_set_option(s) for s in args.set)  # values read as YAML, as cm-arr-train --set
    report = []
    for kind in args.generators.split(","):
        store = make_store(out / f"{kind}.h5", kind, args.n_per_class)
        results: dict[str, list[dict[str, list[float]]]] = {}
        for v in variants:
            for seed in seeds:
                run_dir = out / kind / v / f"seed{seed}"
                if not (run_dir / "metrics.json").exists():
                    t0 = time.perf_counter()
                    run_training(store, CONFIG, variant=v, seed=seed, out_dir=run_dir, epochs=args.epochs,
                                 overrides={"data.pipeline": "resident", **extra}, log=None)
                    print(f"{kind} {v} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
                results.setdefault(v, []).append(fold_uars(run_dir))
        text = f"### {kind} generator ({args.n_per_class * 4 * 5} utterances, {args.epochs} epochs)\n\n" + \
            table(results, seeds)
        print("\n" + text + "\n", flush=True)
        report.append(text)
    (out / "table.md").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
