"""Packaging: setup.cfg's compatible ranges and constraints.txt's tested pins agree, and
the package says its version."""
from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["dev"].splitlines()
    return [Requirement(x.strip()) for x in lines if x.strip() and not x.strip().startswith("#")]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[req.name.lower()] = spec.version
    return pins


def test_every_requirement_is_pinned_and_every_pin_lies_in_its_range():
    reqs, pins = _requirements(), _pins()
    names = {r.name.lower() for r in reqs}
    assert names <= set(pins), f"not pinned in constraints.txt: {sorted(names - set(pins))}"
    assert set(pins) <= names, f"pinned but not required: {sorted(set(pins) - names)}"
    for r in reqs:
        assert r.specifier.contains(pins[r.name.lower()], prereleases=True), \
            f"constraints.txt pins {r.name}=={pins[r.name.lower()]}, outside setup.cfg's {r.specifier}"


def test_ranges_are_ranges_except_the_linter():
    """Exact pins in install_requires would conflict with other tools' requirements."""
    for r in _requirements():
        if r.name == "ruff":  # the linter's rules change between releases: CI runs the pinned one
            continue
        assert not any(s.operator == "==" for s in r.specifier), f"{r}: an exact pin in setup.cfg"


def test_the_installed_versions_are_the_pins():
    """What `make install` installed is what constraints.txt says (a stale .venv shows here)."""
    for name, version in _pins().items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, pinned {version}"


def test_version_attribute_is_the_package_metadata():
    import cmarr

    assert cmarr.__version__ == metadata.version("cm-arr")
