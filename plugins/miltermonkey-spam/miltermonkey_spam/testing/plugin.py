"""Pytest fixtures of the spam brain, loaded by pytest from the ``pytest11`` entry point.

* ``spamd_server``: one private spamd for the test session (SpamAssassin's
  shipped rules, no network tests), on ``.address`` = ``(host, port)``;
  skipped where spamd is not installed, unless ``MILTERMONKEY_REQUIRE_STACK=1``.
  It takes 1-2 s and about 400 MB to start, hence once per session; tests
  that stop or kill spamd start their own
  :class:`~miltermonkey_spam.testing.engine.Spamd`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port
from miltermonkey_spam.testing.engine import Spamd


@pytest.fixture(scope="session")
def spamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    """A private spamd with SpamAssassin's shipped rules (``-L``), for the whole session."""
    require_or_skip(Spamd)
    spamd = Spamd(tmp_path_factory.mktemp("spamd"), free_port())
    spamd.start()
    try:
        yield spamd
    finally:
        spamd.stop()
