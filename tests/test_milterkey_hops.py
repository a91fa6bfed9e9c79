"""Two real hops with the real brains: AV scanned on the relay is not scanned again at the MX.

Hop 1 (an outbound relay) runs av and spam on a real clamd and spamd and
signs the message; hop 2 (the MX, same secret) has ``skip_if_key`` on for av
only.  clamd is stopped before hop 2 sees the message: if av were not
skipped, its tempfail policy would refuse the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from miltermonkey_core.milterkey import generate_secret_file
from miltermonkey_core.testing.client import run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.replies import Disposition

if TYPE_CHECKING:  # the brains are imported only after importorskip
    from miltermonkey_av.testing import Clamd
    from miltermonkey_spam.testing import Spamd

pytest.importorskip("miltermonkey_av")
pytest.importorskip("miltermonkey_spam")
pytestmark = pytest.mark.engines

CLEAN = (b"From: alice@relay.example\r\nTo: bob@mx.example\r\nSubject: quarterly numbers\r\n"
         b"Message-ID: <hops-1@relay.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\n"
         b"Hello Bob,\r\nthe numbers are attached in the usual place.\r\nAlice\r\n")


@pytest.fixture
def engines(clamd_server: Clamd,
            spamd_server: Spamd) -> tuple[Clamd, Spamd]:
    return clamd_server, spamd_server


def brains(clamd: Clamd, spamd: Spamd, av_skip: bool) -> list[dict[str, object]]:
    return [
        {"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd.tcp_address[1]}"],
         "skip_if_key": av_skip},
        {"use": "spam", "servers": [f"127.0.0.1:{spamd.address[1]}"], "skip_if_key": False},
    ]


def test_relay_scans_and_mx_skips_av_but_runs_spam(
    engines: tuple[Clamd, Spamd], tmp_path: Path
) -> None:
    clamd, spamd = engines
    secret = tmp_path / "miltersecret"
    generate_secret_file(secret, "site1")
    key = {"milter_key": True, "miltersecretfile": str(secret)}
    hop1 = MonkeyProcess(tmp_path / "relay", brains(clamd, spamd, av_skip=False),
                         {**key, "hostname": "relay.example"}, name="relay")
    hop2 = MonkeyProcess(tmp_path / "mx", brains(clamd, spamd, av_skip=True),
                         {**key, "hostname": "mx.example"}, name="mx")
    try:
        with hop1, hop2:
            first = run_session(hop1.address, [(CLEAN, "<alice@relay.example>",
                                                    ["<bob@mx.example>"])])[0]
            assert first.disposition is Disposition.ACCEPT, first
            relayed = first.applied
            assert relayed is not None
            assert relayed.header_values("X-Virus-Status") == ["Clean"]
            assert relayed.header_values("X-Spam-Flag") in ([], ["NO"])
            assert len(relayed.header_values("X-Milter-Key")) == 1
            assert "ran=av:continue,spam:continue" in relayed.header_values("X-Milter-Key")[0] \
                .replace("\n", "").replace("\t", "").replace(" ", "")

            clamd.stop()  # av must not be needed at the MX any more
            second = run_session(hop2.address, [(relayed.as_bytes(), "<alice@relay.example>",
                                                     ["<bob@mx.example>"])])[0]
            assert second.disposition is Disposition.ACCEPT, second
            log = hop2.wait_for_log("trusted milter key: skipping av")
            assert "av=skipped" in log and "spam=ran" in log
            # spam ran at the MX: its status header was written again, exactly once
            assert second.applied is not None
            assert len(second.applied.header_values("X-Spam-Status")) == 1
            # the MX re-signs, carrying the relay's av claim forward
            mx_key = second.applied.header_values("X-Milter-Key")
            assert len(mx_key) == 1 and "host=mx.example" in mx_key[0]
            assert "av:continue" in mx_key[0].replace("\n", "").replace("\t", "")
    finally:
        clamd.start()  # the engine is shared with other tests
