"""What one connection, and all of them together, may hold: the cap and the stage timeouts (13.3).

Real daemons over TCP, with small values so each limit is seen acting
within a test: ``max_connections`` refuses the connection over the cap at
once and says so; too many connections that never negotiate lose the oldest;
``negotiate_timeout``, ``command_timeout`` and ``milter_timeout`` each close
the connection stalled in their stage, in time, with a log line naming it.
The same with a flood of 2,100 connections and the open-file limit at 1,024
is the long drill, ``test_connection_drill.py``.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from reliability_support import RawMilter, alive_and_serving, connect_packet
from test_protocol_state import log_line, peer

from miltermonkey_core.config.endpoint import parse_connection
from miltermonkey_core.milter.connection import MilterConnection, Timeouts
from miltermonkey_core.milter.protocol import MilterProtocolError
from miltermonkey_core.server.listener import Listener, _waiting_bytes
from miltermonkey_core.testing.client import MilterClient
from miltermonkey_core.testing.daemon import MonkeyProcess

NEGOTIATE = 1.0
COMMAND = 1.5
MILTER = 2
#: Slack for the daemon's thread to wake and close, on a shared two-core host.
SLACK = 1.0


def wait_closed(sock: socket.socket, limit: float) -> float:
    """Seconds until the daemon closes ``sock`` (EOF or reset); fails past ``limit``."""
    sock.settimeout(limit)
    start = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit:g} s") from None
    except OSError:
        pass
    return time.monotonic() - start


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonkeyProcess]:
    m = MonkeyProcess(tmp_path_factory.mktemp("timeouts") / "m", [{"use": "stamp"}],
                      {"negotiate_timeout": NEGOTIATE, "command_timeout": COMMAND,
                       "milter_timeout": MILTER})
    with m:
        yield m


def tcp(m: MonkeyProcess) -> tuple[str, int]:
    assert isinstance(m.address, tuple)
    return m.address


def negotiated(m: MonkeyProcess) -> MilterClient:
    """An MTA connection in place; retried while start-up's readiness probe still counts."""
    end = time.monotonic() + 5
    while True:
        c = MilterClient(m.address, timeout=10)
        try:
            c.negotiate()
            return c
        except (OSError, MilterProtocolError):
            c.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def open_raw(m: MonkeyProcess) -> RawMilter:
    return RawMilter(m.address, timeout=10)


# --- stage timeouts --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stall", "limit", "needle"), [
    ("silent before negotiating", lambda r: None, NEGOTIATE,
     f"no data from the MTA for {NEGOTIATE:g} s between commands (before negotiating)"),
    ("three bytes of a length prefix", lambda r: r.send_raw(b"\0\0\0"), NEGOTIATE,
     f"still incomplete after {NEGOTIATE:g} s (before negotiating)"),
    ("negotiated, then silent", lambda r: r.negotiate(), MILTER,
     f"no data from the MTA for {MILTER:g} s between commands (between messages)"),
    ("silent inside a message",
     lambda r: (r.negotiate(), r.step("C", connect_packet()), r.step("M", b"<a@x.test>\0")),
     MILTER, f"no data from the MTA for {MILTER:g} s between commands (inside a message)"),
    ("stopped inside a packet",
     lambda r: (r.negotiate(), r.step("C", connect_packet()), r.step("M", b"<a@x.test>\0"),
                r.send_raw(struct.pack("!I", 500) + b"Bhalf")),
     COMMAND, f"still incomplete after {COMMAND:g} s (inside a message)"),
])
def test_each_stalled_stage_is_closed_by_its_timeout_with_a_log_line(
        timed: MonkeyProcess, name: str, stall: Callable[[RawMilter], object], limit: float,
        needle: str) -> None:
    with open_raw(timed) as r:
        stall(r)
        took = wait_closed(r.sock, limit + SLACK + 2)
        assert limit - 0.2 <= took <= limit + SLACK, f"{name}: closed after {took:.2f} s"
        log_line(timed, peer(r), "closing the connection", needle)
    assert alive_and_serving(timed.address)


def test_a_message_slower_than_no_timeout_is_served(timed: MonkeyProcess) -> None:
    """Pauses under each timeout, adding up to more than all of them, are no stall."""
    with MilterClient(timed.address, timeout=10) as c:
        c.negotiate()
        c.connect("slow.test", port=2525, address="192.0.2.9")
        steps: list[Callable[[], object]] = [lambda: c.mail("<a@x.test>"),
                                             lambda: c.rcpt("<b@x.test>"),
                                             lambda: c.header("Subject", "slow")]
        for step in steps:
            time.sleep(MILTER - 0.8)
            step()
        c.eoh()  # negotiated away: nothing is sent
        time.sleep(MILTER - 0.8)
        c.body(b"slow but steady\r\n")
        assert c.eom().disposition.value == "accept"
        c.quit()


