"""The embedded default config adds the av and spam brains when their engines answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from miltermonkey_av.testing import Clamd
from miltermonkey_spam.testing import Spamd

from miltermonkey_core import config
from miltermonkey_core.testing.process import free_port

pytestmark = pytest.mark.engines


@pytest.fixture
def engines(clamd_server: Clamd,
            spamd_server: Spamd) -> tuple[Clamd, Spamd]:
    return clamd_server, spamd_server


def test_trivial_only_when_no_engine_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(config, "CLAMD_DEFAULTS", (f"tcp:{dead}",))
    monkeypatch.setattr(config, "SPAMD_DEFAULTS", (dead,))
    c = config.embedded_default(installed={"trivial": 1, "av": 1, "spam": 1})
    assert [b.use for b in c.brains] == ["trivial"]


def test_av_and_spam_added_when_clamd_and_spamd_answer(
    engines: tuple[Clamd, Spamd], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clamd, spamd = engines
    missing = tmp_path / "no-such.ctl"
    monkeypatch.setattr(config, "CLAMD_DEFAULTS",
                        (f"unix:{missing}", f"unix:{clamd.unix_socket}"))
    monkeypatch.setattr(config, "SPAMD_DEFAULTS", (f"127.0.0.1:{spamd.address[1]}",))
    c = config.embedded_default(installed={"trivial": 1, "av": 1, "spam": 1})
    assert [b.use for b in c.brains] == ["trivial", "av", "spam"]
    assert c.brains[1].options == {"clamd": [f"unix:{clamd.unix_socket}"]}
    assert c.brains[2].options == {"servers": [f"127.0.0.1:{spamd.address[1]}"]}
    # not installed: not added, even with the engine up
    c = config.embedded_default(installed={"trivial": 1})
    assert [b.use for b in c.brains] == ["trivial"]
