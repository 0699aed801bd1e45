"""Training throughput and the projected time of the full protocol, eager vs fast path.

    python benchmarks/train.py [--device auto] [--steps 40] [--utterances 5531] [--jobs 5]

Builds an IEMOCAP-shaped synthetic corpus in memory (5,531 utterances in five sessions of
1085/1023/1151/1031/1241; log-normal lengths with medians of 225 speech frames x 768, 24 text
word pieces x 768 and 45 video frames x 342, means about 10 % higher), takes fold 1, and measures for each path:

- ``eager``: the plain run: DataLoader padding raw frames per batch, fp32, no compile.
- ``compile``: ``fast`` with ``torch.compile`` (``optim.compile=on``; compilation time is
  counted as setup).
- ``graphs``: ``compile`` in mode "reduce-overhead" (``optim.compile_mode``), which replays
  the compiled step as CUDA graphs (CUDA only; elsewhere it is ``compile``).
- ``fast``: the project's fastest path: every utterance pooled once to ``seq_len`` steps
  and kept on the device (``data.pipeline=resident``), bf16 autocast on CUDA, large eval
  batches; ``fast xJ``: the same with J folds trained concurrently as J processes on one
  device (``cm-arr-train --jobs J``), aggregate throughput.

Projection of the full protocol: 5 folds x 100 epochs at batch 16 over the real IEMOCAP fold
sizes (training part = 90 % of the four training sessions), each epoch followed by the
validation evaluation under 7 conditions and the ``last.pt`` checkpoint, each fold ending
with the test evaluation under 7 conditions; plus the measured setup per fold (pooling, and
on the compiled paths the compilation of both batch sizes a fold has). With ``--jobs J`` the
folds are scheduled J at a time as ``cm-arr-train --jobs`` does. Not included: loading the
store (see ``benchmarks/store.py``). "steps/s overall" = all training steps of the protocol /
projected time. A concurrent worker that was not ready when the common timed window began
is reported as late (its rate is then overstated).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SESSIONS = [1085, 1023, 1151, 1031, 1241]  # IEMOCAP 4-class utterances per session
FOLDS, EPOCHS, BATCH = 5, 100, 16


def protocol_sizes(val_fraction: float = 0.1):
    """(train, val, test) utterances per fold of the real IEMOCAP protocol."""
    total = sum(SESSIONS)
    out = []
    for s in SESSIONS:
        rest = total - s
        val = round(val_fraction * rest)
        out.append((rest - val, val, s))
    return out


def build_data(n_utts: int, seed: int = 0):
    from cmarr.pipelines.data import StoreData
    from cmarr.pipelines.demo.synthetic import IEMOCAP_SHAPED, SyntheticSpec, make_synthetic_data

    scale = n_utts / sum(SESSIONS)
    sizes = [max(8, int(round(s * scale))) for s in SESSIONS]
    spec = SyntheticSpec(frame_noise=0.0, **IEMOCAP_SHAPED)  # values do not matter for timing
    table, feats, _ = make_synthetic_data(spec, seed=seed, session_sizes=sizes)
    return StoreData("iemocap-shaped(in-memory)", utterances=table, features=feats, provenance={})


def make_recipe(data, path: str, device: str, out: Path):
    from cmarr.pipelines.fold import FoldRecipe
    from cmarr.pipelines.train import resolve_config

    over = {"data.pipeline": "eager" if path == "eager" else "resident",
            "optim.compile": "on" if path in ("compile", "graphs") else "off",
            "optim.compile_mode": "reduce-overhead" if path == "graphs" else "default",
            "optim.amp": "off" if path == "eager" else "auto",
            "optim.eval_batch_size": 512 if path == "eager" else 1024,  # 512: the config default
            "device": device}
    cfg = resolve_config(None, overrides=over)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    return FoldRecipe(cfg, data, 1, out, dev)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(data, path: str, device: str, steps: int, warmup: int, out: Path, duration: float | None = None,
            start_at: float | None = None) -> dict:
    """Setup time, training steps/s and evaluation rows/s of one path on fold 1."""
    out = out / path
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing to resume
    t0 = time.perf_counter()
    r = make_recipe(data, path, device, out)
    r.setup()
    sync(r.device)
    setup_s = time.perf_counter() - t0
    r.net.train()
    gen = r.condition_generator(1)

    def batches():
        epoch = 1
        while True:
            yield from r._train_batches(epoch)
            epoch += 1

    it = batches()
    t = time.perf_counter()
    for _ in range(warmup):
        r.train_step(next(it), gen)
    sync(r.device)
    warmup_s = time.perf_counter() - t  # includes compilation on the "compile" path
    remainder_s = 0.0
    k = len(r.split.train) % BATCH
    if path in ("compile", "graphs") and k >= 2:
        # a fold's last, shorter batch is a second graph (static shapes): compiled once per fold
        t = time.perf_counter()
        r.train_step(r.res["train"].batch(torch.arange(k, device=r.device)), gen)
        sync(r.device)
        remainder_s = time.perf_counter() - t
    t = time.perf_counter()
    r.save_checkpoint("last")  # written after every epoch (weights, optimizer, RNG, log)
    checkpoint_s = time.perf_counter() - t
    ready_at = time.time()
    if start_at is not None:  # concurrent workers start timing together
        while time.time() < start_at:
            time.sleep(0.005)
    t = time.perf_counter()
    n = 0
    while True:
        r.train_step(next(it), gen)
        n += 1
        if duration is None and n >= steps:
            break
        if duration is not None and n % 10 == 0:
            sync(r.device)
            if time.perf_counter() - t >= duration:
                break
    sync(r.device)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    r.predict("val")
    sync(r.device)
    eval_s = time.perf_counter() - t
    compile_s = warmup_s + remainder_s if path in ("compile", "graphs") else 0.0
    return {"path": path, "setup_s": setup_s + compile_s, "steps": n, "train_s": train_s, "steps_per_s": n / train_s,
            "eval_rows": len(r.split.val) * 7, "eval_s": eval_s, "eval_rows_per_s": len(r.split.val) * 7 / eval_s,
            "checkpoint_s": checkpoint_s, "ready_at": ready_at, "n_utts": len(data)}


def project(m: dict, jobs: int = 1, full_setup_scale: float = 1.0) -> dict:
    """Projected wall time of the full protocol from one path's measurements.

    Each fold: setup (pooling; compilation on the compiled paths), then per epoch its
    training steps (a last batch of one utterance is dropped, as the trainer does), the
    7-condition validation and the ``last.pt`` checkpoint, and at the end the 7-condition
    test. Folds are run ``jobs`` at a time as ``cm-arr-train --jobs`` does (a new fold
    starts when one ends), at the per-process rates measured with ``jobs`` processes.
    Loading the store is not included (``benchmarks/store.py``: load-all)."""
    sizes = protocol_sizes()
    steps = [EPOCHS * (tr // BATCH + (tr % BATCH >= 2)) for tr, _, _ in sizes]
    eval_rows = [EPOCHS * va * 7 + te * 7 for _, va, te in sizes]
    fold_s = [m["setup_s"] * full_setup_scale + n / m["steps_per_s"] + e / m["eval_rows_per_s"]
              + EPOCHS * m.get("checkpoint_s", 0.0) for n, e in zip(steps, eval_rows)]
    free = [0.0] * jobs  # when each of the concurrent slots is free again
    for d in fold_s:
        i = int(np.argmin(free))
        free[i] += d
    total = max(free)
    return {"train_steps": sum(steps), "eval_rows": sum(eval_rows), "projected_s": total,
            "overall_steps_per_s": sum(steps) / total}


def worker(args) -> None:
    data = build_data(args.utterances, seed=args.seed)
    m = measure(data, args.path, args.device, args.steps, args.warmup, Path(args.tmp), duration=args.duration,
                start_at=args.start_at)
    print("RESULT " + json.dumps(m), flush=True)


def concurrent(args, jobs: int) -> dict:
    """``jobs`` worker processes, timed over the same window; aggregate throughput."""
    start_at = time.time() + args.concurrent_start
    procs = []
    for j in range(jobs):
        cmd = [sys.executable, __file__, "--worker", "--path", args.path, "--device", args.device,
               "--utterances", str(args.utterances), "--warmup", str(args.warmup), "--duration", str(args.duration),
               "--start-at", str(start_at), "--seed", str(j), "--tmp", str(Path(args.tmp) / f"w{j}")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        outp, _ = p.communicate()
        line = [ln for ln in outp.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            raise SystemExit(f"concurrent worker failed ({p.returncode})")
        results.append(json.loads(line[-1][7:]))
    late = [r for r in results if r["ready_at"] > start_at]  # began timing after the others: rates too high
    return {"path": f"{args.path} x{jobs}", "setup_s": max(r["setup_s"] for r in results),
            "steps_per_s": float(np.mean([r["steps_per_s"] for r in results])),
            "eval_rows_per_s": float(np.mean([r["eval_rows_per_s"] for r in results])),
            "checkpoint_s": float(np.mean([r["checkpoint_s"] for r in results])),
            "steps": sum(r["steps"] for r in results), "jobs": jobs, "late_start": len(late),
            "n_utts": results[0]["n_utts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--utterances", type=int, default=None, help="default: 5531 on CUDA, 1106 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 200 CUDA, 6 CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--jobs", type=str, default=None,
                    help="concurrent fold processes to try, e.g. 5 (default: 5 on CUDA, none on CPU)")
    ap.add_argument("--duration", type=float, default=20.0, help="timed window of concurrent workers (s)")
    ap.add_argument("--concurrent-start", type=float, default=90.0, help="seconds allowed for worker setup")
    ap.add_argument("--json", type=str, default=None, help="write the measurements here")
    ap.add_argument("--tmp", type=str, default="/tmp/cmarr-bench")
    ap.add_argument("--paths", type=str, default="eager,fast",
                    help="single-process paths: eager, fast, compile, graphs")
    ap.add_argument("--path", type=str, default=None,
                    help="path of the concurrent workers (default: the fastest measured)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda") or args.device.startswith("cuda")
    args.utterances = args.utterances or (5531 if cuda else 1106)
    args.steps = args.steps or (200 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if args.worker:
        worker(args)
        return
    jobs = [int(j) for j in (args.jobs or ("5" if cuda else "")).split(",") if j and int(j) > 1]

    t = time.perf_counter()
    data = build_data(args.utterances)
    gen_s = time.perf_counter() - t
    dev_name = (torch.cuda.get_device_name() if cuda
                else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    print(f"device: {dev_name}; torch {torch.__version__}; corpus: {args.utterances} IEMOCAP-shaped utterances "
          f"(generated in {gen_s:.1f} s)", flush=True)
    rows = []
    eager_steps = max(3, args.steps // 5) if cuda else args.steps
    for path in args.paths.split(","):
        steps = eager_steps if path == "eager" else args.steps
        m = measure(data, path, args.device, steps,
                    args.warmup if path not in ("compile", "graphs") else max(args.warmup, 3), Path(args.tmp))
        rows.append(m)
        print(f"  {path}: {m['steps_per_s']:.1f} steps/s, eval {m['eval_rows_per_s']:.0f} rows/s, "
              f"setup {m['setup_s']:.1f} s", flush=True)
    del data
    if args.path is None:
        args.path = max((m for m in rows if m["path"] != "eager"), key=lambda m: m["steps_per_s"],
                        default={"path": "fast"})["path"]
    for j in jobs:
        m = concurrent(args, j)
        rows.append(m)
        print(f"  {args.path} x{j}: {m['steps_per_s']:.1f} steps/s per process", flush=True)

    scale = sum(SESSIONS) / args.utterances  # setup (pooling) grows with the corpus
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"Full protocol projection (5 folds x 100 epochs, batch 16, 5,531 utterances, 7-condition "
                      f"validation and a checkpoint each epoch; measured on {args.utterances} utterances) "
                      f"on {dev_name}")
    for c in ("path", "measured steps", "train steps/s", "eval rows/s", "setup/fold s", "projected total",
              "steps/s overall"):
        tab.add_column(c, justify="right" if c != "path" else "left")
    results = []
    for m in rows:
        p = project(m, jobs=m.get("jobs", 1), full_setup_scale=scale)
        agg = m["steps_per_s"] * m.get("jobs", 1)
        def fmt(x):
            return f"{x:.1f}" if x >= 10 else f"{x:.3g}"

        label = m["path"] + (f" ({m['late_start']} late: rate overstated)" if m.get("late_start") else "")
        tab.add_row(label, str(m["steps"]), fmt(agg), f"{m['eval_rows_per_s'] * m.get('jobs', 1):.0f}",
                    f"{m['setup_s'] * scale:.1f}", f"{p['projected_s'] / 60:.1f} min", fmt(p['overall_steps_per_s']))
        results.append({**m, **p})
    Console(width=200).print(tab)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "rows": results},
                                              indent=1))


if __name__ == "__main__":
    main()
