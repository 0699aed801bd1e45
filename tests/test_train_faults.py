"""Faults of cm-arr-train (and cm-arr-predict) found before anything trains, or reported when
a run stops: NaN/Inf frames, folds that split a session, --set keys and values, a config file
that is not UTF-8, Ctrl-C / SIGTERM, and fold locks left behind."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmarr.extract.store import FeatureStore
from cmarr.pipelines.cli.predict import app as predict_app
from cmarr.pipelines.cli.train import app as train_app
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.errors import TrainError
from cmarr.pipelines.run_dir import lock_fold
from cmarr.pipelines.train import run_training

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("faults")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    cfg = tiny_config(root / "tiny.yaml")
    return root, store, cfg


def _train(*args):
    return runner.invoke(train_app, [str(a) for a in args])


def _one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    return " ".join(res.output.split())


def _with_nonfinite(src: Path, dst: Path, modality: str, utterance: str, value: float) -> Path:
    """A copy of ``src`` with one frame of ``utterance`` set to ``value``, its checksum
    recomputed: written behind the store writer's back, so only the values tell."""
    shutil.copy(src, dst)
    off, _ = FeatureStore(dst)._index[modality][utterance]
    with h5py.File(dst, "a") as f:
        g = f["features"][modality]
        g["data"][off, 0] = value
        g.attrs["data_sha256"] = hashlib.sha256(memoryview(np.ascontiguousarray(g["data"][()])).cast("B")).hexdigest()
    FeatureStore(dst).verify()  # the checksum passes
    return dst


# ---------------------------------------------------------------- B: NaN/Inf frames

@pytest.mark.parametrize("load", ["memory", "lazy"])
def test_nonfinite_frames_are_named_before_any_fold_trains(env, tmp_path, load):
    root, store, cfg = env
    ids = sorted(FeatureStore(store).ids("text"))
    bad = _with_nonfinite(store, tmp_path / "nan.h5", "speech", ids[3], np.nan)
    bad = _with_nonfinite(bad, tmp_path / "naninf.h5", "text", ids[7], np.inf)
    out = tmp_path / "run"
    text = _one_line_error(_train("--features", bad, "--config", cfg, "--epochs", "1", "--out", out,
                                  "--set", f"data.load={load}"))
    assert "naninf.h5: 2 feature matrices hold NaN/Inf values" in text, text
    assert f"speech of '{ids[3]}'" in text and f"text of '{ids[7]}'" in text
    assert not list(out.glob("fold*/*.pt"))  # nothing trained


def test_predict_names_nonfinite_frames_before_predicting(env, tmp_path):
    root, store, cfg = env
    run_training(store, cfg, out_dir=tmp_path / "run", folds=[1], epochs=1, device="cpu", log=None)
    u = sorted(FeatureStore(store).ids("video"))[0]
    bad = _with_nonfinite(store, tmp_path / "nan.h5", "video", u, -np.inf)
    out = tmp_path / "p.csv"
    res = runner.invoke(predict_app, ["--checkpoint", str(tmp_path / "run" / "fold1" / "best.pt"), "--features",
                                        str(bad), "--out", str(out), "--device", "cpu"])
    text = _one_line_error(res, code=2)
    assert "nan.h5: 1 feature matrix holds NaN/Inf values: video of " + repr(u) in text, text
    assert not out.exists()


# ---------------------------------------------------------------- F: a session in several folds

def test_a_session_spanning_folds_is_refused_before_training(env, tmp_path, rewrite_table):
    root, store, cfg = env
    bad = shutil.copy(store, tmp_path / "leak.h5")
    moved = {}

    def move_one(df):
        i = df.index[df["fold"] == 1][0]
        moved["id"] = df.loc[i, "utterance_id"]
        df.loc[i, "fold"] = 9  # a Session-1 utterance tested in fold 9, next to Session-1 training data
        return df

    rewrite_table(bad, move_one)
    out = tmp_path / "run"
    text = _one_line_error(_train("--features", bad, "--config", cfg, "--epochs", "1", "--out", out, "--folds", "9"))
    assert "leak.h5: session 1 spans folds [1, 9]" in text and moved["id"] in text, text
    assert not list(out.glob("fold*"))


# ---------------------------------------------------------------- C: --set keys and values

