"""Pytest fixtures of the AV brain, loaded by pytest from the ``pytest11`` entry point.

* ``clamd_server``: one private clamd for the test session, with the test
  signatures (EICAR and every :data:`~miltermonkey_av.testing.samples.SAMPLES`
  marker) on ``.tcp_address`` and ``.unix_socket``; skipped where clamd is
  not installed, unless ``MILTERMONKEY_REQUIRE_STACK=1``.  Tests that stop it
  must start it again; tests that kill it should start their own
  :class:`~miltermonkey_av.testing.engine.Clamd`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from miltermonkey_av.testing.engine import Clamd
from miltermonkey_av.testing.samples import signature_files
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A private clamd with the test signatures, for the whole session."""
    require_or_skip(Clamd)
    clamd = Clamd(tmp_path_factory.mktemp("clamd"), free_port(), db_files=signature_files())
    clamd.start()
    try:
        yield clamd
    finally:
        clamd.stop()
