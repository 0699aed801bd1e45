"""Report writers on small hand-made arrays, the demo's pieces, and the demo itself.

``test_quick_demo_end_to_end`` runs ``python -m cmarr.pipelines.demo --quick`` (20
utterances, every stage real: corpus, manifest, MTCNN + Denseface, wav2vec2, MiniLM, 2
variants x 5 folds, report): about 30 s on two idle cores.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmarr.extract.base import LABELS
from cmarr.pipelines import plots
from cmarr.pipelines.demo import report
from cmarr.pipelines.metrics import build_metrics, score

CONDS = ("t", "s", "v", "vt", "sv", "st", "svt")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_pixels(path) -> np.ndarray:
    """Decode a PNG with matplotlib (checks the file is a real PNG) -> (H, W, C) floats."""
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    # the IHDR chunk comes first and its CRC must hold
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    crc = struct.unpack(">I", data[16 + length:20 + length])[0]
    assert zlib.crc32(data[12:16 + length]) == crc
    return mpimg.imread(str(path))


def assert_nontrivial_png(path, min_size=(200, 200)) -> None:
    img = png_pixels(path)
    h, w = img.shape[:2]
    assert h >= min_size[0] and w >= min_size[1], (h, w)
    rgb = img[..., :3].reshape(-1, 3)
    # a blank or single-colour figure would fail both
    assert rgb.std() > 0.05
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20


def fake_metrics(seed: int, skill: float, folds=(1, 2, 3)) -> dict:
    """A metrics document built with the trainer's own functions from drawn predictions:
    a share ``skill`` of predictions is correct, the rest uniform."""
    rng = np.random.default_rng(seed)
    per_fold = {}
    for f in folds:
        per_fold[f] = {}
        for c in CONDS:
            y = np.repeat(np.arange(4), 5)
            p = np.where(rng.random(len(y)) < skill, y, rng.integers(0, 4, len(y)))
            per_fold[f][c] = score(y, p, 4)
    return build_metrics(per_fold, LABELS)


@pytest.fixture(scope="module")
def metrics():
    return {"cm-arr": fake_metrics(0, 0.7), "baseline": fake_metrics(1, 0.4)}


def test_comparison_table_has_every_row_and_the_right_numbers(metrics):
    md = report.comparison_markdown(metrics)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Avail. | CM-ARR WAR | CM-ARR UAR | Baseline WAR | Baseline UAR")
    names = ["{t}", "{s}", "{v}", "{v, t}", "{s, v}", "{s, t}", "**Avg.**", "{s, v, t}"]
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == names
    # the {s, v, t} cell is the mean over folds of the per-fold UAR, in %
    uars = [metrics["baseline"]["folds"][f]["svt"]["uar"] for f in ("1", "2", "3")]
    cell = lines[-1].split("|")[5].strip()
    assert cell.startswith(f"{100 * np.mean(uars):.2f} ± {100 * np.std(uars, ddof=1):.2f}")
    rows = report.comparison_rows(metrics)
    assert len(rows) == 8 and all(r["cm-arr_war"] is not None for r in rows)


def test_results_md_names_models_and_holds_the_tables(tmp_path, metrics):
    summary = {
        "config": {"seed": 3, "sessions": [1, 2, 3], "epochs": 4, "lr": 1e-3, "batch_size": 16,
                   "model": {"d_model": 32}, "video_fps": 10.0, "frame_size": [240, 160], "sample_fps": 1.0,
                   "quick": False},
        "out": "demo_out",
        "corpus": {"dialogs": 6, "counts": {"total": 48, "per_label": {"ang": 12, "hap": 12, "neu": 12, "sad": 12}},
                   "audio_note": "synthesized voice", "faces": "astronaut, grace_hopper"},
        "manifest": {"utterances": 48, "dropped": {"consensus not in the 4-class set": 12}},
        "models": {"speech": {"hidden_size": 64, "layers": 2, "params": 12345},
                   "text": {"weights": "real (MiniLM)"}},
        "metrics": metrics,
        "times": [{"stage": "corpus", "wall_s": 2.5, "cpu_s": 1.5},
                  {"stage": "features", "wall_s": 30.0, "cpu_s": 40.0}],
        "total_wall_s": 32.5,
        "figures": {"tsne": "tsne.png"},
        "tsne_fold": 1,
    }
    path = report.write_results_md(tmp_path / "results.md", summary)
    text = path.read_text()
    assert "--seed 3" in text
    assert "random weights" in text and "real weights" in text
    for name in ("{t}", "{s}", "{v}", "{v, t}", "{s, v}", "{s, t}", "**Avg.**", "{s, v, t}"):
        assert f"| {name} |" in text
    assert "| CM-ARR | Avg. |" in text and "| Baseline | {s, v, t} |" in text  # per-fold table
    assert "| features | 30.0 | 40.0 |" in text and "**32.5**" in text
    assert "![tsne](tsne.png)" in text
    assert "synthesized voice" in text
    assert "WAR and UAR coincide" in text  # every fake test fold has 5 utterances per class


def test_confusion_figure(tmp_path, metrics):
    mats = {v: plots.confusion_totals(metrics[v]) for v in metrics}
    # the "missing" group sums the six missing conditions over folds
    expect = sum(np.asarray(metrics["cm-arr"]["folds"][f][c]["confusion"]) for f in ("1", "2", "3")
                 for c in ("t", "s", "v", "vt", "sv", "st"))
    np.testing.assert_array_equal(mats["cm-arr"]["missing"], expect)
    assert mats["cm-arr"]["svt"].sum() == 3 * 20
    path = plots.write_confusion_figure(tmp_path / "cm.png", mats)
    assert_nontrivial_png(path)
    with pytest.raises(ValueError, match="shape"):
        plots.write_confusion_figure(tmp_path / "bad.png", {"x": {"svt": np.ones((3, 3))}})


def write_log(folder, epochs, rng):
    folder.mkdir(parents=True)
    df = pd.DataFrame({"epoch": np.arange(1, epochs + 1),
                       "loss_total": np.linspace(3, 1, epochs) + rng.normal(0, 0.05, epochs),
                       "val_uar_avg": np.clip(np.linspace(0.25, 0.6, epochs) + rng.normal(0, 0.03, epochs), 0, 1),
                       "best": (np.arange(epochs) % 2 == 0).astype(int)})
    df.to_csv(folder / "log.csv", index=False)
    return df


def test_training_curves_from_logs(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for v in ("cm-arr", "baseline"):
        for k in (1, 2, 10):
            written[(v, k)] = write_log(tmp_path / v / f"fold{k}", 6, rng)
    logs = {v: plots.read_training_logs(tmp_path / v) for v in ("cm-arr", "baseline")}
    assert list(logs["cm-arr"]) == [1, 2, 10]  # numeric order, not "fold10" < "fold2"
    pd.testing.assert_frame_equal(logs["baseline"][2], written[("baseline", 2)])
    path = plots.write_training_curves(tmp_path / "curves.png", logs)
    assert_nontrivial_png(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        plots.read_training_logs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no column"):
        plots.write_training_curves(tmp_path / "x.png", {"v": {1: logs["cm-arr"][1].drop(columns="val_uar_avg")}})


def fake_reps(condition: str, n: int, d: int, rng) -> dict[str, np.ndarray]:
    """What ``collect_reps`` returns for ``n`` utterances under ``condition`` (all present)."""
    avail = np.array([m[0] in condition for m in ("speech", "text", "video")])
    labels = np.arange(n) % 4
    centres = rng.normal(0, 3, (4, d))
    out = {"labels": labels, "utterance_ids": np.array([f"u{i}" for i in range(n)]),
           "present_mask": np.ones((n, 3), bool), "recon_mask": np.tile(~avail, (n, 1))}
    for i, m in enumerate(("speech", "text", "video")):
        out[f"real_{m}"] = (centres[labels] + rng.normal(0, 0.3, (n, d))).astype(np.float32)
        rec = centres[labels] + rng.normal(0.5, 0.6, (n, d))
        out[f"recon_{m}"] = np.where(~avail[i], rec, np.nan).astype(np.float32)
    return out


def test_tsne_panels_and_figure(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 12, 8
    reps = {v: {c: fake_reps(c, n, d, rng) for c in ("t", "s", "v", "vt", "sv", "st")} for v in ("cm-arr", "baseline")}
    panels = plots.tsne_panels(reps)
    # speech is missing under t, v, vt: 3 reconstructed points per utterance; real ones once each
    p = panels["cm-arr"]["speech"]
    assert p["recon"].shape == (3 * n, d) and p["real"].shape == (n, d)
    np.testing.assert_array_equal(p["recon_labels"], np.tile(np.arange(n) % 4, 3))
    assert np.isfinite(p["recon"]).all()
    path = plots.write_tsne_figure(tmp_path / "tsne.png", panels, title="test")
    assert_nontrivial_png(path, (300, 400))
    z = plots.tsne_embed(p["real"], seed=0)
    assert z.shape == (n, 2) and np.isfinite(z).all()
    bad = {"cm-arr": {"speech": {**p, "recon": np.full_like(p["recon"], np.nan)}}}
    with pytest.raises(ValueError, match="non-finite"):
        plots.write_tsne_figure(tmp_path / "bad.png", bad)


def test_the_demo_draws_with_the_plots_module_writers():
    """One copy of each figure writer: the demo's report names the functions of
    cmarr.pipelines.plots (what cm-arr-results --plots draws with), not copies of them."""
    for name in ("confusion_totals", "write_confusion_figure", "read_training_logs", "write_training_curves",
                 "tsne_panels", "tsne_embed", "write_tsne_figure"):
        assert getattr(report, name) is getattr(plots, name), name
        assert getattr(plots, name).__module__ == "cmarr.pipelines.plots"


def test_damaged_training_log_names_its_file(tmp_path):
    (tmp_path / "fold1").mkdir()
    (tmp_path / "fold1" / "log.csv").write_text("")
    with pytest.raises(ValueError, match=r"fold1/log\.csv: not a training log"):
        plots.read_training_logs(tmp_path)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    from cmarr.pipelines.demo import DemoError
    from cmarr.pipelines.demo.run import MARKER, prepare_out

    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not a previous demo output"):
        prepare_out(other)
    assert (other / "precious.txt").read_text() == "keep me"
    mine = tmp_path / "demo_out"
    prepare_out(mine)
    (mine / "runs").mkdir()
    (mine / "runs" / "old.txt").write_text("old")
    prepare_out(mine)  # a previous demo output is emptied
    assert sorted(p.name for p in mine.iterdir()) == [MARKER]
    with pytest.raises(DemoError, match="cannot be created or written"):
        prepare_out(Path("/proc/no-demo-here"))


def test_random_wav2vec2_loads_through_the_extractor(tmp_path):
    from cmarr.extract.speech import SpeechConfig, SpeechExtractor
    from cmarr.pipelines.demo.models import build_random_wav2vec2
    from cmarr.pipelines.demo.run import DemoConfig

    info = build_random_wav2vec2(tmp_path / "w2v", DemoConfig().wav2vec2, seed=0)
    ex = SpeechExtractor(SpeechConfig(model=info["path"], device="cpu"))
    assert ex.dim == 64 and ex.frame_rate == 50.0
    assert ex.provenance()["model"] == info["path"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_utterance_has_the_asked_duration_and_follows_the_style():
    from cmarr.pipelines.demo.espeak import espeak_utterance

    loud = espeak_utterance("I hate this, stop it now", "ang", "M", 1.3)
    quiet = espeak_utterance("I hate this, stop it now", "sad", "M", 1.3)
    assert loud.shape == quiet.shape == (int(round(1.3 * 16000)),)
    assert np.sqrt(np.mean(loud ** 2)) > 1.5 * np.sqrt(np.mean(quiet ** 2))


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    res = subprocess.run([sys.executable, "-m", "cmarr.pipelines.demo", "--out", str(out), "--quick", "--seed", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    assert "Table 2 layout" in text and "{s, v, t}" in text and "Avg." in text
    assert "RANDOM" in text and ("espeak-ng speech" in text or "synthesized voice" in text)

    rep = out / "report"
    summary = json.loads((rep / "summary.json").read_text())
    for v in ("cm-arr", "baseline"):
        folds = summary["metrics"][v]["folds"]
        assert sorted(folds) == ["1", "2", "3", "4", "5"]
        for f in folds.values():  # each test session: one utterance per class, scored under 7 conditions
            assert all(f[c]["n"] == 4 for c in CONDS)
            assert 0.0 <= f["svt"]["uar"] <= 1.0
    md = (rep / "results.md").read_text()
    for name in ("{t}", "{s}", "{v}", "{v, t}", "{s, v}", "{s, t}", "**Avg.**", "{s, v, t}"):
        assert f"| {name} |" in md
    svt = summary["metrics"]["cm-arr"]["summary"]["svt"]["uar_mean"]
    assert f"| {{s, v, t}} | {100 * svt:.2f} ±" in md  # the table shows what the run measured
    for name in ("confusion.png", "training_curves.png", "tsne.png"):
        assert_nontrivial_png(rep / name)

    from cmarr.extract.store import FeatureStore

    store = FeatureStore(out / "features.h5")
    assert set(store.modalities) == {"speech", "text", "video"} and len(store.utterances) == 20
    assert store.provenance["video"]["random_weights"] is True
    assert store.dims["speech"] == 64 and store.dims["text"] == 384 and store.dims["video"] == 342
    # a second run into the same folder replaces the previous demo output
    assert (out / ".cm-arr-demo").is_file()
