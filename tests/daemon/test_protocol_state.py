"""Commands no MTA sends, or not in that order, against a real daemon over TCP (issue 13.4).

Each case gets a defined answer or a closed connection, promptly, and a log
line naming it (found by the client's port, so cases cannot mask each
other); meanwhile a bystander MTA connection sits in the middle of a message
and finishes it afterwards, accepted, so no case disturbs other sessions.
The previous release (libmilter) left the second OPTNEG and the end of
headers after the body without an answer until the MTA timed out, and logged
nothing.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from reliability_support import OPTNEG, RawMilter, connect_packet

from miltermonkey_core.testing.cleanup import InsertHeader
from miltermonkey_core.testing.client import MilterClient
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.replies import Disposition

#: The daemon's timeouts here: short, so stalls are seen closing within a test.
COMMAND_TIMEOUT = 2
NEGOTIATE_TIMEOUT = 2
#: "At once": a closed connection or an answer well inside any MTA's timeout.
PROMPT = 1.0

SENDER = b"<a@example.test>\0"
RCPT = b"<b@example.test>\0"


@pytest.fixture(scope="module")
def monkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonkeyProcess]:
    """gate and stamp need every step, so the daemon negotiates all of them over TCP."""
    m = MonkeyProcess(tmp_path_factory.mktemp("protocol") / "m",
                      [{"use": "gate"}, {"use": "stamp"}],
                      {"command_timeout": COMMAND_TIMEOUT,
                       "negotiate_timeout": NEGOTIATE_TIMEOUT})
    with m:
        yield m
    assert "Traceback" not in m.output() and "internal error" not in m.log()


@pytest.fixture
def bystander(monkey: MonkeyProcess) -> Iterator[MilterClient]:
    """An MTA connection halfway through a message while the case runs; it must finish."""
    with MilterClient(monkey.address, timeout=10) as c:
        c.negotiate()
        c.connect("bystander.test", port=2525, address="192.0.2.7")
        c.mail("<by@example.test>")
        c.rcpt("<stander@example.test>")
        c.header("Subject", "bystander")
        yield c
        c.eoh()
        c.body(b"still here\r\n")
        result = c.eom()
        assert result.disposition is Disposition.ACCEPT
        assert [a.value for a in result.actions if isinstance(a, InsertHeader)] == [
            "stamp:stamped"]
        c.quit()


def raw(monkey: MonkeyProcess) -> RawMilter:
    return RawMilter(monkey.address, timeout=COMMAND_TIMEOUT + 8)


def peer(r: RawMilter) -> str:
    host, port = r.sock.getsockname()[:2]
    return f"{host}:{port}"


def log_line(monkey: MonkeyProcess, *needles: str, timeout: float = 5.0) -> str:
    """The daemon's log line holding every needle (waiting for it to be written)."""
    end = time.monotonic() + timeout
    while True:
        for line in monkey.log().splitlines():
            if all(n in line for n in needles):
                return line
        if time.monotonic() > end:
            raise AssertionError(f"no log line with {needles}:\n{monkey.log()[-3000:]}")
        time.sleep(0.05)


def start_message(r: RawMilter) -> None:
    assert r.negotiate()[0] == "O"
    for cmd, data in (("C", connect_packet()), ("M", SENDER), ("R", RCPT),
                      ("L", b"Subject\0state\0")):
        assert r.step(cmd, data) == [("c", b"")], cmd


def closed_within(r: RawMilter, seconds: float) -> float:
    """Read until the daemon closes; how long that took.  Any packet first fails."""
    start = time.monotonic()
    got = r.read()
    assert got == ("closed", b""), got
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"closed after {elapsed:.2f} s"
    return elapsed


def stamped(answers: list[tuple[str, bytes]]) -> bool:
    """End of message answered: the stamp header, then accept."""
    return answers[-1] == ("a", b"") and any(c == "i" and b"X-Stamp" in d for c, d in answers)


# --- repeated negotiation -------------------------------------------------------------------


