"""End to end: real SMTP into a real Postfix, through the monkey, out to smtp-sink."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.sink import parse_dump

pytestmark = pytest.mark.e2e


def message(subject: str, body: str = "hello\r\n") -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.com>\r\n\r\n{body}").encode()


def stamps(first: str, second: str) -> list[dict[str, object]]:
    return [
        {"use": "trivial", "name": first, "header_name": "X-Order", "header_value": first},
        {"use": "trivial", "name": second, "header_name": "X-Order", "header_value": second},
    ]


def deliver(postfix_stack, subject: str) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    res = postfix_stack.send(message(subject))
    assert res.ok, res
    dump = postfix_stack.sink.wait_for_text(f"Subject: {subject}".encode(), timeout=30)
    return parse_dump(dump).headers()


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_headers_added_in_config_order_and_order_flips(
    postfix_stack, tmp_path: Path, unix: bool  # type: ignore[no-untyped-def]
) -> None:
    with MonkeyProcess(tmp_path / "ab", stamps("alpha", "beta"), unix=unix) as m:
        postfix_stack.use_milters(m.postfix_spec)
        hdrs = deliver(postfix_stack, f"order-ab-{unix}")
    assert [v for k, v in hdrs if k == "X-Order"] == ["alpha", "beta"]

    with MonkeyProcess(tmp_path / "ba", stamps("beta", "alpha"), unix=unix) as m:
        postfix_stack.use_milters(m.postfix_spec)
        hdrs = deliver(postfix_stack, f"order-ba-{unix}")
    assert [v for k, v in hdrs if k == "X-Order"] == ["beta", "alpha"]


def test_raising_brain_tempfails_and_daemon_keeps_serving(
    postfix_stack, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    brains = [{"use": "fault", "when_subject": "explode"},
              {"use": "trivial", "header_name": "X-After", "header_value": "ran"}]
    with MonkeyProcess(tmp_path / "fault", brains) as m:
        postfix_stack.use_milters(m.postfix_spec)
        bad = postfix_stack.send(message("please-explode"))
        assert bad.code == 451 and "4.3.0" in bad.text, bad
        log = m.wait_for_log("brain fault failed")
        line = next(ln for ln in log.splitlines() if "brain fault failed" in ln)
        assert "RuntimeError" in line and "policy tempfail" in line
        # the line carries the queue id Postfix gave the refused message
        refused = [ln for ln in postfix_stack.postfix.maillog().splitlines()
                   if "milter-reject: END-OF-MESSAGE" in ln and "4.3.0" in ln]
        assert refused, postfix_stack.postfix.maillog()[-2000:]
        qid = refused[-1].split(": ")[1]
        assert re.fullmatch(r"[0-9A-F]{6,}", qid), refused[-1]
        assert f"{qid}: brain fault failed" in line
        # the daemon is still up and the next message goes through, untouched by the fault
        hdrs = deliver(postfix_stack, "calm-message")
        assert ("X-After", "ran") in hdrs and ("X-Fault", "passed") in hdrs
        assert ("X-Fault", "half-done") not in hdrs
        assert m.alive()


def test_reject_at_rcpt_and_eom_seen_by_client(
    postfix_stack, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    with MonkeyProcess(tmp_path / "gate", [{"use": "gate"}]) as m:
        postfix_stack.use_milters(m.postfix_spec)
        res = postfix_stack.send(message("rcpt"), recipients=["refused@example.com"])
        assert res.code == 550 and res.stage == "rcpt" and "refused by gate" in res.text
        res = postfix_stack.send(message("eom", "REJECT-ME please\r\n"))
        assert res.code == 550 and "gate: body matched" in res.text and res.stage == "data"
