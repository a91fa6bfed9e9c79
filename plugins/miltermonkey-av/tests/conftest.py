"""Fixtures: one real clamd for the whole run, more on demand.

clamd with this tiny database starts in well under a second; the session
clamd (the brain's own ``clamd_server`` fixture, shared with the core's
tests) serves every test that does not stop or reconfigure it, and tests
that kill an engine get their own through ``make_clamd``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from av_helpers import unix
from miltermonkey_av.brain import AntiVirusBrain
from miltermonkey_av.testing import Clamd, signature_files

from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port


@pytest.fixture(scope="session")
def clamd(clamd_server: Clamd) -> Clamd:
    """The session clamd with every sample's signature."""
    return clamd_server


@pytest.fixture(scope="session")
def plain_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """clamd as Debian ships it, without AlertExceedsMax: it answers OK for what it
    stopped looking into, so only the brain's own structure limits stand in the way."""
    require_or_skip(Clamd)
    c = Clamd(tmp_path_factory.mktemp("plain-clamd"), free_port(), db_files=signature_files(),
              alert_exceeds_max=False)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_clamd(tmp_path: Path) -> Iterator[Callable[..., Clamd]]:
    """Factory for extra clamds (``cls=SmallStreamClamd`` for a small stream limit)."""
    require_or_skip(Clamd)
    started: list[Clamd] = []

    def make(cls: type[Clamd] = Clamd, port: int | None = None, start: bool = True) -> Clamd:
        c = cls(tmp_path / f"clamd{len(started)}", port or free_port(), db_files=signature_files())
        started.append(c)
        if start:
            c.start()
        return c

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def av(clamd: Clamd) -> Callable[..., AntiVirusBrain]:
    """``av(**options)``: an AV brain on the session clamd (UNIX socket unless given)."""
    from av_helpers import make_brain

    def build(**options: Any) -> AntiVirusBrain:
        options.setdefault("clamd", [unix(clamd)])
        return make_brain(**options)

    return build


@pytest.fixture
def tempdir_template(tmp_path: Path) -> str:
    d = tmp_path / "avtmp"
    d.mkdir()
    os.chmod(d, 0o700)
    return str(d / "av_%s")
