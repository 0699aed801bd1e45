"""What every command shares (``cmarr.cli``): ``--version`` on all six console scripts,
the exit-code table in the README, and a usage error (2) from each."""
from __future__ import annotations

import configparser
import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cmarr
from cmarr.cli import EXIT_PROBLEMS, EXIT_SIGNAL_BASE, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [x.strip() for x in cfg["options.entry_points"]["console_scripts"].splitlines() if x.strip()]
    return dict(tuple(p.strip() for p in line.split("=")) for line in lines)


def _app(target: str):
    module, func = target.split(":")
    mod = importlib.import_module(module)
    assert callable(getattr(mod, func)), target
    return mod.app


SCRIPTS = _scripts()


def test_six_commands_are_installed():
    assert set(SCRIPTS) == {"cm-arr-extract", "cm-arr-features", "cm-arr-denseface", "cm-arr-train",
                            "cm-arr-results", "cm-arr-predict"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version(name):
    res = runner.invoke(_app(SCRIPTS[name]), ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"{name} (cm-arr) {cmarr.__version__}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_an_unknown_option_is_a_usage_error_and_help_states_the_codes(name):
    app = _app(SCRIPTS[name])
    res = runner.invoke(app, ["--no-such-option"])
    assert res.exit_code == EXIT_USAGE, res.output
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "Exit codes: 0 done; 1 finished but found problems" in " ".join(res.output.split())


def test_the_readme_table_is_the_table_the_commands_use():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Exit codes"):]
    rows = dict(re.findall(r"^\| ([0-9 /]+) \| (.+) \|$", table, flags=re.M))
    assert rows["0"] == "done"
    assert rows[str(EXIT_PROBLEMS)].startswith("finished, but found problems in the data")
    assert rows[str(EXIT_USAGE)].startswith("bad input or usage, nothing written")
    assert rows[f"{EXIT_SIGNAL_BASE + 2} / {EXIT_SIGNAL_BASE + 15}"].startswith("interrupted by Ctrl-C / SIGTERM")


def test_missing_input_files_exit_2_everywhere(tmp_path):
    absent = str(tmp_path / "absent")
    cases = {
        "cm-arr-extract": ["features", "iemocap", "--root", str(tmp_path), "--manifest", absent + ".csv", "--out",
                           str(tmp_path / "o.h5"), "--modalities", "text"],
        "cm-arr-features": ["info", absent + ".h5"],
        "cm-arr-denseface": ["info", absent + ".pt"],
        "cm-arr-train": ["--features", absent + ".h5", "--out", str(tmp_path / "run")],
        "cm-arr-results": [absent, "--plots"],
        "cm-arr-predict": ["--checkpoint", absent + ".pt", "--media", absent + ".mp4"],
    }
    for name, args in cases.items():
        res = runner.invoke(_app(SCRIPTS[name]), args)
        assert res.exit_code == EXIT_USAGE, (name, res.output)
        assert "Traceback" not in res.output and "absent" in res.output, (name, res.output)
