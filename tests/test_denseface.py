"""Denseface: architecture, FER+ reading and training, checkpoints, the extractor's use of them."""
from __future__ import annotations

import csv
import os

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from skimage import data as skdata
from typer.testing import CliRunner

from cmarr.extract.base import ExtractError
from cmarr.extract.cli.denseface import app
from cmarr.extract.denseface_train import (
    FerDataError,
    demo_ferplus_pair,
    label_votes,
    load_checkpoint,
    read_ferplus,
    save_checkpoint,
    write_ferplus_pair,
)
from cmarr.extract.files import file_sha256
from cmarr.model.denseface import BottleneckLayer, DenseFace, DenseFaceConfig, Transition


def _gray_faces():
    ast = cv2.cvtColor(skdata.astronaut()[10:240, 130:320], cv2.COLOR_RGB2GRAY)
    gh = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"), cv2.IMREAD_GRAYSCALE)
    return [ast, gh[40:400, 120:400]]


def test_architecture_widths_and_output():
    torch.manual_seed(0)
    m = DenseFace().eval()
    cfg = m.config
    assert cfg.layers_per_block == 16 and cfg.out_dim == 342
    trans = [t for t in m.features if isinstance(t, Transition)]
    assert [(t.conv.in_channels, t.conv.out_channels) for t in trans] == [(216, 108), (300, 150)]
    assert sum(isinstance(x, BottleneckLayer) for x in m.modules()) == 48
    assert m.stem.out_channels == 24 and m.norm.num_features == 342
    with torch.no_grad():
        f, logits = m(torch.randn(1, 1, 64, 64))
    assert f.shape == (1, 342) and logits.shape == (1, 8)
    assert (f >= 0).all()  # pooled after ReLU


def test_every_parameter_gets_a_gradient():
    # the same modules at 2 layers per block and 32x32 input: cheap on a CPU
    torch.manual_seed(0)
    m = DenseFace(DenseFaceConfig(depth=16)).train()
    assert m.config.layers_per_block == 2
    f, logits = m(torch.randn(2, 1, 32, 32))
    (f.sum() + logits.sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("votes,rule,expect,why", [
    ([8, 1, 1, 0, 0, 0, 0, 0, 0, 0], "majority", 0, "ok"),          # single votes are outliers
    ([4, 4, 2, 0, 0, 0, 0, 0, 0, 0], "majority", None, "no_majority"),
    ([0, 0, 0, 0, 0, 0, 0, 0, 2, 8], "majority", None, "nf"),
    ([0, 3, 0, 0, 0, 0, 0, 0, 7, 0], "majority", None, "unknown"),
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "majority", None, "no_votes"),
    # distribution: the FER+ reference's greedy 75 % rule
    ([4, 4, 2, 0, 0, 0, 0, 0, 0, 0], "distribution", [0.5, 0.5, 0.0], "ok"),    # 80 % held by the two tied
    ([0, 2, 0, 0, 1, 7, 0, 0, 0, 0], "distribution", [0, 0, 0, 0, 0, 1.0], "ok"),  # 7 of 9 >= 75 %: disgust alone
    ([3, 3, 2, 2, 0, 0, 0, 0, 0, 0], "distribution", None, "no_majority"),    # 4 emotions needed: too many
    ([0, 1, 0, 4, 0, 0, 0, 0, 4, 1], "distribution", None, "no_majority"),    # sadness tied with unknown: half
    ([5, 0, 0, 0, 0, 0, 0, 0, 5, 0], "distribution", None, "no_majority"),
])
def test_label_rule(votes, rule, expect, why):
    t, reason = label_votes(np.array(votes), rule)
    assert reason == why
    if expect is None:
        assert t is None
    elif isinstance(expect, int):
        assert t.argmax() == expect and t.sum() == 1
    else:
        assert np.allclose(t[:len(expect)], expect) and np.isclose(t.sum(), 1)


