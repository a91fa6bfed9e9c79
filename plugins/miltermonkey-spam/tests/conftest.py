"""Fixtures for the spam brain's tests: one real spamd for the whole run.

spamd takes 1-2 s and ~400 MB to start, so it is started once per test
session (every module shares it) and stopped at the end.  Tests that stop
spamd on purpose start a private one instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from miltermonkey_core.testing import stack

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def spamd(spamd_server: stack.Spamd) -> stack.Spamd:
    """The core plugin's session spamd, shared with the core's own tests (one start)."""
    return spamd_server


@pytest.fixture(scope="session")
def spamd_address(spamd: stack.Spamd) -> str:
    host, port = spamd.address
    return f"{host}:{port}"
