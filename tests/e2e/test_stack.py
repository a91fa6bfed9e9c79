"""The test mail stack itself: real Postfix, smtp-sink, clamd and spamd on loopback.

Every other end-to-end test trusts these helpers, so they are checked against
the real programs.  Each daemon starts once per module to keep this file fast.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from miltermonkey_av.testing import EICAR, EICAR_SIGNATURE, Clamd, instream
from miltermonkey_spam.testing import GTUBE, Spamd, spamc_request

from miltermonkey_core.testing import process
from miltermonkey_core.testing.part import StackPart, require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import StackError, free_port
from miltermonkey_core.testing.sink import SmtpSink, parse_dump
from miltermonkey_core.testing.smtp import send_mail

CLEAN = b"From: a@example.test\nTo: b@example.test\nSubject: clean\n\nNothing to see here.\n"


def mime_with_attachment(payload: bytes) -> bytes:
    encoded = base64.encodebytes(payload)
    return (
        b"From: a@example.test\nTo: b@example.test\nSubject: attachment\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=XX\n\n"
        b"--XX\nContent-Type: text/plain\n\nsee attachment\n"
        b"--XX\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="t.com"\n\n' + encoded + b"--XX--\n"
    )


# --------------------------------------------------------------------------
# pure helpers (no daemons)
# --------------------------------------------------------------------------


def test_free_port_hands_out_distinct_bindable_ports() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))


def test_parse_dump_reads_smtp_sink_format(tmp_path: Path) -> None:
    # Exactly what smtp-sink -d writes: its records, its Received header,
    # the message (dot-unstuffed, LF endings), then one empty line.
    dump = tmp_path / "42.abcdef01"
    dump.write_bytes(
        b"X-Client-Addr: 127.0.0.1\n"
        b"X-Client-Proto: ESMTP\n"
        b"X-Helo-Args: mta.milter.test\n"
        b"X-Mail-Args: <a@example.test> SIZE=120 BODY=8BITMIME\n"
        b"X-Rcpt-Args: <b@example.test> ORCPT=rfc822;b@example.test\n"
        b"X-Rcpt-Args: <c@example.test>\n"
        b"Received: from mta.milter.test ([127.0.0.1])\n"
        b"\tby smtp-sink (smtp-sink) with ESMTP id abcdef01;\n"
        b"\tTue, 24 Nov 2026 20:39:45 +0000 (UTC)\n"
        b"Received: from client.test (localhost [127.0.0.1])\n"
        b"\tby mta.milter.test (Postfix) with ESMTP id 1234;\n"
        b"\tTue, 24 Nov 2026 20:39:45 +0000 (UTC)\n"
        b"Subject: hello\n"
        b"X-Folded: first\n"
        b" second\n"
        b"X-Empty:\n"
        b"\n"
        b"body line\n"
        b".dot line\n"
        b"\n"
    )
    msg = parse_dump(dump)
    assert msg.sender == "a@example.test"
    assert msg.recipients == ("b@example.test", "c@example.test")
    assert msg.helo == "mta.milter.test"
    assert msg.client_addr == "127.0.0.1"
    assert msg.mail_args == "<a@example.test> SIZE=120 BODY=8BITMIME"
    assert msg.path == dump
    assert msg.message.startswith(b"Received: from client.test")
    assert msg.message.endswith(b".dot line\n")
    assert [name for name, _ in msg.headers()] == ["Received", "Subject", "X-Folded", "X-Empty"]
    assert msg.header("x-folded") == "first second"
    assert msg.header("X-Empty") == ""
    assert msg.header("X-Missing") is None
    assert msg.body == b"body line\n.dot line\n"


def test_parse_dump_null_sender(tmp_path: Path) -> None:
    dump = tmp_path / "bounce"
    dump.write_bytes(
        b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Mail-Args: <>\n"
        b"X-Rcpt-Args: <b@example.test>\nReceived: from x ([127.0.0.1])\n\tby smtp-sink;\n"
        b"\tdate\nSubject: bounce\n\nbody\n\n"
    )
    msg = parse_dump(dump)
    assert msg.sender == ""
    assert msg.helo is None
    assert msg.body == b"body\n"


def test_parse_dump_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"Subject: not a dump\n\nbody\n")
    with pytest.raises(StackError, match="not an smtp-sink dump"):
        parse_dump(other)


def test_zombies_count_as_dead() -> None:
    proc = subprocess.Popen(["true"])
    try:
        assert process.wait_until(lambda: process.proc_state(proc.pid) == "Z", 10.0)
        assert not process.pid_alive(proc.pid)
    finally:
        proc.wait()
    assert not process.pid_alive(proc.pid)


class _Missing(StackPart):
    name = "nothing"
    binaries = ("miltermonkey-no-such-binary",)
    package = "no-such-package"


def test_require_or_skip_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _Missing.available()
    reason = _Missing.unavailable_reason()
    assert reason is not None
    assert "miltermonkey-no-such-binary" in reason
    assert "no-such-package" in reason
    monkeypatch.delenv("MILTERMONKEY_REQUIRE_STACK", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-binary"):
        require_or_skip(_Missing)
    monkeypatch.setenv("MILTERMONKEY_REQUIRE_STACK", "1")
    with pytest.raises(pytest.fail.Exception, match="MILTERMONKEY_REQUIRE_STACK"):
        require_or_skip(_Missing)


# --------------------------------------------------------------------------
# Postfix + smtp-sink
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    require_or_skip(SmtpSink)
    with SmtpSink(tmp_path_factory.mktemp("sink"), free_port()) as part:
        yield part


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink) -> Iterator[Postfix]:
    require_or_skip(Postfix)
    with Postfix(tmp_path_factory.mktemp("postfix"), free_port(), sink.port) as part:
        yield part


@pytest.fixture(scope="module")
def stuck_postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postfix]:
    """A second instance whose next hop never answers, so its mail stays queued."""
    require_or_skip(Postfix)
    extra = {
        "smtpd_recipient_restrictions": (
            "check_recipient_access inline:{ {refused@example.test=REJECT go away} },"
            " permit_mynetworks, reject"
        )
    }
    with Postfix(tmp_path_factory.mktemp("stuck"), free_port(), free_port(), extra=extra) as part:
        yield part


@pytest.mark.e2e
def test_postfix_relays_to_sink(postfix: Postfix, sink: SmtpSink) -> None:
    sink.clear()
    raw = (
        b"From: a@example.test\nTo: b@example.test\nSubject: stack-relay\n"
        b"X-Folded: one\n\ttwo\n\nfirst line\n.leading dot\n"
    )
    result = send_mail(postfix.smtp_port, raw, "a@example.test", ["b@example.test", "c@ex.test"])
    assert result.ok, result
    assert result.code == 250
    assert result.stage is None
    assert result.queue_id

    path = sink.wait_for_text(b"stack-relay", timeout=30)
    assert sink.wait_for(1, timeout=5) == [path]
    msg = parse_dump(path)
    assert msg.sender == "a@example.test"
    # Postfix's queue manager sorts recipients, so compare as sets.
    assert sorted(msg.recipients) == ["b@example.test", "c@ex.test"]
    assert msg.helo == "mta.milter.test"
    names = [name for name, _ in msg.headers()]
    assert names[0] == "Received"
    assert names[1:4] == ["From", "To", "Subject"]
    assert result.queue_id in msg.headers()[0][1]
    assert msg.header("Subject") == "stack-relay"
    assert msg.header("X-Folded") == "one\ttwo"
    assert msg.header("Message-Id")  # added by Postfix's cleanup
    assert msg.body == b"first line\n.leading dot\n"

    postfix.wait_queue_empty(timeout=30)
    assert postfix.queue_empty()
    assert f"{result.queue_id}: removed" in postfix.maillog()


@pytest.mark.e2e
def test_sink_clear_and_timeout(sink: SmtpSink) -> None:
    sink.clear()
    assert sink.messages() == []
    with pytest.raises(process.StackTimeoutError, match="no message containing"):
        sink.wait_for_text(b"never-sent", timeout=0.2)
    with pytest.raises(process.StackTimeoutError, match="0 of 1"):
        sink.wait_for(1, timeout=0.2)


@pytest.mark.e2e
def test_postfix_settings_and_milter_switch(postfix: Postfix, sink: SmtpSink) -> None:
    assert postfix.param("relayhost") == f"[127.0.0.1]:{sink.port}"
    assert postfix.param("milter_protocol") == "6"
    assert postfix.param("milter_default_action") == "tempfail"
    nobody_listens = free_port()
    postfix.set_milters(f"inet:127.0.0.1:{nobody_listens}")
    try:
        assert postfix.param("smtpd_milters") == f"inet:127.0.0.1:{nobody_listens}"
        down = send_mail(postfix.smtp_port, CLEAN, "a@example.test", ["b@example.test"])
        assert not down.ok
        assert (down.code, down.stage) == (451, "mail"), down
        assert down.text.startswith("4.7.1")
        assert str(down).startswith("451 4.7.1")
    finally:
        postfix.set_milters("")
    back = send_mail(postfix.smtp_port, CLEAN, "a@example.test", ["b@example.test"])
    assert back.ok, back


@pytest.mark.e2e
def test_two_instances_reject_defer_hold(stuck_postfix: Postfix, postfix: Postfix) -> None:
    assert stuck_postfix.is_running() and postfix.is_running()
    assert stuck_postfix.config_dir != postfix.config_dir
    pf = stuck_postfix

    refused = send_mail(pf.smtp_port, CLEAN, "a@example.test", ["refused@example.test"])
    assert (refused.code, refused.stage) == (554, "rcpt"), refused
    assert "5.7.1" in refused.text and "go away" in refused.text

    partly = send_mail(
        pf.smtp_port, CLEAN, "a@example.test", ["refused@example.test", "ok@example.test"]
    )
    assert partly.ok, partly
    assert list(partly.refused) == ["refused@example.test"]
    assert partly.refused["refused@example.test"][0] == 554

    # Its next hop is a closed port: the message waits in the deferred queue.
    assert process.wait_until(lambda: pf.deferred_count() == 1, 30.0, 0.1), pf.queue()
    pf.flush()  # retried at once, deferred again
    assert process.wait_until(lambda: pf.deferred_count() == 1, 30.0, 0.1), pf.queue()
    subprocess.run(["postsuper", "-c", str(pf.config_dir), "-h", "ALL"], check=True)
    assert pf.hold_queue() == [partly.queue_id]
    assert pf.deferred_count() == 0
    assert not pf.queue_empty()
    pf.purge_queue()
    pf.wait_queue_empty(timeout=10)


def test_send_mail_reports_connection_refused() -> None:
    result = send_mail(free_port(), CLEAN, "a@example.test", ["b@example.test"], timeout=5)
    assert (result.code, result.stage) == (0, "connect")
    assert not result.ok


def test_postfix_start_failure_names_the_reason(tmp_path: Path) -> None:
    require_or_skip(Postfix)
    broken = Postfix(
        tmp_path / "pf", free_port(), free_port(), extra={"default_process_limit": "lots"}
    )
    with pytest.raises(StackError, match="default_process_limit = lots") as info:
        broken.start()
    assert "last lines of" in str(info.value)
    assert not broken.is_running()
    broken.stop()  # idempotent, also after a failed start
    with pytest.raises(StackError, match="nosuchuser"):
        Postfix(
            tmp_path / "pf2", free_port(), free_port(), extra={"mail_owner": "nosuchuser"}
        ).start()


@pytest.mark.e2e
def test_context_manager_stops_and_frees_port(tmp_path: Path) -> None:
    require_or_skip(SmtpSink)
    port = free_port()
    with SmtpSink(tmp_path / "s", port) as part:
        assert part.is_running()
        assert process.port_in_use(port)
        with pytest.raises(StackError, match="already in use"):
            SmtpSink(tmp_path / "s2", port).start()
    assert not part.is_running()
    assert not process.port_in_use(port)
    part.stop()


# --------------------------------------------------------------------------
# clamd
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    require_or_skip(Clamd)
    with Clamd(tmp_path_factory.mktemp("clamd"), free_port()) as part:
        yield part


@pytest.mark.engines
def test_clamd_finds_eicar_over_tcp(clamd: Clamd) -> None:
    assert clamd.ping()
    assert clamd.tcp_address == ("127.0.0.1", clamd.tcp_port)
    body = CLEAN + b"\n" + EICAR + b"\n"
    assert clamd.instream(body) == f"stream: {EICAR_SIGNATURE} FOUND"
    assert clamd.instream(mime_with_attachment(EICAR)) == f"stream: {EICAR_SIGNATURE} FOUND"
    assert clamd.instream(CLEAN) == "stream: OK"


@pytest.mark.engines
def test_clamd_finds_eicar_over_unix_socket(clamd: Clamd) -> None:
    assert clamd.unix_socket.is_socket()
    found = instream(clamd.unix_socket, EICAR)
    assert found == f"stream: {EICAR_SIGNATURE} FOUND"
    assert instream(clamd.unix_socket, CLEAN) == "stream: OK"
    assert clamd.instream(EICAR, via="unix") == f"stream: {EICAR_SIGNATURE} FOUND"


@pytest.mark.engines
def test_clamd_kill_and_restart(clamd: Clamd) -> None:
    pid = clamd.pid
    assert pid is not None
    clamd.kill()
    assert not clamd.ping()
    assert not clamd.is_running()
    assert not process.pid_alive(pid)
    clamd.start()  # FixStaleSocket lets it reuse the socket path
    assert clamd.ping()
    assert clamd.instream(EICAR, via="unix").endswith("FOUND")


@pytest.mark.engines
def test_clamd_extra_db_and_bad_db(tmp_path: Path) -> None:
    require_or_skip(Clamd)
    marker = b"MILTERMONKEY-CUSTOM-MARKER"
    extra = {"custom.ndb": f"MilterMonkey.Test.Custom:0:*:{marker.hex()}\n"}
    with Clamd(tmp_path / "ok", free_port(), db_files=extra) as part:
        assert part.instream(b"x " + marker) == "stream: MilterMonkey.Test.Custom.UNOFFICIAL FOUND"
        assert part.instream(EICAR).endswith("FOUND")
    broken = Clamd(tmp_path / "bad", free_port(), db_files={"broken.ndb": "not a signature\n"})
    with pytest.raises(StackError, match="exited during startup") as info:
        broken.start()
    assert "last lines of" in str(info.value)
    assert "broken.ndb" in str(info.value) or "Malformed" in str(info.value)
    broken.stop()


# --------------------------------------------------------------------------
# spamd
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    require_or_skip(Spamd)
    with Spamd(tmp_path_factory.mktemp("spamd"), free_port()) as part:
        yield part


@pytest.mark.engines
def test_spamd_flags_gtube(spamd: Spamd) -> None:
    assert spamd.ping()
    gtube = b"From: a@example.test\r\nSubject: gtube\r\n\r\n" + GTUBE + b"\r\n"
    reply = spamc_request(spamd.address, "CHECK", gtube)
    assert reply.startswith(b"SPAMD/1.1 0 EX_OK"), reply
    match = re.search(rb"Spam: True ; (-?[0-9.]+) / ([0-9.]+)", reply)
    assert match, reply
    assert float(match.group(1)) >= 1000  # GTUBE alone scores 1000
    clean = spamc_request(spamd.address, "CHECK", CLEAN.replace(b"\n", b"\r\n"))
    assert b"Spam: False" in clean, clean


@pytest.mark.engines
def test_spamd_kill_and_restart(spamd: Spamd) -> None:
    parent = spamd.pid
    assert parent is not None
    workers = process.group_members(parent)
    assert len(workers) >= 2
    spamd.kill()
    assert not spamd.ping()
    assert not spamd.is_running()
    assert not any(process.pid_alive(pid) for pid in workers)
    t0 = time.monotonic()
    spamd.start()
    assert spamd.ping()
    assert time.monotonic() - t0 < 60
