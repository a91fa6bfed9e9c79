"""What the daemon writes to its log per message, at the debug levels an admin picks.

A real daemon, driven over its TCP socket by the MTA-side client: by default
every accepted message leaves one line with its queue id; under
``debug_level`` 5 accepted mail is silent and refusals are still logged.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from miltermonkey_core.logs import SUMMARY_LEVEL
from miltermonkey_core.testing.client import MessageSpec, SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess

BRAINS = [{"use": "gate"}, {"use": "trivial"}]


def send(m: MonkeyProcess, body: bytes, qid: str) -> SessionResult:
    raw = b"From: a@example.test\r\nSubject: log test\r\n\r\n" + body
    spec = MessageSpec(raw, "<a@example.test>", ["<b@example.test>"], queue_id=qid)
    return run_session(m.address, [spec])[0]


@pytest.mark.parametrize("level", [SUMMARY_LEVEL - 1, SUMMARY_LEVEL, 10])
def test_accepted_mail_is_logged_from_the_summary_level_up(tmp_path: Path, level: int) -> None:
    with MonkeyProcess(tmp_path, BRAINS, {"debug_level": level}) as m:
        m.wait_for_log("is serving")
        accepted = send(m, b"fine\r\n", "LOGOK1")
        refused = send(m, b"REJECT-ME\r\n", "LOGNO1")
        assert accepted.accepted and refused.rejected
        # the refusal is written after the accepted message's line would be
        m.wait_for_log("LOGNO1: reject", timeout=10)
        time.sleep(0.2)
        log = m.log()
    summary = [ln for ln in log.splitlines() if "LOGOK1: accept in" in ln]
    if level >= SUMMARY_LEVEL:
        assert len(summary) == 1, log
        assert "gate=ran:continue trivial=ran:continue" in summary[0]
    else:
        assert summary == [], log
    assert "LOGOK1" not in log or level >= SUMMARY_LEVEL