@pytest.mark.parametrize("option,message", [
    ("optim.lr=", "optim.lr needs a value (float), got none"),
    ("optim.lr=null", "optim.lr needs a value (float), got none"),
    ("seed=", "seed needs a value (int), got none"),
    ("optim=", "optim needs a value (a mapping), got none"),
    ("optim.nosuchkey=", "unknown key 'optim.nosuchkey' (optim keys: amp, batch_size,"),
    ("optim.nosuchkey=1", "unknown key 'optim.nosuchkey' (optim keys: amp, batch_size,"),
    ("bogus.key=null",
     "unknown key 'bogus.key' (top-level keys: data, device, log, model, optim, protocol, seed, variant)"),
    ("model.nosuch=1", "unknown key 'model.nosuch' (model keys: alpha, beta,"),
    ("seed.x=1", "unknown key 'seed.x' (seed has no sub-keys)"),
    ("=1", "no key before '='"),
])
def test_set_refuses_unknown_keys_and_missing_values(env, tmp_path, option, message):
    root, store, cfg = env
    out = tmp_path / "run"
    text = _one_line_error(_train("--features", store, "--config", cfg, "--epochs", "1", "--out", out,
                                  "--set", option))
    assert message in text, text
    assert not out.exists()


def test_set_of_a_section_keeps_its_other_keys(env):
    from cmarr.pipelines.config import load_config, with_overrides

    c = with_overrides(load_config(env[2]), {"optim": {"epochs": 7}})
    assert c.optim.epochs == 7 and c.optim.batch_size == 8  # the file's batch size stays


# ---------------------------------------------------------------- D: a config file that is not UTF-8

def test_a_config_file_that_is_not_utf8_is_a_message(env, tmp_path):
    root, store, _ = env
    bad = tmp_path / "utf16.yaml"
    bad.write_bytes(b"\xff\xfe" + "optim:\n  lr: 1.0e-3\n".encode("utf-16-le"))
    text = _one_line_error(_train("--features", store, "--config", bad, "--epochs", "1", "--out", tmp_path / "run"))
    assert f"{bad}: not a UTF-8 text file (byte 0 is 0xff)" in text, text


# ---------------------------------------------------------------- E, G: Ctrl-C / SIGTERM, fold locks

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_says_where_it_stopped_and_leaves_no_lock(env, tmp_path, tiny_config, sig):
    root, store, _ = env
    cfg = tiny_config(tmp_path / "long.yaml", epochs=500)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cmarr.pipelines.cli.train", "--features", str(store), "--config",
                             str(cfg), "--out", str(out), "--folds", "1,2", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400"},
                            # Ctrl-C's default action even where the suite runs as a background job
                            # (a shell starts those with SIGINT ignored, and Python keeps that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # the first epoch's line: the fold is training
            lines.append(line)
            if "fold 1 epoch 1/500" in line or time.monotonic() > deadline:
                break
        assert "fold 1 epoch 1/500" in "".join(lines), "".join(lines)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = " ".join(("".join(lines) + rest).split())
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    assert re.search(r"interrupted: fold 1 stopped in epoch \d+ of 500 \(epochs? 1(-\d+)? (is|are) saved in "
                     r"\S+fold1/last\.pt\)", err), err[-2000:]
    assert "fold 2 not started" in err and "Run the same command again to resume" in err
    assert (out / "fold1" / "last.pt").is_file() and not (out / "fold1" / "lock").exists()


def test_fold_locks_are_removed_when_the_fold_ends(env, tmp_path, monkeypatch):
    root, store, cfg = env
    out = tmp_path / "run"
    run_training(store, cfg, out_dir=out, folds=[1], epochs=1, device="cpu", log=None)
    assert (out / "fold1" / "metrics.json").is_file() and not (out / "fold1" / "lock").exists()
    # a failed fold releases and removes its lock too
    with pytest.raises(TrainError):
        run_training(store, cfg, out_dir=tmp_path / "diverges", folds=[2], epochs=1, device="cpu", log=None,
                     overrides={"optim.lr": float("inf")})
    assert (tmp_path / "diverges" / "fold2").is_dir() and not (tmp_path / "diverges" / "fold2" / "lock").exists()
    # only the holder removes it; a second process stays refused while it is held
    a = lock_fold(tmp_path, 1)
    with pytest.raises(TrainError, match=f"fold 1 is being trained by pid {os.getpid()}"):
        lock_fold(tmp_path, 1)
    assert (tmp_path / "fold1" / "lock").exists()
    a.release()
    assert not (tmp_path / "fold1" / "lock").exists()
    # a process that opened the file just before its holder removed it locks the new one instead
    import cmarr.extract.files as F

    calls = []
    real_open = os.open

    def open_then_holder_removes(path, *a, **k):
        fd = real_open(path, *a, **k)
        if not calls:
            Path(path).unlink()  # the holder releases between this open and the flock
        calls.append(path)
        return fd

    monkeypatch.setattr(F.os, "open", open_then_holder_removes)
    b = lock_fold(tmp_path, 1)
    monkeypatch.undo()
    assert len(calls) == 2 and (tmp_path / "fold1" / "lock").exists()
    with pytest.raises(TrainError, match="being trained by"):  # b holds the file that is there
        lock_fold(tmp_path, 1)
    b.release()
