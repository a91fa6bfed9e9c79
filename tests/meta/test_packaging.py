"""The published distributions: built as ``nox -s build`` builds them, installed as a user would.

``pip install --find-links dist miltermonkey-av miltermonkey-spam`` into a
fresh virtualenv (no path, no ``-e``) must give a working ``miltermonkey``
that lists both brains, with versions from the packages' ``__version__``,
brains that accept only a compatible core, and nothing that needs a compiler.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import miltermonkey_av
import miltermonkey_spam
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from user_venv import SOURCES, UserVenv, build_distributions, wheel_metadata, wheels_by_name

import miltermonkey_core

VERSIONS = {
    "miltermonkey-core": miltermonkey_core.__version__,
    "miltermonkey-av": miltermonkey_av.__version__,
    "miltermonkey-spam": miltermonkey_spam.__version__,
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdists and wheels of the three distributions, built once for this module."""
    out = tmp_path_factory.mktemp("dist")
    build_distributions(SOURCES.values(), out)
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserVenv]:
    venv = UserVenv(tmp_path_factory.mktemp("user") / "venv")
    venv.install_from(dist, "miltermonkey-av", "miltermonkey-spam")
    yield venv
    venv.remove()


def test_every_distribution_is_built_as_sdist_and_pure_wheel(dist: Path) -> None:
    names = sorted(p.name for p in dist.iterdir())
    expected = []
    for project, version in VERSIONS.items():
        stem = f"{project.replace('-', '_')}-{version}"
        expected += [f"{stem}-py3-none-any.whl", f"{stem}.tar.gz"]
    assert names == sorted(expected)


def test_versions_come_from_each_package(dist: Path) -> None:
    wheels = wheels_by_name(dist)
    assert {name: wheel_metadata(w)["Version"] for name, w in wheels.items()} == VERSIONS


@pytest.mark.parametrize("brain", ["miltermonkey-av", "miltermonkey-spam"])
def test_brains_require_a_compatible_core(dist: Path, brain: str) -> None:
    meta = wheel_metadata(wheels_by_name(dist)[brain])
    core = [Requirement(r) for r in meta.get_all("Requires-Dist") or []
            if Requirement(r).name == "miltermonkey-core"]
    assert len(core) == 1 and core[0].marker is None
    this = Version(miltermonkey_core.__version__)
    assert this in core[0].specifier
    # the next minor release may change the brain API: a brain must not accept it unseen
    assert Version(f"{this.major}.{this.minor + 1}.0") not in core[0].specifier


def test_core_needs_no_compiled_dependency(dist: Path) -> None:
    meta = wheel_metadata(wheels_by_name(dist)["miltermonkey-core"])
    runtime = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist") or []
               if "extra ==" not in r}
    assert {"attrs", "pluggy"} <= runtime
    # the daemon speaks the milter protocol itself: no libmilter binding to compile
    assert "pymilter" not in runtime
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "MIT"
    assert meta["Description-Content-Type"] == "text/markdown"


def test_wheels_carry_their_data_files_and_entry_points(dist: Path) -> None:
    wheels = wheels_by_name(dist)
    with zipfile.ZipFile(wheels["miltermonkey-core"]) as z:
        files = set(z.namelist())
        entry_points = z.read("miltermonkey_core-"
                              f"{VERSIONS['miltermonkey-core']}.dist-info/entry_points.txt")
    assert {"miltermonkey_core/default.toml", "miltermonkey_core/py.typed"} <= files
    assert "miltermonkey_core/scaffold/brain.py.tmpl" in files
    assert b"miltermonkey = miltermonkey_core.cli:main" in entry_points
    assert b"trivial = miltermonkey_core.brains.trivial:TrivialBrain" in entry_points
    with zipfile.ZipFile(wheels["miltermonkey-av"]) as z:
        assert any(n.startswith("miltermonkey_av/templates/") for n in z.namelist())
        assert "miltermonkey_av/py.typed" in z.namelist()


def test_sdists_build_from_their_own_pyproject(dist: Path) -> None:
    for project, version in VERSIONS.items():
        stem = f"{project.replace('-', '_')}-{version}"
        with tarfile.open(dist / f"{stem}.tar.gz") as t:
            names = set(t.getnames())
        assert {f"{stem}/pyproject.toml", f"{stem}/README.md", f"{stem}/PKG-INFO"} <= names


def test_pip_install_from_dist_gives_both_brains(installed: UserVenv) -> None:
    out = installed.command("miltermonkey", "brains").stdout
    for line in (f"av  (miltermonkey-av {VERSIONS['miltermonkey-av']})",
                 f"spam  (miltermonkey-spam {VERSIONS['miltermonkey-spam']})",
                 f"trivial  (miltermonkey-core {VERSIONS['miltermonkey-core']})"):
        assert line in out, out
    assert "error:" not in out, out
    version = installed.command("miltermonkey", "--version").stdout
    assert version.strip() == f"miltermonkey {VERSIONS['miltermonkey-core']}"
    installed.pip("check")


def test_installed_environment_is_pure_python(installed: UserVenv) -> None:
    assert installed.impure_distributions() == []
    freeze = installed.pip("freeze", "--all").stdout
    assert "pymilter" not in freeze.lower(), freeze


def test_installed_brains_load_from_a_config(installed: UserVenv, tmp_path: Path) -> None:
    config = tmp_path / "mm.toml"
    config.write_text('[miltermonkey]\nconnection = "inet:8890@127.0.0.1"\nmilter_key = false\n'
                      '\n[[brain]]\nuse = "av"\nclamd = ["127.0.0.1:3310"]\n'
                      '\n[[brain]]\nuse = "spam"\nservers = ["127.0.0.1:783"]\n')
    shown = installed.command("miltermonkey", "show-config", "-c", config).stdout
    assert 'use = "av"' in shown and 'use = "spam"' in shown
