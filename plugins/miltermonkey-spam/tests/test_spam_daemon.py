"""The spam brain inside a real MilterMonkey daemon, driven over the milter protocol.

The MTA side is the core's strict client (``testing.client``): it honours the
negotiated steps, macros and actions the way Postfix does and refuses edits
that were not negotiated, so these tests prove the brain's Needs as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from miltermonkey_spam.testing import Spamd, ham, spam

from miltermonkey_core.milter.protocol import SMFIM_ENVFROM
from miltermonkey_core.testing.client import ConnectInfo, MessageSpec, SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.replies import Stage

pytestmark = pytest.mark.engines

SENDER = "<sender@example.com>"
RCPTS = ["<rcpt@example.org>"]
#: The MTA client's default client address is in TEST-NET (RCVD_ILLEGAL_IP, +1.3).
LOCAL = ConnectInfo(hostname="localhost", address="127.0.0.1")


def send(m: MonkeyProcess, *raws: bytes, **kw: Any) -> list[SessionResult]:
    return run_session(m.address, [MessageSpec(r, SENDER, RCPTS) for r in raws],
                           timeout=30, **kw)


def header_values(r: SessionResult, name: str) -> list[str]:
    assert r.applied is not None, r
    return r.applied.header_values(name)


def spam_brain(**options: Any) -> list[dict[str, Any]]:
    return [{"use": "spam", **options}]


def test_gtube_and_forged_ham_on_one_connection(spamd_address: str, tmp_path: Path) -> None:
    with MonkeyProcess(tmp_path / "m", spam_brain(servers=[spamd_address])) as m:
        bad, good = send(m, spam(extra_headers="X-Spam-Flag: NO\r\n"),
                         ham(extra_headers="X-Spam-Flag: YES\r\nX-Spam-Report: forged\r\n"),
                         connect_info=LOCAL)
        log = m.wait_for_log("spam: clean")
    assert bad.accepted and good.accepted
    assert header_values(bad, "X-Spam-Flag") == ["YES"]
    [status] = header_values(bad, "X-Spam-Status")
    assert status.startswith("Yes, score=") and " ".join(status.split()).endswith("rating=SSSSS")
    assert header_values(bad, "X-Spam-Level") == ["*" * 50]
    assert header_values(good, "X-Spam-Flag") == [] and header_values(good, "X-Spam-Report") == []
    assert header_values(good, "X-Spam-Status")[0].startswith("No, score=")
    assert header_values(good, "X-Spam-Level") == [""]  # below 1 point, as SpamAssassin writes
    # what was negotiated is exactly what the brain declared
    n = bad.negotiated
    assert {"SMFIF_ADDHDRS", "SMFIF_CHGHDRS"} <= set(n.action_names)
    assert "SMFIF_QUARANTINE" not in n.action_names
    assert "{auth_authen}" in n.macro_lists.get(SMFIM_ENVFROM, ())
    assert "SMFIP_NOHELO" not in n.protocol_names  # HELO goes into the Received line
    # one line per message, carrying the queue id
    assert f"{bad.queue_id}: " in log and "spam: tagged score=" in log


def test_reject_score_rejects_in_smtp(spamd_address: str, tmp_path: Path) -> None:
    brains = spam_brain(servers=[spamd_address], reject_score=15)
    with MonkeyProcess(tmp_path / "m", brains) as m:
        bad, good = send(m, spam(), ham())
    assert bad.rejected and bad.decided_at is Stage.EOM
    assert bad.reply is not None and bad.reply.code == 550
    assert "5.7.1" in str(bad.reply) and "Blocked by SpamAssassin" in str(bad.reply)
    assert good.accepted


def test_quarantine_score_holds_the_message(spamd_address: str, tmp_path: Path) -> None:
    brains = spam_brain(servers=[spamd_address], quarantine_score=15)
    with MonkeyProcess(tmp_path / "m", brains) as m:
        bad, good = send(m, spam(), ham())
    assert "SMFIF_QUARANTINE" in bad.negotiated.action_names
    assert bad.accepted and bad.eom is not None
    assert bad.eom.quarantine_reason is not None
    assert "quarantine_score 15" in bad.eom.quarantine_reason
    assert good.eom is not None and good.eom.quarantine_reason is None


def test_authenticated_sender_skipped(spamd_address: str, tmp_path: Path) -> None:
    with MonkeyProcess(tmp_path / "m", spam_brain(servers=[spamd_address])) as m:
        [r] = send(m, spam(extra_headers="X-Spam-Flag: NO\r\n"),
                   macros={"mail": {"{auth_authen}": "alice", "{auth_type}": "PLAIN"}})
        m.wait_for_log("authenticated as alice")
    assert r.accepted
    assert header_values(r, "X-Spam-Status") == []


def test_trusted_network_skipped_loopback_scanned(spamd_address: str, tmp_path: Path) -> None:
    brains = spam_brain(servers=[spamd_address], trusted_networks=["192.0.2.0/24"])
    with MonkeyProcess(tmp_path / "m", brains) as m:
        [inside] = send(m, spam(), connect_info=ConnectInfo(address="192.0.2.7"))
        [loop] = send(m, spam(), connect_info=ConnectInfo(hostname="localhost",
                                                              address="127.0.0.1"))
    assert header_values(inside, "X-Spam-Status") == []
    assert header_values(loop, "X-Spam-Flag") == ["YES"]


def test_oversize_message_is_not_scanned(spamd_address: str, tmp_path: Path) -> None:
    brains = spam_brain(servers=[spamd_address], max_size="4k")
    big = spam(body=b"".join(b"filler line %05d\r\n" % i for i in range(600)))
    with MonkeyProcess(tmp_path / "m", brains) as m:
        [r] = send(m, big)
    assert header_values(r, "X-Spam-Flag") == []
    assert header_values(r, "X-Spam-Status")[0].startswith("Unchecked (skipped: too large")


def test_failover_to_second_address(spamd_address: str, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with MonkeyProcess(tmp_path / "m", spam_brain(servers=[dead, spamd_address])) as m:
        first, second = send(m, spam(), spam("again"))
        log = m.wait_for_log("is down")
    assert header_values(first, "X-Spam-Flag") == ["YES"]
    assert header_values(second, "X-Spam-Flag") == ["YES"]
    assert log.count(f"spamd {dead} is down") == 1  # cooled down, not retried per message


def test_spamd_stopped_mid_run(tmp_path: Path) -> None:
    """spamd dies under a running daemon: tag (default) or tempfail; it recovers."""
    require_or_skip(Spamd)
    own = Spamd(tmp_path / "spamd", free_port())
    own.start()
    try:
        addr = f"127.0.0.1:{own.port}"
        tag = MonkeyProcess(tmp_path / "tag", spam_brain(servers=[addr]), name="tag")
        tmp = MonkeyProcess(tmp_path / "tmp", spam_brain(servers=[addr],
                                                         on_engine_error="tempfail"),
                            name="tmp")
        with tag, tmp:
            [before] = send(tag, spam("before"))
            assert header_values(before, "X-Spam-Flag") == ["YES"]
            own.stop()
            [tagged] = send(tag, spam("during", extra_headers="X-Spam-Flag: YES\r\n"))
            [refused] = send(tmp, spam("during"))
            assert tagged.accepted
            assert header_values(tagged, "X-Spam-Status") == ["Unchecked (spamd unavailable)"]
            assert header_values(tagged, "X-Spam-Flag") == []
            assert refused.tempfailed and refused.reply is not None
            assert refused.reply.code == 451
            line = tag.wait_for_log("message not scanned")
            assert f"{tagged.queue_id}: " in line and "on_engine_error=tag" in line
            own.start()  # back on the same port: the next message is scanned again
            [after] = send(tag, spam("after"))
            assert header_values(after, "X-Spam-Flag") == ["YES"]
            assert tag.alive() and tmp.alive()
    finally:
        own.stop()


