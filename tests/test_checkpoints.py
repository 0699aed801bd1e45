"""Checkpoints hold tensors and plain data only and are read with ``torch.load(weights_only=True)``:
a file whose unpickling would run code is refused by cm-arr-predict, by a resumed cm-arr-train
and by collect_reps, with the file named, and nothing in it runs."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmarr.pipelines.checkpoint import plain
from cmarr.pipelines.cli.predict import app as predict_app
from cmarr.pipelines.cli.train import app as train_app
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.errors import TrainError
from cmarr.pipelines.reps import collect_reps
from cmarr.pipelines.train import run_training

torch.set_num_threads(1)
runner = CliRunner()


class _RunsCode:
    """Unpickling this creates the folder ``marker``: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _crafted(path: Path, marker: Path, like: dict | None = None) -> Path:
    """A checkpoint-shaped file (a real one's fields when ``like``) that runs code when unpickled."""
    torch.save({**(like or {"model": {}, "model_config": {}, "provenance": {}}), "provenance": _RunsCode(marker)}, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("ckpt")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    cfg = tiny_config(root / "tiny.yaml")
    run_training(store, cfg, out_dir=root / "run", folds=[1], device="cpu", log=None)
    return root, store, cfg


def test_the_crafted_file_does_run_code_when_fully_unpickled(tmp_path):
    """The control for the tests below: their crafted file is a real threat."""
    marker = tmp_path / "ran"
    torch.load(_crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_predict_refuses_a_checkpoint_that_needs_code_and_runs_none_of_it(run, tmp_path):
    root, store, _ = run
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path / "evil.pt", marker)
    out = tmp_path / "p.csv"
    res = runner.invoke(predict_app, ["--checkpoint", str(evil), "--features", str(store), "--out", str(out),
                                        "--device", "cpu"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert ("evil.pt: not a cm-arr checkpoint, or one that needs code to load" in text
            and "nothing in it was run" in text)
    assert "Traceback" not in res.output
    assert not marker.exists() and not out.exists()
    # beside a sound checkpoint too: refused before anything is predicted
    res = runner.invoke(predict_app, ["--checkpoint", str(root / "run" / "fold1" / "best.pt"), "--checkpoint",
                                        str(evil), "--features", str(store), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2 and "nothing in it was run" in " ".join(res.output.split()) and not marker.exists()


def test_a_resume_from_a_replaced_last_pt_is_refused_and_runs_none_of_it(run, tmp_path):
    root, store, cfg = run
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    (out / "fold1" / "metrics.json").unlink()  # the fold unfinished: the rerun resumes from last.pt
    marker = tmp_path / "ran"
    real = torch.load(out / "fold1" / "last.pt", weights_only=True)
    _crafted(out / "fold1" / "last.pt", marker, like=real)
    args = ["--features", store, "--config", cfg, "--folds", "1", "--out", out, "--device", "cpu"]
    res = runner.invoke(train_app, [str(a) for a in args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "fold1/last.pt: not a cm-arr checkpoint, or one that needs code to load" in text, text
    assert "nothing in it was run" in text and "remove it to restart the fold" in text
    assert "Traceback" not in res.output and not marker.exists()
    # best.pt replaced after the last epoch (only testing is left): refused the same way
    torch.save(real, out / "fold1" / "last.pt")
    _crafted(out / "fold1" / "best.pt", marker, like=real)
    res = runner.invoke(train_app, [str(a) for a in args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "fold1/best.pt: not a cm-arr checkpoint" in text, text
    assert not marker.exists() and not (out / "fold1" / "metrics.json").exists()
    with pytest.raises(TrainError, match="best.pt: not a cm-arr checkpoint.*nothing in it was run"):
        collect_reps(out / "fold1" / "best.pt", store)
    assert not marker.exists()


def test_real_checkpoints_load_with_weights_only(run):
    root, _, _ = run
    for kind in ("best", "last"):
        ck = torch.load(root / "run" / "fold1" / f"{kind}.pt", map_location="cpu", weights_only=True)
        assert ck["fold"] == 1 and ck["model"] and ck["model_config"]["dims"]
    assert ck["optimizer"]["state"] and isinstance(ck["rng"]["torch"], torch.Tensor) and ck["rows"]


@dataclasses.dataclass
class _Point:
    x: np.float32
    where: Path


def test_plain_makes_numpy_dataclasses_and_paths_loadable_without_code(tmp_path):
    raw = {"a": np.float64(0.5), "b": np.arange(3), "c": (np.int64(2), "s"), "d": _Point(np.float32(1.5), Path("/x")),
           "t": torch.ones(2), 3: [None, True]}
    torch.save(raw, tmp_path / "raw.pt")
    with pytest.raises(Exception, match="Weights only load failed"):  # what plain() is for
        torch.load(tmp_path / "raw.pt", weights_only=True)
    torch.save(plain(raw), tmp_path / "plain.pt")
    back = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert back["a"] == 0.5 and back["b"] == [0, 1, 2] and back["c"] == (2, "s")
    assert back["d"] == {"x": 1.5, "where": "/x"} and torch.equal(back["t"], torch.ones(2)) and back[3] == [None, True]
    with pytest.raises(TypeError, match="not plain data"):
        plain({"f": object()})
