"""Fixtures for the spam brain's tests: one real spamd for the whole run.

spamd takes 1-2 s and ~400 MB to start, so it is started once per test
session (every module shares it) and stopped at the end.  Tests that stop
spamd on purpose start a private one instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from miltermonkey_core.testing import stack

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.Spamd]:
    """A running private spamd on a free loopback port (Debian's rules, ``-L``)."""
    stack.require_or_skip(stack.Spamd)
    part = stack.Spamd(tmp_path_factory.mktemp("spamd"), stack.free_port())
    part.start()
    try:
        yield part
    finally:
        part.stop()


@pytest.fixture(scope="session")
def spamd_address(spamd: stack.Spamd) -> str:
    host, port = spamd.address
    return f"{host}:{port}"