# --- the connection cap ---------------------------------------------------------------------


def test_the_connection_over_max_connections_is_refused_at_once_and_logged(
        monkey_daemon: Callable[..., MonkeyProcess]) -> None:
    m = monkey_daemon(daemon={"max_connections": 5})
    assert "max_connections=5" in m.log()
    mtas = [negotiated(m) for _ in range(5)]
    try:
        for c in mtas:
            c.connect("mta.test", port=25, address="192.0.2.1")
        sixth = socket.create_connection(tcp(m), timeout=10)
        with sixth:
            sixth.sendall(struct.pack("!I", 13) + b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
            assert wait_closed(sixth, 5) < 1.0
            log_line(m, f"connection from 127.0.0.1:{sixth.getsockname()[1]} refused",
                     "5 connections open, the cap (max_connections) is 5")
        # the five already in are served as before
        for c in mtas:
            c.mail("<a@x.test>")
        # one of them leaves: a new connection gets its place
        mtas.pop().quit()
        assert wait_until_served(m, 5.0)
    finally:
        for c in mtas:
            c.close()


def wait_until_served(m: MonkeyProcess, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if alive_and_serving(m.address, timeout=2):
            return True
        time.sleep(0.1)
    return False


def test_refusals_are_rate_limited_with_a_count(
        monkey_daemon: Callable[..., MonkeyProcess]) -> None:
    m = monkey_daemon(daemon={"max_connections": 1})
    holder = negotiated(m)
    try:
        for _ in range(30):
            with socket.create_connection(tcp(m), timeout=5) as s:
                assert wait_closed(s, 5) < 1.0
        lines = [line for line in m.log().splitlines() if "refused" in line]
        assert len(lines) == 1, lines  # one line per 10 s; the rest are counted
    finally:
        holder.close()


def test_connections_that_never_negotiate_lose_the_oldest_to_newcomers(
        monkey_daemon: Callable[..., MonkeyProcess]) -> None:
    """max_connections 80 allows 10 connections sitting before negotiation (80 // 8)."""
    m = monkey_daemon(daemon={"max_connections": 80})
    idle = [socket.create_connection(tcp(m), timeout=10) for _ in range(10)]
    try:
        idle[0].sendall(b"\0\0\0")  # the oldest stopped inside a length prefix
        time.sleep(0.3)  # all ten are accepted before the eleventh
        idle.append(socket.create_connection(tcp(m), timeout=10))
        assert wait_closed(idle[0], 5) < 1.0
        oldest = f"127.0.0.1:{idle[0].getsockname()[1]}"
        log_line(m, "10 connections have not negotiated; closing the oldest",
                 f"({oldest}, connected")
        time.sleep(0.3)
        # one line for the eviction, none from the evicted connection's own end
        assert sum(oldest in line for line in m.log().splitlines()) == 1, m.log()
        for s in idle[1:]:  # the newer ones stay
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(1)
        # a real MTA is still served while the others sit there
        assert alive_and_serving(m.address, timeout=5)
    finally:
        for s in idle:
            s.close()


def test_eviction_passes_over_a_connection_whose_optneg_is_waiting() -> None:
    """An MTA's thread may not have run yet when the flood evicts: its OPTNEG is in the
    socket, a stalled client's is not.  Unit test of the choice, over real socket pairs."""
    listener = Listener(parse_connection("inet:8890@127.0.0.1"), cast(Any, None), Timeouts(),
                        max_connections=80)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        conns = [MilterConnection(ours, f"peer{i}", cast(Any, None), Timeouts(), tcp=False)
                 for i, (ours, _) in enumerate(pairs)]
        for conn in conns:
            listener._unnegotiated[conn] = None
        optneg = struct.pack("!I", 13) + b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF)
        pairs[0][1].sendall(optneg)  # the oldest is an MTA about to negotiate
        pairs[1][1].sendall(b"\0\0\0")  # the next stopped inside a length prefix
        assert _waiting_bytes(pairs[0][0]) == len(optneg)
        assert listener._stalled() is conns[1]
        assert _waiting_bytes(pairs[0][0]) == len(optneg)  # looking consumed nothing
        pairs[1][1].sendall(optneg[3:])  # now both wait with an OPTNEG: the oldest idle one
        assert listener._stalled() is conns[2]
        pairs[2][1].sendall(optneg)  # all of them: the oldest after all
        assert listener._stalled() is conns[0]
    finally:
        for a, b in pairs:
            a.close()
            b.close()
