"""Connection reuse after SMFIC_QUIT_NC, driven by an MTA side that is not ours (issue 15).

``miltertest`` (PyPI, GPLv3) speaks the MTA end of the milter protocol; it is
installed by the nox ``tests`` session only, never a dependency of a
MilterMonkey package.  It knows nothing of our test kit, so a shared
misreading of the protocol cannot hide here.  The driver below offers what
Sendmail 8.14+ offers, honours the steps and replies the daemon negotiated
away, and runs libmilter's documented connection reuse: a message, then
QUIT_NC (with or without ABORT before it, after an accepted or a rejected
message), then a new CONNECT and a message on the same socket, which must be
answered.  The previous release (libmilter, over TCP) answered nothing
after QUIT_NC, with or without ABORT before it: the MTA waited for its
timeout.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from miltermonkey_core.testing.daemon import MonkeyProcess

if os.environ.get("MILTERMONKEY_REQUIRE_STACK") == "1":
    import miltertest as mt
else:
    mt = pytest.importorskip("miltertest", reason="miltertest is installed by nox -s tests")

#: Every action but SETSYMLIST, whose reply tail miltertest 1.0 cannot decode.
OFFERED_ACTIONS = mt.SMFI_V6_ACTS & ~mt.SMFIF_SETSYMLIST

#: (command, SMFIP_NO* bit that skips it, SMFIP_NR_* bit that leaves it unanswered)
STEPS = {
    mt.SMFIC_CONNECT: (mt.SMFIP_NOCONNECT, mt.SMFIP_NR_CONN),
    mt.SMFIC_HELO: (mt.SMFIP_NOHELO, mt.SMFIP_NR_HELO),
    mt.SMFIC_MAIL: (mt.SMFIP_NOMAIL, mt.SMFIP_NR_MAIL),
    mt.SMFIC_RCPT: (mt.SMFIP_NORCPT, mt.SMFIP_NR_RCPT),
    mt.SMFIC_DATA: (mt.SMFIP_NODATA, mt.SMFIP_NR_DATA),
    mt.SMFIC_HEADER: (mt.SMFIP_NOHDRS, mt.SMFIP_NR_HDR),
    mt.SMFIC_EOH: (mt.SMFIP_NOEOH, mt.SMFIP_NR_EOH),
    mt.SMFIC_BODY: (mt.SMFIP_NOBODY, mt.SMFIP_NR_BODY),
}


class MiltertestMta:
    """An MTA built on miltertest's MilterConnection: one SMTP session per :meth:`session`."""

    def __init__(self, address: Any, timeout: float = 10.0) -> None:
        if isinstance(address, tuple):
            sock = socket.create_connection(address, timeout=timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(address))
        self.sock = sock
        self.conn = mt.MilterConnection(sock)
        self.actions, self.protocol = self.conn.optneg_mta(actions=OFFERED_ACTIONS,
                                                           protocol=mt.SMFI_V6_PROT)

    def step(self, cmd: str, **fields: Any) -> str | None:
        """Send one step as negotiated; its reply code, or None when none is due."""
        skip, no_reply = STEPS[cmd]
        if self.protocol & skip:
            return None
        if self.protocol & no_reply:
            self.sock.sendall(mt.codec.encode_msg(cmd, **fields))
            return None
        reply: str = self.conn.send_ar(cmd, **fields)[0]
        return reply

    def session(self, subject: str, body: str) -> list[tuple[str, dict[str, Any]]]:
        """CONNECT, HELO and one message; the replies to end of message, final one last."""
        self.conn.send_macro(mt.SMFIC_CONNECT, j="mx.example.test", _="client.test [192.0.2.5]")
        replies = [
            self.step(mt.SMFIC_CONNECT, hostname="client.test", family="4", port=40000,
                      address="192.0.2.5"),
            self.step(mt.SMFIC_HELO, helo="client.test"),
            self.step(mt.SMFIC_MAIL, args=["<sender@example.test>"]),
            self.step(mt.SMFIC_RCPT, args=["<rcpt@example.test>"]),
            self.step(mt.SMFIC_DATA),
            self.step(mt.SMFIC_HEADER, name="Subject", value=subject),
            self.step(mt.SMFIC_HEADER, name="Message-ID", value=f"<{subject}@example.test>"),
            self.step(mt.SMFIC_EOH),
            self.step(mt.SMFIC_BODY, buf=body),
        ]
        assert all(r in (None, mt.SMFIR_CONTINUE) for r in replies), replies
        eom: list[tuple[str, dict[str, Any]]] = self.conn.send_eom()
        return eom

    def abort(self) -> None:
        self.conn._send(mt.SMFIC_ABORT)

    def quit_nc(self) -> None:
        self.conn._send(mt.SMFIC_QUIT_NC)

    def quit(self) -> None:
        self.conn._send(mt.SMFIC_QUIT)
        self.sock.settimeout(5)
        assert self.sock.recv(1) == b""  # the daemon closes its end
        self.sock.close()


def final(eom: list[tuple[str, dict[str, Any]]]) -> str:
    return eom[-1][0]


def stamped(eom: list[tuple[str, dict[str, Any]]]) -> bool:
    return final(eom) == mt.SMFIR_ACCEPT and any(
        cmd == mt.SMFIR_INSHEADER and fields["name"] == "X-Stamp" for cmd, fields in eom)


@pytest.fixture(scope="module", params=["tcp", "unix"])
def monkey(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonkeyProcess]:
    """gate (rejects REJECT-ME at end of message) and stamp; over UNIX sockets the daemon
    also negotiates no-reply steps, which the driver honours."""
    m = MonkeyProcess(Path(tmp_path_factory.mktemp("quitnc")) / "m",
                      [{"use": "gate"}, {"use": "stamp"}], unix=request.param == "unix")
    with m:
        yield m
    assert "Traceback" not in m.output() and "internal error" not in m.log()


@pytest.mark.parametrize("first", ["accepted", "rejected"])
@pytest.mark.parametrize("abort", [False, True], ids=["no ABORT", "ABORT"])
def test_a_second_session_after_quit_nc_is_answered(monkey: MonkeyProcess, first: str,
                                                    abort: bool) -> None:
    mta = MiltertestMta(monkey.address)
    try:
        run_reuse(mta, first, abort)
    finally:
        mta.sock.close()


def run_reuse(mta: MiltertestMta, first: str, abort: bool) -> None:
    eom = mta.session("first", "REJECT-ME\r\n" if first == "rejected" else "hello\r\n")
    if first == "accepted":
        assert stamped(eom), eom
    else:
        assert final(eom) == mt.SMFIR_REPLYCODE and eom[-1][1]["smtpcode"] == "550", eom
    if abort:
        mta.abort()
    mta.quit_nc()
    start = time.monotonic()
    second = mta.session("second", "hello again\r\n")
    assert stamped(second), second
    assert time.monotonic() - start < 2.0
    # and a third, to show the reuse is not a one-off
    mta.quit_nc()
    assert stamped(mta.session("third", "and again\r\n"))
    mta.quit()
