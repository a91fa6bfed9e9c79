"""Bad mail through a real Postfix and the daemon: each kind gets a defined verdict and a
log line with Postfix's queue id, and the daemon keeps serving.

Kinds: malformed MIME, 8-bit and invalid UTF-8 headers, NUL bytes, 10,000
headers, a 50 MB body, an empty body, no Message-ID, overlong lines.  What
Postfix itself refuses or rewrites (line splitting, NUL handling) is part of
the observed behaviour; the second half sends what no MTA would, straight
over the milter socket.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from miltermonkey_av.testing import EICAR, Clamd
from reliability_support import RawMilter, connect_packet, rss_kib, worker_pid

from miltermonkey_core.testing.client import MessageSpec, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import parse_dump

pytestmark = pytest.mark.e2e

BRAINS = [{"use": "stamp"}, {"use": "trivial"}]


def mime_broken() -> bytes:
    return (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: broken mime\r\n"
            b"Message-ID: <broken-mime@example.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n"
            b"--outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
            b"--inner\r\nContent-Type: text/plain; charset=\"\xff\"\r\n\r\nhi\r\n"
            b"--outer\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nQUJD!!!*** not base64 ===\r\n"
            b"--nonexistent--\r\n")


def with_headers(subject: str, headers: bytes, body: bytes = b"body\r\n",
                 message_id: bool = True) -> bytes:
    mid = f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n".encode() \
        if message_id else b""
    return (b"From: a@example.test\r\nTo: b@example.test\r\n"
            + f"Subject: {subject}\r\n".encode() + mid + headers + b"\r\n" + body)


CASES: dict[str, bytes] = {
    "malformed-mime": mime_broken(),
    "8bit-header": with_headers("latin1", b"X-Latin: caf\xe9 \xe0 la cr\xe8me\r\n"),
    "invalid-utf8-header": with_headers("badutf8", b"X-Bad: \xff\xfe\xc3\x28 \xed\xa0\x80\r\n"
                                        b"X-Encoded: =?utf-8?B?////?=\r\n"),
    "nul-in-body": with_headers("nul body", b"", b"before\x00after\r\n\x00\x00\r\n"),
    "nul-in-header": with_headers("nul header", b"X-Nul: a\x00b\r\n"),
    "10000-headers": with_headers("many headers",
                                  b"".join(f"X-H{i}: value {i}\r\n".encode()
                                           for i in range(10_000))),
    "empty-body": with_headers("empty body", b"", b""),
    "no-message-id": with_headers("no id", b"", message_id=False),
    "overlong-lines": with_headers("long lines", b"X-Long: " + b"h" * 5000 + b"\r\n",
                                   b"b" * 200_000 + b"\r\n"),
}


@pytest.fixture(scope="module")
def monkey(postfix_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    m = MonkeyProcess(tmp_path_factory.mktemp("badmail"), BRAINS, {"debug_level": 10},
                      unix=True)
    with m:
        m.wait_for_log("is serving")
        postfix_stack.use_milters(m.postfix_spec)
        yield m


def deliver(postfix_stack: Any, raw: bytes, marker: bytes, timeout: float = 60) -> Any:
    res = postfix_stack.send(raw)
    if not res.ok:
        return res, None
    dump = postfix_stack.sink.wait_for_text(marker, timeout=timeout)
    return res, parse_dump(dump)


def verdict_line(m: MonkeyProcess, qid: str) -> str:
    text = m.wait_for_log(f"{qid}: accept", timeout=30)
    return next(ln for ln in text.splitlines() if f"{qid}: accept" in ln)


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_mail_gets_a_verdict_and_a_log_line(postfix_stack: Any, monkey: MonkeyProcess,
                                                kind: str) -> None:
    raw = CASES[kind]
    subject = re.search(rb"Subject: ([^\r\n]+)", raw)
    assert subject is not None
    res, msg = deliver(postfix_stack, raw, b"Subject: " + subject.group(1))
    assert res.ok, f"{kind}: {res}"  # the defined verdict for all of these: delivered
    assert res.queue_id
    assert msg is not None and msg.header("X-Stamp") == "stamp:stamped"
    line = verdict_line(monkey, res.queue_id)
    assert "stamp=ran" in line
    if kind == "10000-headers":
        assert msg.header("X-H9999") == "value 9999"
    if kind == "8bit-header":
        assert b"caf\xe9" in msg.message  # 8-bit bytes pass untouched


def test_fifty_megabyte_body(postfix_stack: Any, monkey: MonkeyProcess) -> None:
    old = postfix_stack.postfix.param("message_size_limit")
    postfix_stack.postfix.postconf(message_size_limit=str(80 * 1024 * 1024))
    try:
        worker = worker_pid(monkey)
        before = rss_kib(worker)
        body = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n") * (50 * 1024 * 1024 // 74)
        raw = with_headers("fifty megabytes", b"", body)
        assert len(raw) > 50 * 1000 * 1000
        res, msg = deliver(postfix_stack, raw, b"Subject: fifty megabytes", timeout=180)
        assert res.ok, res
        assert msg is not None and msg.header("X-Stamp") == "stamp:stamped"
        assert len(msg.message) > 50 * 1000 * 1000
        verdict_line(monkey, res.queue_id)
        grew = rss_kib(worker) - before
        assert grew < 30 * 1024, f"RSS grew by {grew} KiB: the body was not spooled"
    finally:
        postfix_stack.postfix.postconf(message_size_limit=old)


# --------------------------------------------------------------------------
# What no MTA would send, straight over the milter socket
# --------------------------------------------------------------------------


def raw_message(m: MonkeyProcess, headers: list[tuple[bytes, bytes]], body: bytes = b"x\r\n",
                qid: bytes = b"RAWQID1") -> list[tuple[str, bytes]]:
    with RawMilter(m.address, timeout=30) as r:
        r.negotiate()
        out = []
        out += r.step("C", connect_packet())
        out += r.step("D", b"Mi\0" + qid + b"\0")
        out += r.step("M", b"<a@example.test>\0")
        out += r.step("R", b"<b@example.test>\0")
        for name, value in headers:
            out += r.step("L", name + b"\0" + value + b"\0")
            if out and out[-1][0] in ("y", "t", "r"):
                return out
        out += r.step("N")
        out += r.step("B", body)
        out += r.step("E")
        r.step("Q")
        return out


def test_raw_nul_inside_a_header_value(monkey: MonkeyProcess) -> None:
    out = raw_message(monkey, [(b"Subject", b"nul"), (b"X-Nul", b"before\0after")], qid=b"NUL1")
    assert out[-1][0] == "a"
    monkey.wait_for_log("NUL1: accept")


def test_raw_8bit_header_name_is_a_tempfail(tmp_path: Path) -> None:
    # pymilter decodes header names as strict UTF-8 before MilterMonkey sees them;
    # its fallback answer is a 451.  Neither Postfix nor Sendmail ever sends such
    # a name (a line whose name is not printable ASCII is not a header to them).
    # Over TCP every step is answered, so the 451 reaches the MTA.
    with MonkeyProcess(tmp_path / "m", BRAINS) as m:
        out = raw_message(m, [(b"Subject", b"ok"), (b"X-\xffName", b"v")])
        assert out[-1][0] == "y" and out[-1][1].startswith(b"451"), out
        with RawMilter(m.address) as r:
            assert r.negotiate()[0] == "O"  # still serving
        assert "internal error" not in m.log()


def test_raw_ten_thousand_headers_and_over_the_size_limit(tmp_path: Path) -> None:
    with MonkeyProcess(tmp_path / "m", BRAINS, {"max_message_size": "1M"}, unix=True) as m:
        headers = [(f"X-H{i}".encode(), f"v{i}".encode()) for i in range(10_000)]
        out = raw_message(m, headers, qid=b"MANY1")
        assert out[-1][0] == "a"
        m.wait_for_log("MANY1: accept")
        res = run_session(m.address, [MessageSpec(
            with_headers("too big", b"", b"x" * (2 * 1024 * 1024)), "<a@example.test>",
            ["<b@example.test>"], macros={"eom": {"i": "BIG1"}})])[0]
        assert res.rejected and res.reply is not None and res.reply.code == 552
        m.wait_for_log("BIG1: message larger than max_message_size")


def test_virus_in_broken_mime_is_not_let_through(postfix_stack: Any, tmp_path: Path) -> None:
    require_or_skip(Clamd)
    pytest.importorskip("miltermonkey_av")
    clamd = Clamd(tmp_path / "clamd", free_port())
    clamd.start()
    try:
        b64 = base64.b64encode(EICAR)
        raw = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: broken virus\r\n"
               b"Message-ID: <broken-virus@example.test>\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
               b"--b\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"\r\n--b-")
        brains = [{"use": "av", "clamd": [f"unix:{clamd.unix_socket}"]}, {"use": "stamp"}]
        with MonkeyProcess(tmp_path / "m", brains, unix=True) as m:
            postfix_stack.use_milters(m.postfix_spec)
            res = postfix_stack.send(raw)
            assert res.code == 550 and res.stage == "data", res
            m.wait_for_log("infected")
    finally:
        clamd.stop()
