"""End to end: SMTP into a real Postfix, through the daemon and a real spamd, to smtp-sink."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from miltermonkey_spam.testing import ham, spam

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.sink import parse_dump

pytestmark = [pytest.mark.e2e, pytest.mark.engines]


def deliver(postfix_stack: Any, raw: bytes, subject: str) -> Any:
    res = postfix_stack.send(raw)
    assert res.ok, res
    dump = postfix_stack.sink.wait_for_text(f"Subject: {subject}".encode(), timeout=30)
    return parse_dump(dump)


def test_gtube_arrives_flagged_with_rating(postfix_stack: Any, spamd_address: str,
                                           tmp_path: Path) -> None:
    brains = [{"use": "spam", "servers": [spamd_address]}]
    with MonkeyProcess(tmp_path / "m", brains) as m:
        postfix_stack.use_milters(m.postfix_spec)
        got = deliver(postfix_stack, spam("e2e gtube", extra_headers="X-Spam-Flag: NO\r\n"),
                      "e2e gtube")
        clean = deliver(postfix_stack, ham("e2e clean", extra_headers="X-Spam-Flag: YES\r\n"),
                        "e2e clean")
    assert got.header_values("X-Spam-Flag") == ["YES"]
    [status] = got.header_values("X-Spam-Status")
    flat = " ".join(status.split())
    assert flat.startswith("Yes, score=") and "GTUBE" in flat and flat.endswith("rating=SSSSS")
    assert got.header_values("X-Spam-Level") == ["*" * 50]
    assert clean.header_values("X-Spam-Flag") == []
    assert clean.header_values("X-Spam-Status")[0].startswith("No, score=")
    assert len(clean.header_values("X-Spam-Level")) == 1


def test_reject_score_gives_the_smtp_client_a_5xx(postfix_stack: Any, spamd_address: str,
                                                  tmp_path: Path) -> None:
    brains = [{"use": "spam", "servers": [spamd_address], "reject_score": 15}]
    with MonkeyProcess(tmp_path / "m", brains) as m:
        postfix_stack.use_milters(m.postfix_spec)
        res = postfix_stack.send(spam("e2e reject"))
        ok = postfix_stack.send(ham("e2e reject-ham"))
    assert res.code == 550 and res.stage == "data", res
    assert "5.7.1 Blocked by SpamAssassin" in res.text
    assert ok.ok, ok


def test_quarantine_score_lands_in_the_hold_queue(postfix_stack: Any, spamd_address: str,
                                                  tmp_path: Path) -> None:
    brains = [{"use": "spam", "servers": [spamd_address], "quarantine_score": 15}]
    with MonkeyProcess(tmp_path / "m", brains) as m:
        postfix_stack.use_milters(m.postfix_spec)
        res = postfix_stack.send(spam("e2e quarantine"))
    assert res.ok, res
    deadline = time.monotonic() + 15
    while res.queue_id not in postfix_stack.postfix.hold_queue():
        assert time.monotonic() < deadline, postfix_stack.postfix.queue()
        time.sleep(0.1)
    held = [ln for ln in postfix_stack.postfix.maillog().splitlines()
            if f"{res.queue_id}: milter-hold: END-OF-MESSAGE" in ln]
    assert held and "milter triggers HOLD action" in held[0]
    postfix_stack.postfix.purge_queue()
