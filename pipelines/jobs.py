"""``cm-arr-train --jobs N``: folds trained as concurrent processes into one RUN_DIR.

Each fold runs as ``python -m cmarr.pipelines.cli.train --folds k`` with the RUN_DIR's
``config.yaml``, ``jobs`` at a time; on a machine with several GPUs each process sees only
the GPU with the fewest running folds. The fold processes end when the launching process
ends, however it ends (:func:`die_with_job_parent`), and the fold locks refuse a second
copy of a fold.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import TrainError, TrainInterrupted, signal_number

#: Set in the environment of a ``--jobs`` fold process: the pid of the process that started it.
JOB_PARENT_ENV = "CMARR_JOB_PARENT"


def job_env(base: Mapping[str, str], gpu: int | None) -> dict[str, str]:
    """The environment of a fold process: with ``gpu`` (an index among the visible GPUs),
    ``CUDA_VISIBLE_DEVICES`` narrowed to that one GPU (kept in the terms of an existing
    ``CUDA_VISIBLE_DEVICES`` list)."""
    env = dict(base)
    if gpu is not None:
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if visible else str(gpu)
    return env


def die_with_job_parent(env: Mapping[str, str] = os.environ) -> None:
    """In a fold process started by ``--jobs`` (``JOB_PARENT_ENV`` set): end this process
    with SIGTERM when that parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so that
    no fold keeps training unseen while a rerun starts it again. Called first thing by
    ``cm-arr-train``; a parent already gone ends it at once."""
    parent = env.get(JOB_PARENT_ENV)
    if not parent:
        return
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except Exception:
        return  # not Linux: the fold locks still refuse a second copy
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_jobs(features_path: str | Path, run_dir: Path, folds: Sequence[int], jobs: int, log: Callable[[str], None],
             gpus: int = 0, device: str = "auto") -> None:
    """Run ``cm-arr-train --folds k`` processes, ``jobs`` at a time, into ``run_dir``; with
    ``gpus > 1``, each on the GPU with the fewest running processes. ``device`` is this run's
    (config.yaml may hold an earlier run's). The fold processes end when this one ends,
    however it ends: ``TrainInterrupted`` on Ctrl-C or SIGTERM, ``TrainError`` naming the
    folds whose process failed."""
    pending = list(folds)
    running: list[tuple[int, subprocess.Popen, int | None]] = []
    failed = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                k = pending.pop(0)
                gpu = None
                if gpus > 1:
                    load = [sum(g == i for _, _, g in running) for i in range(gpus)]
                    gpu = load.index(min(load))
                cmd = [sys.executable, "-m", "cmarr.pipelines.cli.train", "--features", str(features_path),
                       "--config", str(run_dir / "config.yaml"), "--folds", str(k), "--out", str(run_dir),
                       "--quiet", "--device", str(device)]
                log(f"fold {k}: started as a separate process" + (f" on GPU {gpu}" if gpu is not None else ""))
                env = {**job_env(os.environ, gpu), JOB_PARENT_ENV: str(os.getpid())}
                running.append((k, subprocess.Popen(cmd, env=env), gpu))
            time.sleep(0.2)
            for k, p, g in list(running):
                if p.poll() is not None:
                    running.remove((k, p, g))
                    if p.returncode != 0:
                        failed.append(k)
                    log(f"fold {k}: process ended ({p.returncode})")
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the fold processes are stopped below and say where
        stopped = ", ".join(str(k) for k, _, _ in running) or "(none)"
        later = (f"; fold{'s' if len(pending) > 1 else ''} {', '.join(map(str, pending))} not started"
                 if pending else "")
        raise TrainInterrupted(f"the processes of folds {stopped} were stopped (each says where above){later}. "
                               "Run the same command again to resume", signal_number(e)) from None
    finally:  # interrupted (Ctrl-C, an error): the fold processes stop too; a rerun resumes them
        for _, p, _ in running:
            if p.poll() is None:
                p.terminate()
        for _, p, _ in running:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    if failed:
        raise TrainError(f"{run_dir}: the processes of folds {failed} failed (see their output above)")
