"""Fixtures shared by several test modules of the core's own suite.

The suite is arranged by tier: ``unit/`` (in-process), ``daemon/`` (the
daemon over real sockets, no MTA), ``e2e/`` (real Postfix or Sendmail,
clamd, spamd, Redis), ``meta/`` (the docs, packaging, the scaffold and the
example brain), ``fleet/`` (``nox -s fleet``).  ``support/`` holds helpers
several tiers import; ``dists/`` the brain distributions the tests install.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

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
