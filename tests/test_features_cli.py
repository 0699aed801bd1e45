"""``cm-arr-features`` and ``cm-arr-denseface``: --version, help and the exit codes of cmarr.cli."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import cmarr
from cmarr.cli import EXIT_CODES_HELP
from cmarr.extract.cli import denseface, store
from cmarr.pipelines.demo.synthetic import make_synthetic_store

runner = CliRunner()
APPS = {"cm-arr-features": store.app, "cm-arr-denseface": denseface.app}


def run(app, *args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("s") / "feats.h5", n_per_class=1, sessions=2)


@pytest.mark.parametrize("name", APPS)
def test_version(name):
    code, text = run(APPS[name], "--version")
    assert code == 0 and text.strip() == f"{name} (cm-arr) {cmarr.__version__}"


def test_version_of_the_installed_command():
    r = subprocess.run([sys.executable, "-m", "cmarr.extract.cli.store", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"cm-arr-features (cm-arr) {cmarr.__version__}", r.stderr


@pytest.mark.parametrize("name", APPS)
def test_help_gives_the_exit_codes_and_every_parameter_has_help(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    code, text = run(APPS[name], "--help")
    assert code == 0 and "Exit codes: 0 done; 1 finished but found problems" in " ".join(text.split())
    group = typer.main.get_command(APPS[name])
    for cmd_name, cmd in group.commands.items():
        assert cmd.epilog == EXIT_CODES_HELP, cmd_name
        for p in cmd.params:
            assert (getattr(p, "help", None) or "").strip(), f"{name} {cmd_name}: {p.name} has no help"


def test_features_exit_codes(feats, tmp_path):
    # bad input or usage: 2
    code, text = run(store.app, "info", tmp_path / "nope.h5")
    assert code == 2 and "nope.h5: no such file" in text
    code, text = run(store.app, "errors", feats, "--modality", "smell")
    assert code == 2 and "--modality 'smell'" in text
    code, text = run(store.app, "validate", feats, "--manifest", tmp_path / "none.csv")
    assert code == 2 and "none.csv: no such file" in text
    code, text = run(store.app, "info", feats, "--no-such-option")
    assert code == 2
    # the store is sound: 0; validated against a manifest it does not cover: 1 (problems in the data)
    t = store.FeatureStore(feats).utterances
    code, text = run(store.app, "validate", feats)
    assert code == 0, text
    man = tmp_path / "man.csv"
    pd.concat([t, t.iloc[:1].assign(utterance_id="extra_utt")]).to_csv(man, index=False)
    code, text = run(store.app, "validate", feats, "--manifest", man)
    assert code == 1 and "problem(s) found" in text and "Traceback" not in text


def test_interrupted_commands_exit_130_or_143(feats, tmp_path, monkeypatch):
    from cmarr.extract.interrupts import Terminated

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    def terminated(*a, **k):
        raise Terminated("signal 15 (SIGTERM)")

    monkeypatch.setattr(store, "validate_store", interrupted)
    code, text = run(store.app, "validate", feats)
    assert code == 130 and "interrupted (Ctrl-C); nothing was changed" in text and "Aborted" not in text
    monkeypatch.setattr(store, "merge_stores", terminated)
    code, text = run(store.app, "merge", feats, "--out", tmp_path / "m.h5")
    assert code == 143 and f"terminated (SIGTERM); nothing was written at {tmp_path / 'm.h5'}" in text

    import cmarr.extract.denseface_train as dt

    monkeypatch.setattr(dt, "train_denseface", interrupted)
    code, text = run(denseface.app, "train", "--fer2013", tmp_path / "a.csv", "--ferplus", tmp_path / "b.csv",
                     "--out", tmp_path / "d.pt")
    assert code == 130 and "no checkpoint was written at" in text and "Traceback" not in text


def test_denseface_exit_codes(tmp_path):
    code, text = run(denseface.app, "info", tmp_path / "nope.pt")
    assert code == 2 and "nope.pt" in text and "Traceback" not in text
    code, text = run(denseface.app, "train", "--fer2013", tmp_path / "a.csv", "--ferplus", tmp_path / "b.csv",
                     "--out", tmp_path / "d.pt", "--label-rule", "vote")
    assert code == 2 and "vote" in text and "Traceback" not in text
    code, text = run(denseface.app, "train", "--epochs", "0", "--fer2013", "a", "--ferplus", "b", "--out", "c")
    assert code == 2
