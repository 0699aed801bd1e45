"""What a researcher sees around a training run: TensorBoard events, the per-epoch line with
its ETAs, ``--quiet``, ``--version`` / help / exit codes of cm-arr-train and cm-arr-results,
and ``cm-arr-results RUN_DIR --plots``.

Every run here is the real trainer on a tiny synthetic store (two folds, two epochs, a few
seconds on a CPU).
"""
from __future__ import annotations

import csv
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import cmarr
from cmarr.cli import EXIT_CODES_HELP
from cmarr.pipelines.cli.results import app as results_app
from cmarr.pipelines.cli.train import app as train_app
from cmarr.pipelines.data import StoreData
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.fold import FoldRecipe
from cmarr.pipelines.runtime import EpochClock, format_duration
from cmarr.pipelines.train import resolve_config, run_training

torch.set_num_threads(1)
runner = CliRunner()
CONDITIONS = ("t", "s", "v", "vt", "sv", "st", "svt", "avg")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("ux")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    return root, store, tiny_config(root / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(env):
    """A RUN_DIR of folds 1 and 2 (2 epochs each) with TensorBoard on, trained by the CLI."""
    root, store, cfg = env
    out = root / "run"
    res = runner.invoke(train_app, ["--features", str(store), "--config", str(cfg), "--folds", "1,2", "--out",
                                    str(out), "--device", "cpu", "--set", "log.tensorboard=true"])
    assert res.exit_code == 0, res.output
    return out, res.output


def read_log(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard run in ``folder``, as TensorBoard's reader sees it
    (purged events dropped): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_events_hold_the_log_csv_values(trained):
    out, _ = trained
    for k in (1, 2):
        rows = read_log(out / f"fold{k}" / "log.csv")
        got = scalars(out / "tensorboard" / f"fold{k}")
        loss_cols = [c for c in rows[0] if c.startswith(("loss_", "wloss_"))]
        assert "loss_total" in loss_cols and any(c.startswith("wloss_") for c in loss_cols)
        expected = ({f"train/{c}" for c in loss_cols} | {f"val_{m}/{c}" for m in ("war", "uar") for c in CONDITIONS}
                    | {"val/select", "optim/lr", "time/epoch_seconds"})
        assert set(got) == expected
        for tag, series in got.items():
            assert [s for s, _ in series] == [1, 2], tag  # one event per epoch
        same = {f"train/{c}": c for c in loss_cols} | {
            "val_war/avg": "val_war_avg", "val_uar/avg": "val_uar_avg", "val_war/svt": "val_war_full",
            "val_uar/svt": "val_uar_full", "val/select": "val_select", "time/epoch_seconds": "seconds"}
        for tag, col in same.items():
            np.testing.assert_allclose([v for _, v in got[tag]], [float(r[col]) for r in rows], rtol=1e-6,
                                       atol=1e-6, err_msg=tag)
        assert [v for _, v in got["optim/lr"]] == pytest.approx([1e-3, 1e-3])
        for c in CONDITIONS:
            assert all(0 <= v <= 1 for _, v in got[f"val_uar/{c}"])


class Killed(FoldRecipe):
    """A fold whose process dies during epoch 2, after epoch 1 was checkpointed (and logged)."""

    def train_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return super().train_epoch(epoch)


def test_tensorboard_of_a_resumed_or_retrained_fold_has_each_epoch_once(env, tmp_path):
    root, store, cfg = env
    tcfg = resolve_config(cfg, folds=[3], device="cpu", overrides={"log.tensorboard": True})
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Killed(tcfg, StoreData(store), 3, out, torch.device("cpu")).setup().fit()
    tb = out / "tensorboard" / "fold3"
    assert [s for s, _ in scalars(tb)["train/loss_total"]] == [1]
    run_training(store, tcfg, out_dir=out, log=None)
    rows = read_log(out / "fold3" / "log.csv")
    got = scalars(tb)
    assert [s for s, _ in got["train/loss_total"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in got["train/loss_total"]], [float(r["loss_total"]) for r in rows],
                               rtol=1e-6)
    # the fold trained again from scratch (its folder removed, as the lost-checkpoint message says):
    # the earlier events of its TensorBoard run are purged, not shown beside the new ones
    shutil.rmtree(out / "fold3")
    run_training(store, tcfg, out_dir=out, log=None)
    assert len(list(tb.glob("events.out.tfevents.*"))) == 3
    assert [s for s, _ in scalars(tb)["train/loss_total"]] == [1, 2]


def test_tensorboard_is_off_by_default_and_may_be_switched_on_at_resume(env, tmp_path):
    root, store, cfg = env
    out = tmp_path / "run"
    tcfg = resolve_config(cfg, folds=[1], device="cpu")
    assert tcfg.log.tensorboard is False
    run_training(store, tcfg, out_dir=out, folds=[2], log=None)
    assert (out / "fold2" / "metrics.json").is_file() and not (out / "tensorboard").exists()
    with pytest.raises(KeyboardInterrupt):
        Killed(tcfg, StoreData(store), 1, out, torch.device("cpu")).setup().fit()
    run_training(store, tcfg, out_dir=out, log=None, overrides={"log.tensorboard": True})  # the resume logs epoch 2
    assert [s for s, _ in scalars(out / "tensorboard" / "fold1")["val_uar/avg"]] == [2]


# ---------------------------------------------------------------- the per-epoch line

LINE = re.compile(r"fold (\d+) epoch (\d+)/(\d+): loss [\d.]+ val UAR avg [\d.]+ full [\d.]+ (\*| ) \| "
                  r"([\d.]+) s, ETA fold (\S+), run (\S+)$")


def seconds_of(text: str) -> float:
    """Inverse of ``format_duration``."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert m and text, text
    h, mi, s = (int(x or 0) for x in m.groups())
    return 3600 * h + 60 * mi + s


def test_epoch_clock_and_durations():
    clock = EpochClock(10)
    assert format_duration(clock.eta()) == "?"  # nothing measured yet
    clock.skip(4)  # a resumed fold had trained 4 of them
    clock.record(10.0)
    clock.record(20.0)
    assert clock.left == 4 and clock.eta() == 60.0 and clock.eta(1) == 15.0
    assert [format_duration(s) for s in (0.4, 42, 725, 11220)] == ["0s", "42s", "12m05s", "3h07m"]


def test_epoch_lines_show_seconds_best_and_etas_of_fold_and_run(env, tmp_path, monkeypatch):
    root, store, cfg = env
    slow = FoldRecipe.train_epoch

    def train_epoch(self, epoch):  # the real epoch, made about a second long so the ETAs are not all 0s
        import time

        time.sleep(0.9)
        return slow(self, epoch)

    monkeypatch.setattr(FoldRecipe, "train_epoch", train_epoch)
    lines = []
    run_training(store, cfg, out_dir=tmp_path / "run", folds=[1, 2], device="cpu", log=lines.append)
    parsed = [LINE.search(s) for s in lines if " epoch " in s]
    assert len(parsed) == 4 and all(parsed), lines
    took = []
    for i, m in enumerate(parsed):
        fold, epoch, epochs = int(m[1]), int(m[2]), int(m[3])
        took.append(float(m[5]))
        assert took[-1] >= 0.9
        mean = sum(took) / len(took)
        fold_left, run_left = epochs - epoch, (len(parsed) - 1 - i)
        assert seconds_of(m[6]) == pytest.approx(mean * fold_left, abs=1.0), lines
        assert seconds_of(m[7]) == pytest.approx(mean * run_left, abs=1.0), lines  # the later fold counted
        best = read_log(tmp_path / "run" / f"fold{fold}" / "log.csv")[epoch - 1]["best"]
        assert (m[4] == "*") == (best == "1")
    assert seconds_of(parsed[0][7]) >= 2  # 3 epochs still to come in the run after the first


def test_quiet_prints_no_epoch_lines_but_the_table(env, tmp_path):
    root, store, cfg = env
    args = ["--features", str(store), "--config", str(cfg), "--folds", "1", "--epochs", "1", "--device", "cpu"]
    loud = runner.invoke(train_app, args + ["--out", str(tmp_path / "a")])
    quiet = runner.invoke(train_app, args + ["--out", str(tmp_path / "b"), "--quiet"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, quiet.output
    assert "fold 1 epoch 1/1" in loud.output and "ETA fold" in loud.output
    assert " epoch " not in quiet.output and "ETA" not in quiet.output
    for res in (loud, quiet):
        assert "{s, v, t}" in res.output and "Avg." in res.output and "results in" in res.output


# ---------------------------------------------------------------- --version, help, exit codes

@pytest.mark.parametrize("app, name", [(train_app, "cm-arr-train"), (results_app, "cm-arr-results")])
def test_version_help_and_usage_exit_codes(app, name, tmp_path):
    res = runner.invoke(app, ["--version"])  # needs none of the required arguments
    assert res.exit_code == 0 and res.output.strip() == f"{name} (cm-arr) {cmarr.__version__}"
    command = typer.main.get_command(app)
    assert command.help and command.epilog == EXIT_CODES_HELP
    undocumented = [p.name for p in command.params if not getattr(p, "help", None)]
    assert not undocumented, undocumented
    text = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "Exit codes: 0 done" in " ".join(text.split())
    assert runner.invoke(app, ["--no-such-option"]).exit_code == 2


def test_train_exit_codes(env, tmp_path):
    root, store, cfg = env
    res = runner.invoke(train_app, ["--features", str(store), "--config", str(cfg), "--out", str(tmp_path / "r"),
                                    "--set", "log.tensorboard=maybe"])
    assert res.exit_code == 2 and "log.tensorboard: expected bool, got 'maybe'" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "r").exists()
    res = runner.invoke(train_app, ["--features", str(tmp_path / "none.h5"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "none.h5" in res.output and len(res.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- cm-arr-results --plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png_figure(path) -> None:
    """A real, non-blank PNG: signature, a valid IHDR chunk, pixels of more than one colour."""
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    img = mpimg.imread(str(path))
    assert img.shape[0] > 150 and img.shape[1] > 150 and img[..., :3].std() > 0.05, path


def test_plots_of_a_run_dir(trained, env, tmp_path):
    out, _ = trained
    res = runner.invoke(results_app, [str(out), "--plots", "--tsne"])
    assert res.exit_code == 0, res.output
    for name in ("confusion.png", "training_curves.png", "tsne.png"):
        assert_png_figure(out / "plots" / name)
        assert str(out / "plots" / name) in " ".join(res.output.split())
    # a moved store: a message naming --features, then --features finds it
    root, store, _ = env
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    (moved / "model_config.yaml").write_text((moved / "model_config.yaml").read_text().replace(str(store),
                                                                                              str(tmp_path / "x.h5")))
    shutil.rmtree(moved / "plots")
    res = runner.invoke(results_app, [str(moved), "--plots", "--tsne", "--tsne-fold", "2"])
    assert res.exit_code == 2 and "x.h5 is not there" in res.output and "--features" in res.output, res.output
    assert not (moved / "plots").exists()  # nothing drawn when a RUN_DIR is refused
    res = runner.invoke(results_app, [str(moved), "--plots", "--tsne", "--tsne-fold", "2", "--features", str(store)])
    assert res.exit_code == 0, res.output
    assert_png_figure(moved / "plots" / "tsne.png")


def test_plots_refuse_what_they_cannot_draw(trained, tmp_path):
    out, _ = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    started = tmp_path / "started"  # a run whose folds have not finished
    shutil.copytree(out, started, ignore=shutil.ignore_patterns("metrics.json", "plots"))
    cases = [([str(bare), "--plots"], f"{bare}: not a cm-arr-train RUN_DIR (no config.yaml)"),
             ([str(started), "--plots"], f"{started}: no finished fold (no fold*/metrics.json)"),
             ([str(out), "--plots", "--tsne", "--tsne-fold", "3"], "fold 3 is not finished"),
             ([str(out)], "give --out COMBINED_DIR to combine RUN_DIRs, or --plots"),
             ([str(out), "--plots", "--out", str(tmp_path / "c")], "one at a time"),
             ([str(out), "--tsne", "--out", str(tmp_path / "c")], "--tsne: only with --plots"),
             ([str(out), "--plots", "--tsne-fold", "1"], "--tsne-fold: not with --plots alone (add --tsne)")]
    for args, message in cases:
        res = runner.invoke(results_app, args)
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and message in text and "Traceback" not in text, (args, res.output)
    assert not (started / "plots").exists()
    # combine mode still works, on the same RUN_DIR
    res = runner.invoke(results_app, [str(out), "--out", str(tmp_path / "combined")])
    assert res.exit_code == 0 and (tmp_path / "combined" / "metrics.json").is_file(), res.output
