"""Fixtures for the spam brain's tests: one real spamd for the whole run.

spamd takes 1-2 s and ~400 MB to start, so it is started once per test
session (every module shares it; it is the brain's own ``spamd_server``
fixture, shared with the core's tests) and stopped at the end.  Tests that
stop spamd on purpose start a private one instead.
"""

from __future__ import annotations

import pytest
from miltermonkey_spam.testing import Spamd


@pytest.fixture(scope="session")
def spamd(spamd_server: Spamd) -> Spamd:
    """The session spamd of the brain's pytest plugin (one start for every test)."""
    return spamd_server


@pytest.fixture(scope="session")
def spamd_address(spamd: Spamd) -> str:
    host, port = spamd.address
    return f"{host}:{port}"
