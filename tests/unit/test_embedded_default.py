"""The embedded default config adds the av and spam brains when their engines answer."""

from __future__ import annotations

from pathlib import Path

import miltermonkey_av.brain
import miltermonkey_spam.brain
import pytest
from miltermonkey_av.testing import Clamd
from miltermonkey_spam.testing import Spamd

from miltermonkey_core import config, plugins
from miltermonkey_core.testing.process import free_port

pytestmark = pytest.mark.engines


@pytest.fixture
def engines(clamd_server: Clamd,
            spamd_server: Spamd) -> tuple[Clamd, Spamd]:
    return clamd_server, spamd_server


def test_trivial_only_when_no_engine_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(miltermonkey_av.brain, "CLAMD_DEFAULTS", (f"tcp:{dead}",))
    monkeypatch.setattr(miltermonkey_spam.brain, "SPAMD_DEFAULTS", (dead,))
    installed = plugins.installed_brains()
    c = config.embedded_default(installed=installed,
                                detected=plugins.detect_local_engines(installed))
    assert [b.use for b in c.brains] == ["trivial"]


def test_av_and_spam_added_when_clamd_and_spamd_answer(
    engines: tuple[Clamd, Spamd], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clamd, spamd = engines
    missing = tmp_path / "no-such.ctl"
    monkeypatch.setattr(miltermonkey_av.brain, "CLAMD_DEFAULTS",
                        (f"unix:{missing}", f"unix:{clamd.unix_socket}"))
    monkeypatch.setattr(miltermonkey_spam.brain, "SPAMD_DEFAULTS",
                        (f"127.0.0.1:{spamd.address[1]}",))
    installed = plugins.installed_brains()
    c = config.embedded_default(installed=installed,
                                detected=plugins.detect_local_engines(installed))
    assert [b.use for b in c.brains] == ["trivial", "av", "spam"]
    assert c.brains[1].options == {"clamd": [f"unix:{clamd.unix_socket}"]}
    assert c.brains[2].options == {"servers": [f"127.0.0.1:{spamd.address[1]}"]}
    # not installed: not added, even with the engine up
    only_trivial = {"trivial": installed["trivial"]}
    c = config.embedded_default(installed=only_trivial,
                                detected=plugins.detect_local_engines(only_trivial))
    assert [b.use for b in c.brains] == ["trivial"]