def test_read_ferplus_counts_drops(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    p1, p2 = write_ferplus_pair(tmp_path, imgs, np.array([0, 1, 2, 3]),
                                ["Training", "Training", "PublicTest", "PrivateTest"])
    rows = list(csv.reader(open(p2)))
    rows[2][1] = ""  # removed by FER+
    rows[3][2:] = ["0"] * 9 + ["10"]  # not a face
    with open(p2, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    d = read_ferplus(p1, p2)
    assert d.report["kept"] == 2 and d.report["removed_by_ferplus"] == 1 and d.report["nf"] == 1
    assert list(d.split) == ["train", "test"] and d.targets.argmax(1).tolist() == [0, 3]
    assert np.array_equal(d.images[0], imgs[0])


@pytest.mark.parametrize("which,row,bad,msg", [
    ("fer", 2, ["0", "1 2 3", "Training"], "2304"),
    ("fer", 3, ["0", "x " * 2304, "Training"], "not integers"),
    ("fer", 2, ["0", "1"], "expected 3 fields"),
    ("fer", 2, ["0", "300 " * 2304, "Training"], "outside 0..255"),
    ("plus", 3, ["Training", "a.png", "1", "two", "0", "0", "0", "0", "0", "0", "0", "0"], "not integers"),
    ("plus", 2, ["PublicTest", "a.png"] + ["1"] * 10, "differs"),
])
def test_malformed_csv_names_file_and_line(tmp_path, which, row, bad, msg):
    imgs = np.zeros((3, 48, 48), np.uint8)
    p1, p2 = write_ferplus_pair(tmp_path, imgs, np.array([0, 1, 2]), ["Training"] * 3)
    path = p1 if which == "fer" else p2
    rows = list(csv.reader(open(path)))
    rows[row - 1] = bad
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(FerDataError, match=msg) as e:
        read_ferplus(p1, p2)
    assert str(e.value).startswith(f"{path}:{row}:")
    # the command line prints the same, without a traceback
    r = CliRunner().invoke(app, ["train", "--fer2013", str(p1), "--ferplus", str(p2), "--out", str(tmp_path / "c.pt")])
    assert r.exit_code == 2 and f"{path.name}:{row}" in r.output.replace("\n", "") and "Traceback" not in r.output
    assert not (tmp_path / "c.pt").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The real command on a tiny FER+ pair made from real face photos: one epoch."""
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("fer")
    p1, p2 = demo_ferplus_pair(d, _gray_faces(), n=12, seed=0)
    ck = d / "denseface.pt"
    r = CliRunner().invoke(app, ["train", "--fer2013", str(p1), "--ferplus", str(p2), "--out", str(ck),
                                 "--epochs", "1", "--batch-size", "2", "--max-train", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return p1, p2, ck, r.output


def test_train_one_epoch_writes_recorded_checkpoint(trained):
    p1, p2, ck, output = trained
    sha = file_sha256(ck)
    assert f"sha256 {sha}" in output and "FER+ test accuracy" in output
    model, rec = load_checkpoint(ck)
    assert rec["epochs"] == 1 and len(rec["history"]) == 1
    assert rec["data"]["fer2013"]["sha256"] == file_sha256(p1)
    assert rec["data"]["ferplus"]["sha256"] == file_sha256(p2)
    assert rec["data"]["report"]["kept"] == 12 and rec["train_config"]["label_rule"] == "majority"
    assert 0.0 <= rec["test_accuracy"] <= 1.0 and rec["n_test"] > 0
    assert rec["normalisation"]["std"] > 0 and rec["versions"]["torch"]
    assert model.out_dim == 342
    # training moved the weights away from a fresh initialisation with the same seed
    torch.manual_seed(0)
    fresh = DenseFace()
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    m = DenseFace().eval()
    rec = {"format": "cm-arr-denseface/1", "model_config": DenseFaceConfig().__dict__, "epochs": 0,
           "normalisation": {"mean": 0.5, "std": 0.25}, "input": {"size": 64}}
    path = tmp_path / "c.pt"
    sha = save_checkpoint(path, m.state_dict(), rec)
    assert sha == file_sha256(path) and len(sha) == 64
    m2, rec2 = load_checkpoint(path)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        (f1, l1), (f2, l2) = m(x), m2(x)
    assert torch.equal(f1, f2) and torch.equal(l1, l2)
    assert rec2 == rec
    # the extractor loads it and records its sha256
    from cmarr.extract.video import VideoConfig, VideoExtractor

    ex = VideoExtractor(VideoConfig(checkpoint=str(path), device="cpu"))
    prov = ex.provenance()
    assert prov["denseface_checkpoint_sha256"] == sha and prov["random_weights"] is False
    assert prov["normalisation"]["mean"] == 0.5 and prov["normalisation"]["std"] == 0.25
    # a checkpoint of another architecture is refused with the file named
    bad = DenseFace(DenseFaceConfig(depth=10))
    save_checkpoint(tmp_path / "small.pt", bad.state_dict(),
                    {**rec, "model_config": DenseFaceConfig(depth=10).__dict__})
    with pytest.raises(ExtractError, match="small.pt"):
        VideoExtractor(VideoConfig(checkpoint=str(tmp_path / "small.pt"), device="cpu"))


def test_cli_info(trained):
    _, _, ck, _ = trained
    r = CliRunner().invoke(app, ["info", str(ck)])
    assert r.exit_code == 0 and file_sha256(ck) in r.output
    r = CliRunner().invoke(app, ["info", str(ck) + ".missing"])
    assert r.exit_code == 2 and "not found" in r.output and "Traceback" not in r.output


def test_training_without_validation_rows_keeps_the_last_epoch(tmp_path):
    """No PublicTest rows: nothing to select on; the last epoch is kept and said to be."""
    faces = [cv2.resize(f, (48, 48)) for f in _gray_faces()]
    imgs = np.stack([faces[i % len(faces)] for i in range(8)])
    p1, p2 = write_ferplus_pair(tmp_path, imgs, np.array([i % 4 for i in range(8)]),
                                ["Training"] * 6 + ["PrivateTest"] * 2)
    ck = tmp_path / "c.pt"
    r = CliRunner().invoke(app, ["train", "--fer2013", str(p1), "--ferplus", str(p2), "--out", str(ck),
                                 "--epochs", "2", "--batch-size", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "no PublicTest (validation) rows" in " ".join(r.output.split()) and "kept epoch 2 (last)" in r.output
    _, rec = load_checkpoint(ck)
    assert rec["kept_epoch"] == 2 and rec["selected_by"] == "last" and rec["val_accuracy"] is None


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu"], "--device gpu: not a device torch knows"),
    (["--out", "/proc/no/c.pt"], "cannot create the folder for the checkpoint"),
    (["--max-train", "0"], "--max-train"),
])
def test_training_setup_errors_come_before_training_without_traceback(tmp_path, args, message):
    imgs = np.stack([cv2.resize(_gray_faces()[0], (48, 48))] * 4)
    p1, p2 = write_ferplus_pair(tmp_path, imgs, np.array([0, 1, 2, 3]), ["Training"] * 4)
    base = ["train", "--fer2013", str(p1), "--ferplus", str(p2), "--out", str(tmp_path / "c.pt"), "--epochs", "1"]
    for i in range(0, len(args), 2):
        if args[i] in base:
            base[base.index(args[i]) + 1] = args[i + 1]
        else:
            base += args[i:i + 2]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output
    if not torch.cuda.is_available():
        plain = ["train", "--fer2013", str(p1), "--ferplus", str(p2), "--out", str(tmp_path / "c.pt"),
                 "--device", "cuda"]
        r = CliRunner().invoke(app, plain)
        assert r.exit_code == 2 and "CUDA is not available" in r.output, r.output