def test_second_optneg_mid_message_closes_at_once_with_a_log_line(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        start_message(r)
        r.send_raw(struct.pack("!I", 13) + b"O" + OPTNEG)
        closed_within(r, PROMPT)
        log_line(monkey, peer(r), "a second OPTNEG inside a session")


def test_a_thousand_optnegs_get_one_answer_then_a_closed_connection(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        r.send_raw((struct.pack("!I", 13) + b"O" + OPTNEG) * 1000)
        cmd, _ = r.read()
        assert cmd == "O"
        closed_within(r, PROMPT)
        log_line(monkey, peer(r), "a second OPTNEG inside a session")


# --- steps out of order -----------------------------------------------------------------------


def test_end_of_headers_after_the_body_is_answered_logged_and_eom_still_answered(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        start_message(r)
        assert r.step("N") == [("c", b"")]
        assert r.step("B", b"body\r\n") == [("c", b"")]
        start = time.monotonic()
        assert r.step("N") == [("c", b"")]
        assert r.step("L", b"X-Late\0header\0") == [("c", b"")]
        assert stamped(r.step("E"))
        assert time.monotonic() - start < PROMPT
        log_line(monkey, peer(r), "end of headers after the body started", "ignored")
        log_line(monkey, peer(r), "a header after the body started", "ignored")


def test_rcpt_data_and_body_without_mail_are_answered_and_logged(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        assert r.negotiate()[0] == "O"
        assert r.step("C", connect_packet()) == [("c", b"")]
        assert r.step("R", RCPT) == [("c", b"")]
        assert r.step("T") == [("c", b"")]
        assert r.step("B", b"no envelope\r\n") == [("c", b"")]
        assert stamped(r.step("E"))
        me = peer(r)
        log_line(monkey, me, "RCPT before MAIL", "out of order")
        # the next message, in order, is not reported
        for cmd, data in (("M", SENDER), ("R", RCPT), ("L", b"Subject\0ok\0"), ("N", b""),
                          ("B", b"fine\r\n")):
            assert r.step(cmd, data) == [("c", b"")]
        assert stamped(r.step("E"))
    assert sum(me in line and "before MAIL" in line
               for line in monkey.log().splitlines()) == 1


def test_connect_twice_starts_a_new_session_with_a_log_line(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        assert r.negotiate()[0] == "O"
        assert r.step("C", connect_packet("first.test")) == [("c", b"")]
        assert r.step("C", connect_packet("second.test")) == [("c", b"")]
        for cmd, data in (("M", SENDER), ("R", RCPT), ("L", b"Subject\0x\0"), ("N", b""),
                          ("B", b"x\r\n")):
            assert r.step(cmd, data) == [("c", b"")]
        assert stamped(r.step("E"))
        log_line(monkey, peer(r), "CONNECT inside a session", "starting a new session")


# --- malformed framing and unknown commands -----------------------------------------------------


@pytest.mark.parametrize(("name", "packet", "needle"), [
    ("unknown command byte", struct.pack("!I", 5) + b"Zjunk", "unknown command 'Z'"),
    ("packet length 0", struct.pack("!I", 0), "packet length 0 is out of bounds"),
    ("packet length 100 MiB", struct.pack("!I", 100 * 1024 * 1024) + b"B" + b"x" * 1000,
     "packet length 104857600 is out of bounds"),
    ("empty macro packet", struct.pack("!I", 1) + b"D", "empty macro packet"),
])
def test_a_malformed_packet_closes_the_connection_at_once_with_a_log_line(
        monkey: MonkeyProcess, bystander: MilterClient, name: str, packet: bytes,
        needle: str) -> None:
    with raw(monkey) as r:
        start_message(r)
        r.send_raw(packet)
        closed_within(r, PROMPT)
        log_line(monkey, peer(r), "closing the connection", needle)


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("a command before OPTNEG", struct.pack("!I", 1) + b"N", "the first command must be OPTNEG"),
    ("a short OPTNEG", struct.pack("!I", 5) + b"O\0\0\0\6", "bad OPTNEG"),
    ("protocol version 1", struct.pack("!I", 13) + b"O" + struct.pack("!III", 1, 0, 0),
     "bad OPTNEG"),
])
def test_a_bad_first_packet_closes_the_connection_at_once_with_a_log_line(
        monkey: MonkeyProcess, bystander: MilterClient, name: str, data: bytes,
        needle: str) -> None:
    with raw(monkey) as r:
        r.send_raw(data)
        closed_within(r, PROMPT)
        log_line(monkey, peer(r), "closing the connection", needle)


def test_a_packet_cut_short_by_the_peer_closing_is_logged(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        start_message(r)
        r.send_raw(struct.pack("!I", 100) + b"Bpartial")
        r.sock.shutdown(socket.SHUT_WR)
        closed_within(r, PROMPT)
        log_line(monkey, peer(r), "closed the connection inside a packet",
                 "12 bytes of it received")


def test_a_packet_that_stops_halfway_is_closed_after_command_timeout(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        start_message(r)
        r.send_raw(struct.pack("!I", 100) + b"Bpartial")
        took = closed_within(r, COMMAND_TIMEOUT + 1.5)
        assert took >= COMMAND_TIMEOUT - 0.1
        log_line(monkey, peer(r), f"still incomplete after {COMMAND_TIMEOUT} s",
                 "inside a message")


def test_a_packet_trickled_byte_by_byte_gets_command_timeout_in_all(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    """A byte every 0.4 s never leaves a read idle for command_timeout; the packet does."""
    with raw(monkey) as r:
        start_message(r)
        packet = struct.pack("!I", 60) + b"B" + b"t" * 59
        start = time.monotonic()
        sent = 0
        while sent < len(packet):
            try:
                r.sock.sendall(packet[sent:sent + 1])
            except OSError:
                break
            sent += 1
            time.sleep(0.4)
            if time.monotonic() - start > COMMAND_TIMEOUT + 3:
                break
        elapsed = time.monotonic() - start
        assert sent < len(packet), "the whole packet got through"
        assert elapsed < COMMAND_TIMEOUT + 2, f"still open after {elapsed:.1f} s"
        assert r.read() == ("closed", b"")
        log_line(monkey, peer(r), f"still incomplete after {COMMAND_TIMEOUT} s")


# --- macros -------------------------------------------------------------------------------------


def test_macro_packets_with_odd_counts_non_utf8_or_no_stage_are_logged_and_the_rest_used(
        monkey: MonkeyProcess, bystander: MilterClient) -> None:
    with raw(monkey) as r:
        assert r.negotiate()[0] == "O"
        assert r.step("D", b"Cj\0mx.example.test\0{daemon_name}\0") == []
        assert r.step("C", connect_packet()) == [("c", b"")]
        assert r.step("D", b"Zx\0y\0") == []
        assert r.step("D", b"M\xff\xfe\0v\xff\0i\0QSTATE1\0") == []
        for cmd, data in (("M", SENDER), ("R", RCPT), ("L", b"Subject\0m\0"), ("N", b""),
                          ("B", b"m\r\n")):
            assert r.step(cmd, data) == [("c", b"")]
        assert stamped(r.step("E"))
        log_line(monkey, peer(r), "odd number of strings", "'{daemon_name}' has no value")
        log_line(monkey, peer(r), "macros for an unknown stage 'Z'", "ignored")
        log_line(monkey, "macro b'\\xff\\xfe' is not UTF-8; ignored")
        # the pair that was text still arrived: the message is logged under its queue id
        log_line(monkey, "QSTATE1: accept in")


# --- connection reuse ----------------------------------------------------------------------------


def message_steps(r: RawMilter, subject: bytes) -> list[tuple[str, bytes]]:
    for cmd, data in (("C", connect_packet()), ("M", SENDER), ("R", RCPT),
                      ("L", b"Subject\0" + subject + b"\0"), ("N", b""), ("B", b"hi\r\n")):
        assert r.step(cmd, data) == [("c", b"")], cmd
    return r.step("E")


@pytest.mark.parametrize("renegotiate", [False, True], ids=["then CONNECT", "then OPTNEG"])
def test_quit_nc_keeps_the_socket_for_the_next_session(
        monkey: MonkeyProcess, bystander: MilterClient, renegotiate: bool) -> None:
    with raw(monkey) as r:
        assert r.negotiate()[0] == "O"
        assert stamped(message_steps(r, b"first"))
        assert r.step("K") == []
        if renegotiate:
            assert r.negotiate()[0] == "O"
        start = time.monotonic()
        assert stamped(message_steps(r, b"second"))
        assert time.monotonic() - start < PROMPT
        r.step("Q")
        assert r.read() == ("closed", b"")
