"""Fixtures shared by several test modules of the core's own suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from user_venv import ROOT, UserVenv, build_distributions


@pytest.fixture(scope="session")
def author_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserVenv]:
    """A brain author's fresh virtualenv: the core from this checkout with its test extra.

    Shared by the new-brain walk-through and the example brain, which each
    pip-install their package into it (different names, so they coexist).
    """
    base = tmp_path_factory.mktemp("author")
    wheels = base / "wheels"
    build_distributions([ROOT], wheels)
    venv = UserVenv(base / "venv")
    venv.install_from(wheels, "miltermonkey-core[test]")
    yield venv
    venv.remove()
