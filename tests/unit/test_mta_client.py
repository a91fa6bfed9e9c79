"""Tests for the pure-Python MTA side of the milter protocol.

Most tests drive real pymilter/libmilter milters, each running in its own
subprocess (libmilter's main loop is process-global), over UNIX sockets (one
test uses loopback TCP).  The milters are embedded below as source text so the
test file is self-contained.  A few strictness tests use a scripted raw-protocol
peer on a socketpair, because libmilter never misbehaves the way we want to
provoke, and the ``apply()`` semantics are unit-tested without any socket.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from miltermonkey_core.milter import protocol as mp
from miltermonkey_core.testing.cleanup import (
    AddHeader,
    AddRecipient,
    AddRecipientPar,
    AppliedMessage,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    EomResult,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    parse_message,
)
from miltermonkey_core.testing.client import ConnectInfo, MessageSpec, MilterClient, run_session
from miltermonkey_core.testing.replies import (
    Disposition,
    NegotiationError,
    PostfixIncompatibleError,
    Reply,
    SmtpReply,
    Stage,
    UnnegotiatedActionError,
)

# ==========================================================================
# Milters under test (run in subprocesses)
# ==========================================================================

MILTER_SOURCE = r'''
import sys
import Milter

CONTINUE, ACCEPT, REJECT = Milter.CONTINUE, Milter.ACCEPT, Milter.REJECT
TEMPFAIL, DISCARD = Milter.TEMPFAIL, Milter.DISCARD


class Scripted(Milter.Base):
    """Overrides every callback (so every step is sent and answered).

    Behaviour is chosen by the envelope sender's local part, so one process
    serves many tests.
    """

    messages = 0

    def __init__(self):
        self.aborts = 0
        self.messages = 0

    def connect(self, hostname, family, hostaddr):
        self.client = hostname
        if hostname == "reject.example.test":
            self.setreply("554", "5.7.1", "go away")
            return REJECT
        return CONTINUE

    def hello(self, name):
        if name == "tempfail.example.test":
            return TEMPFAIL
        return CONTINUE

    def envfrom(self, sender, *args):
        self.messages += 1
        self.sender = sender
        self.rcpts = []
        self.headers = []
        self.body_len = 0
        self.chunks = 0
        self.mail_i = self.getsymval("i")
        if sender.startswith("<reject-mail"):
            self.setreply("550", "5.7.1", "sender refused")
            return REJECT
        if sender.startswith("<accept-mail"):
            return ACCEPT
        return CONTINUE

    def envrcpt(self, rcpt, *args):
        if "bad" in rcpt:
            self.setreply("550", "5.1.1", "no such user")
            return REJECT
        if "temp" in rcpt:
            return TEMPFAIL
        self.rcpts.append(rcpt)
        return CONTINUE

    def data(self):
        if self.sender.startswith("<discard-data"):
            return DISCARD
        return CONTINUE

    def header(self, name, value):
        self.headers.append((name, value))
        return CONTINUE

    def eoh(self):
        return CONTINUE

    def body(self, chunk):
        self.chunks += 1
        self.body_len += len(chunk)
        return CONTINUE

    def unknown(self, cmd):
        return CONTINUE

    def abort(self):
        self.aborts += 1
        return CONTINUE

    def eom(self):
        kind = self.sender[1:].split("@")[0]
        if kind == "progress":
            self.progress()
            self.progress()
            self.quarantine("held for review")
            return ACCEPT
        if kind == "tempfail-eom":
            self.setreply("451", "4.7.1", "try again later")
            return TEMPFAIL
        if kind == "multiline":
            self.setreply("550", "5.7.0", "first line", "second 100%% line")
            return REJECT
        if kind == "edit":
            # Order matters: each edit sees the previous ones (live list).
            self.addheader("X-Added", "one")
            self.addheader("X-Added", "two")
            self.chgheader("X-Added", 2, "two, changed")
            self.chgheader("Subject", 1, "changed subject")
            self.chgheader("X-Remove", 1, "")
            self.chgheader("X-Remove", 1, "second X-Remove, now first")
            self.addheader("X-Top", "top", 0)
            self.addheader("X-Third", "third", 2)
            self.chgheader("X-Missing", 3, "appended")
            self.addrcpt("<added@example.net>")
            self.addrcpt("<added-par@example.net>", "NOTIFY=NEVER")
            self.delrcpt("<gone@example.net>")
            self.chgfrom("<bounces@example.org>", "BODY=8BITMIME")
            return ACCEPT
        if kind == "body":
            text = b"".join(b"line %06d of the replacement body\r\n" % i for i in range(4000))
            self.replacebody(text[:70000])
            self.replacebody(text[70000:])
            self.addheader("X-Original-Body-Len", str(self.body_len))
            return CONTINUE
        if kind == "discard-eom":
            return DISCARD
        self.addheader(
            "X-Scripted",
            "msg=%d aborts=%d headers=%d body=%d chunks=%d rcpts=%s i=%s"
            % (self.messages, self.aborts, len(self.headers), self.body_len,
               self.chunks, ",".join(self.rcpts), self.mail_i),
        )
        for name, value in self.headers:
            self.addheader("X-Seen", "%s=%r" % (name, value))
        return CONTINUE


class NoReply(Milter.Base):
    """Uses @noreply everywhere it can, leaves data/unknown as @nocallback
    (inherited from Base), and asks for macro lists in negotiate."""

    def negotiate(self, opts):
        rc = Milter.Base.negotiate(self, opts)
        # pymilter 1.0.5's Base.setsymlist() passes bytes where the C module
        # wants str (TypeError), so talk to the context directly.
        self._ctx.setsymlist(Milter.M_ENVFROM, "{mail_addr} i")
        self._ctx.setsymlist(Milter.M_EOM, "i {client_addr}")
        return rc

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        self.hostname = hostname
        self.conn_j = self.getsymval("j")
        return CONTINUE

    @Milter.noreply
    def hello(self, name):
        self.helo = name
        return CONTINUE

    @Milter.noreply
    def envfrom(self, sender, *args):
        self.macro_seen = "mail_addr=%s i=%s auth=%s" % (
            self.getsymval("{mail_addr}"), self.getsymval("i"),
            self.getsymval("{auth_authen}"))
        self.headers = 0
        self.body_len = 0
        self.rcpts = 0
        return CONTINUE

    @Milter.noreply
    def envrcpt(self, rcpt, *args):
        self.rcpts += 1
        return CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.headers += 1
        return CONTINUE

    @Milter.noreply
    def eoh(self):
        return CONTINUE

    @Milter.noreply
    def body(self, chunk):
        self.body_len += len(chunk)
        return CONTINUE

    # Base already marks these @nocallback; spelled out because the test
    # checks the resulting SMFIP_NODATA/SMFIP_NOUNKNOWN bits.
    @Milter.nocallback
    def data(self):
        return CONTINUE

    @Milter.nocallback
    def unknown(self, cmd):
        return CONTINUE

    def eom(self):
        self.addheader(
            "X-NoReply",
            "host=%s helo=%s rcpts=%d headers=%d body=%d j=%s"
            % (self.hostname, self.helo, self.rcpts, self.headers, self.body_len, self.conn_j),
        )
        self.addheader("X-Macros", self.macro_seen)
        self.addheader("X-Eom-Macros", "i=%s client_addr=%s" % (
            self.getsymval("i"), self.getsymval("{client_addr}")))
        return ACCEPT


@Milter.header_leading_space
class LeadSpace(Milter.Base):
    """Negotiates SMFIP_HDR_LEADSPC and reports header values verbatim."""

    def envfrom(self, sender, *args):
        self.seen = []
        return CONTINUE

    def header(self, name, value):
        self.seen.append((name, value))
        return CONTINUE

    def eom(self):
        for name, value in self.seen:
            self.addheader("X-Seen", " %s=%r" % (name, value))
        return ACCEPT


class Plain(Milter.Base):
    """Only eom is overridden: shows pymilter's default negotiation."""

    def eom(self):
        self.addheader("X-Plain", "yes")
        return ACCEPT


CLASSES = {c.__name__: c for c in (Scripted, NoReply, LeadSpace, Plain)}

if __name__ == "__main__":
    Milter.factory = CLASSES[sys.argv[1]]
    Milter.runmilter("mta-client-test", sys.argv[2], 30)
'''


class _MilterProcesses:
    """Starts each milter class at most once per module and stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.script = workdir / "test_milters.py"
        self.script.write_text(MILTER_SOURCE)
        self.procs: dict[str, tuple[subprocess.Popen[bytes], BinaryIO]] = {}
        self.addresses: dict[str, tuple[str, int] | str] = {}

    def start(self, name: str, *, tcp: bool = False) -> tuple[str, int] | str:
        key = f"{name}/{'tcp' if tcp else 'unix'}"
        if key in self.addresses:
            return self.addresses[key]
        address: tuple[str, int] | str
        if tcp:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            spec = f"inet:{port}@127.0.0.1"
            address = ("127.0.0.1", port)
        else:
            path = self.workdir / f"{name}.sock"
            spec = f"unix:{path}"
            address = str(path)
        log = (self.workdir / f"{key.replace('/', '-')}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, str(self.script), name, spec],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[key] = (proc, log)
        self._wait_ready(proc, address, key)
        self.addresses[key] = address
        return address

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], address: tuple[str, int] | str, key: str
    ) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (self.workdir / f"{key.replace('/', '-')}.log").read_text()
                raise RuntimeError(f"milter {key} exited with {proc.returncode}:\n{log}")
            family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(address)
                except OSError:
                    time.sleep(0.05)
                    continue
                # Say goodbye properly so libmilter does not log an error.
                sock.sendall(mp.encode_packet(mp.SMFIC_QUIT))
                return
        raise RuntimeError(f"milter {key} did not start listening")

    def stop_all(self) -> None:
        # Signal them all first: libmilter takes a few seconds to notice.
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, log in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()


@pytest.fixture(scope="module")
def milters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_MilterProcesses]:
    procs = _MilterProcesses(tmp_path_factory.mktemp("milters"))
    try:
        yield procs
    finally:
        procs.stop_all()


SIMPLE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hi Bob.\r\n"
)

EDIT_MESSAGE = (
    b"From: alice@example.org\r\n"
    b"Subject: original\r\n"
    b"X-Remove: first\r\n"
    b"X-Remove: second\r\n"
    b"\r\n"
    b"body\r\n"
)


# ==========================================================================
# Negotiation
# ==========================================================================


def test_pymilter_default_negotiation(milters: _MilterProcesses) -> None:
    """pymilter keeps all offered actions and turns un-overridden callbacks into NO* bits."""
    with MilterClient(milters.start("Plain")) as client:
        neg = client.negotiate()
        client.quit()
    assert neg.version == 6
    assert neg.actions == mp.ALL_V6_ACTIONS
    assert neg.protocol == (
        mp.SMFIP_NOCONNECT
        | mp.SMFIP_NOHELO
        | mp.SMFIP_NOMAIL
        | mp.SMFIP_NORCPT
        | mp.SMFIP_NOBODY
        | mp.SMFIP_NOHDRS
        | mp.SMFIP_NOEOH
        | mp.SMFIP_NOUNKNOWN
        | mp.SMFIP_NODATA
        | mp.SMFIP_SKIP
    )
    assert neg.macro_lists == {}


def test_plain_milter_gets_only_eom(milters: _MilterProcesses) -> None:
    [result] = run_session(milters.start("Plain"), [(SIMPLE, "<a@example.org>", ["<b@x.test>"])])
    assert result.disposition is Disposition.ACCEPT
    assert result.applied is not None
    assert result.applied.header_values("X-Plain") == ["yes"]
    # Every step but EOM was skipped, so nothing but macros, EOB and ABORT went out.
    assert result.connect_reply is None
    assert result.mail_reply is None
    assert result.replies == [(Stage.EOM, Reply("a"))]


def test_noreply_and_symlist_negotiation(milters: _MilterProcesses) -> None:
    with MilterClient(milters.start("NoReply")) as client:
        neg = client.negotiate()
        client.quit()
    nr_bits = (
        mp.SMFIP_NR_CONN
        | mp.SMFIP_NR_HELO
        | mp.SMFIP_NR_MAIL
        | mp.SMFIP_NR_RCPT
        | mp.SMFIP_NR_HDR
        | mp.SMFIP_NR_EOH
        | mp.SMFIP_NR_BODY
    )
    assert neg.protocol & nr_bits == nr_bits
    assert neg.protocol & (mp.SMFIP_NODATA | mp.SMFIP_NOUNKNOWN) == (
        mp.SMFIP_NODATA | mp.SMFIP_NOUNKNOWN
    )
    assert not neg.protocol & (mp.SMFIP_NOCONNECT | mp.SMFIP_NOHDRS | mp.SMFIP_NOBODY)
    assert neg.macro_lists == {
        mp.SMFIM_ENVFROM: ("{mail_addr}", "i"),
        mp.SMFIM_EOM: ("i", "{client_addr}"),
    }


def test_leading_space_negotiation(milters: _MilterProcesses) -> None:
    with MilterClient(milters.start("LeadSpace")) as client:
        neg = client.negotiate()
        client.quit()
    assert neg.header_leading_space


def test_zero_offer_means_v1_defaults(milters: _MilterProcesses) -> None:
    """libmilter reads protocol == 0 as SMFI_V1_PROT, so its NO* bits are legitimate."""
    with MilterClient(milters.start("Plain")) as client:
        neg = client.negotiate(protocol=0)
        client.quit()
    assert neg.protocol == mp.SMFI_V1_PROT


# ==========================================================================
# Whole messages against real milters
# ==========================================================================


def test_header_added_at_eom_visible_in_apply(milters: _MilterProcesses) -> None:
    [result] = run_session(
        milters.start("Scripted"), [(SIMPLE, "<alice@example.org>", ["<bob@example.net>"])]
    )
    assert result.disposition is Disposition.CONTINUE
    assert result.decided_at is Stage.EOM
    assert result.eom is not None
    added = result.eom.actions_of(AddHeader)
    assert added[0] == AddHeader(
        "X-Scripted",
        f"msg=1 aborts=0 headers=3 body=9 chunks=1 rcpts=<bob@example.net> i={result.queue_id}",
    )
    applied = result.applied
    assert applied is not None
    assert applied.headers[:3] == [
        ("From", "Alice <alice@example.org>"),
        ("To", "Bob <bob@example.net>"),
        ("Subject", "hello"),
    ]
    assert applied.header_values("x-scripted") == [added[0].value]
    # The milter saw the values without the space after the colon.
    assert applied.header_values("X-Seen") == [
        "From='Alice <alice@example.org>'",
        "To='Bob <bob@example.net>'",
        "Subject='hello'",
    ]
    assert applied.body == b"Hi Bob.\r\n"
    assert applied.recipients == ["<bob@example.net>"]
    assert b"X-Scripted: msg=1" in applied.as_bytes()


def test_header_edit_semantics_against_libmilter(milters: _MilterProcesses) -> None:
    [result] = run_session(
        milters.start("Scripted"),
        [(EDIT_MESSAGE, "<edit@example.org>", ["<stay@example.net>", "<gone@example.net>"])],
    )
    assert result.disposition is Disposition.ACCEPT
    assert result.eom is not None
    assert result.eom.actions == [
        AddHeader("X-Added", "one"),
        AddHeader("X-Added", "two"),
        ChangeHeader(2, "X-Added", "two, changed"),
        ChangeHeader(1, "Subject", "changed subject"),
        ChangeHeader(1, "X-Remove", ""),
        ChangeHeader(1, "X-Remove", "second X-Remove, now first"),
        InsertHeader(0, "X-Top", "top"),
        InsertHeader(2, "X-Third", "third"),
        ChangeHeader(3, "X-Missing", "appended"),
        AddRecipient("<added@example.net>"),
        AddRecipientPar("<added-par@example.net>", "NOTIFY=NEVER"),
        DeleteRecipient("<gone@example.net>"),
        ChangeFrom("<bounces@example.org>", "BODY=8BITMIME"),
    ]
    applied = result.applied
    assert applied is not None
    assert applied.headers == [
        ("X-Top", "top"),
        ("From", "alice@example.org"),
        ("X-Third", "third"),
        ("Subject", "changed subject"),
        ("X-Remove", "second X-Remove, now first"),
        ("X-Added", "one"),
        ("X-Added", "two, changed"),
        ("X-Missing", "appended"),
    ]
    assert applied.recipients == [
        "<stay@example.net>",
        "<added@example.net>",
        "<added-par@example.net>",
    ]
    assert applied.sender == "<bounces@example.org>"
    assert applied.sender_esmtp_args == "BODY=8BITMIME"


def test_reject_at_rcpt_drops_only_that_recipient(milters: _MilterProcesses) -> None:
    [result] = run_session(
        milters.start("Scripted"),
        [(SIMPLE, "<alice@example.org>", ["<bob@example.net>", "<bad@example.net>"])],
    )
    assert result.disposition is Disposition.CONTINUE
    bad = result.rejected_recipients["<bad@example.net>"]
    assert bad.disposition is Disposition.REJECT
    assert bad.smtp == SmtpReply(550, "5.1.1", "no such user", "550 5.1.1 no such user")
    assert result.accepted_recipients == ["<bob@example.net>"]
    assert result.applied is not None
    assert result.applied.recipients == ["<bob@example.net>"]
    # The milter itself only kept the good one.
    assert "rcpts=<bob@example.net> " in result.applied.header_values("X-Scripted")[0]


def test_all_recipients_refused_fails_message(milters: _MilterProcesses) -> None:
    [result] = run_session(
        milters.start("Scripted"),
        [(SIMPLE, "<alice@example.org>", ["<bad@example.net>", "<temp@example.net>"])],
    )
    assert result.disposition is Disposition.TEMPFAIL  # one of them may succeed later
    assert result.decided_at is Stage.RCPT
    assert result.eom is None
    assert result.data_reply is None
    assert result.applied is None


def test_progress_replies_are_counted_and_quarantine(milters: _MilterProcesses) -> None:
    [result] = run_session(
        milters.start("Scripted"), [(SIMPLE, "<progress@example.org>", ["<b@example.net>"])]
    )
    assert result.eom is not None
    assert result.eom.progress_count == 2
    assert result.eom.quarantine_reason == "held for review"
    assert result.eom.actions == [Quarantine("held for review")]
    assert result.disposition is Disposition.ACCEPT
    assert result.applied is not None
    assert result.applied.quarantine_reason == "held for review"


def test_tempfail_and_multiline_reply_at_eom(milters: _MilterProcesses) -> None:
    results = run_session(
        milters.start("Scripted"),
        [
            (SIMPLE, "<tempfail-eom@example.org>", ["<b@example.net>"]),
            (SIMPLE, "<multiline@example.org>", ["<b@example.net>"]),
        ],
    )
    assert results[0].disposition is Disposition.TEMPFAIL
    assert results[0].reply == SmtpReply(
        451, "4.7.1", "try again later", "451 4.7.1 try again later"
    )
    assert results[0].applied is None
    multi = results[1].reply
    assert multi is not None
    assert results[1].disposition is Disposition.REJECT
    assert multi.code == 550
    assert multi.enhanced_code == "5.7.0"
    # libmilter keeps the doubled %% on the wire; Postfix shows a single %.
    assert "%%" in multi.raw
    assert multi.text == "first line\nsecond 100% line"


def test_replbody_in_several_chunks_and_big_body(milters: _MilterProcesses) -> None:
    original = b"".join(b"original line %06d\r\n" % i for i in range(8000))  # ~168 KiB
    raw = b"Subject: big\r\n\r\n" + original
    [result] = run_session(
        milters.start("Scripted"), [(raw, "<body@example.org>", ["<b@example.net>"])]
    )
    assert result.eom is not None
    chunks = result.eom.actions_of(ReplaceBody)
    assert len(chunks) >= 3  # 70000 bytes need two packets, plus the rest
    assert all(len(c.chunk) <= mp.MILTER_CHUNK_SIZE for c in chunks if isinstance(c, ReplaceBody))
    expected = b"".join(b"line %06d of the replacement body\r\n" % i for i in range(4000))
    assert result.eom.replaced_body == expected
    assert result.applied is not None
    assert result.applied.body == expected
    assert result.applied.header_values("X-Original-Body-Len") == [str(len(original))]


def test_body_is_sent_in_64k_chunks(milters: _MilterProcesses) -> None:
    original = b"x" * 100 + b"\n" + b"y" * 150_000 + b"\n"  # LF input becomes CRLF
    raw = b"Subject: chunks\n\n" + original
    with MilterClient(milters.start("Scripted")) as client:
        client.negotiate()
        result = client.send_message(raw, "<a@example.org>", ["<b@example.net>"])
        client.quit()
    body_packets = [n for d, cmd, n in client.transcript if d == ">" and cmd == mp.SMFIC_BODY]
    assert body_packets == [65535, 65535, 150_104 - 2 * 65535]
    assert result.applied is not None
    assert "body=150104 chunks=3" in result.applied.header_values("X-Scripted")[0]


def test_two_messages_on_one_connection(milters: _MilterProcesses) -> None:
    results = run_session(
        milters.start("Scripted"),
        [
            MessageSpec(SIMPLE, "<reject-mail@example.org>", ["<b@example.net>"]),
            MessageSpec(SIMPLE, "<a@example.org>", ["<bad@example.net>"]),
            MessageSpec(SIMPLE, "<a@example.org>", ["<b@example.net>"]),
            MessageSpec(SIMPLE, "<a@example.org>", ["<c@example.net>"]),
        ],
    )
    rejected_mail, no_rcpt, third, fourth = results
    assert rejected_mail.disposition is Disposition.REJECT
    assert rejected_mail.decided_at is Stage.MAIL
    assert rejected_mail.reply is not None
    assert rejected_mail.reply.text == "sender refused"
    assert no_rcpt.disposition is Disposition.REJECT
    assert no_rcpt.decided_at is Stage.RCPT
    # The connection is set up once.  libmilter only runs the abort callback for
    # an ABORT inside a transaction: not after a rejected MAIL (the transaction
    # is already over), not after a completed EOM, but after the failed RCPTs.
    assert third.connect_reply is None
    assert third.applied is not None
    assert third.applied.header_values("X-Scripted")[0].startswith("msg=3 aborts=1 ")
    assert fourth.applied is not None
    assert fourth.applied.header_values("X-Scripted")[0].startswith("msg=4 aborts=1 ")
    assert "rcpts=<c@example.net>" in fourth.applied.header_values("X-Scripted")[0]
    assert third.queue_id != fourth.queue_id


def test_accept_and_discard_before_eom(milters: _MilterProcesses) -> None:
    accepted, discarded, discard_eom = run_session(
        milters.start("Scripted"),
        [
            (SIMPLE, "<accept-mail@example.org>", ["<b@example.net>"]),
            (SIMPLE, "<discard-data@example.org>", ["<b@example.net>"]),
            (SIMPLE, "<discard-eom@example.org>", ["<b@example.net>"]),
        ],
    )
    assert accepted.disposition is Disposition.ACCEPT
    assert accepted.decided_at is Stage.MAIL
    assert accepted.rcpt_replies == {}  # no more events for this message
    assert accepted.applied is not None
    assert accepted.applied.recipients == ["<b@example.net>"]
    assert accepted.applied.headers == accepted.headers
    assert discarded.disposition is Disposition.DISCARD
    assert discarded.decided_at is Stage.DATA
    assert discarded.applied is None
    assert discard_eom.disposition is Disposition.DISCARD
    assert discard_eom.decided_at is Stage.EOM


def test_reject_at_connect_decides_every_message(milters: _MilterProcesses) -> None:
    results = run_session(
        milters.start("Scripted"),
        [
            (SIMPLE, "<a@example.org>", ["<b@example.net>"]),
            (SIMPLE, "<a@example.org>", ["<b@example.net>"]),
        ],
        connect_info=ConnectInfo(hostname="reject.example.test", address="198.51.100.7"),
    )
    for result in results:
        assert result.disposition is Disposition.REJECT
        assert result.decided_at is Stage.CONNECT
        assert result.reply == SmtpReply(554, "5.7.1", "go away", "554 5.7.1 go away")
        assert result.mail_reply is None
    assert results[0].connect_reply is not None
    assert results[1].connect_reply is None


def test_tempfail_at_helo(milters: _MilterProcesses) -> None:
    [result] = run_session(
        milters.start("Scripted"),
        [(SIMPLE, "<a@example.org>", ["<b@example.net>"])],
        helo="tempfail.example.test",
    )
    assert result.disposition is Disposition.TEMPFAIL
    assert result.decided_at is Stage.HELO
    assert result.helo_reply == Reply("t")


def test_no_reply_steps_do_not_deadlock(milters: _MilterProcesses) -> None:
    body = b"z" * 200_000 + b"\r\n"
    raw = b"".join(b"X-Header-%d: value %d\r\n" % (i, i) for i in range(200)) + b"\r\n" + body
    with MilterClient(milters.start("NoReply"), timeout=10) as client:
        client.negotiate()
        result = client.send_message(
            raw,
            "<alice@example.org>",
            ["<b@example.net>", "<c@example.net>"],
            macros={"mail": {"{auth_authen}": "alice"}},
            connect_info=ConnectInfo(hostname="client.example.test", address="203.0.113.5"),
            helo="helo.example.test",
        )
        client.quit()
    assert result.disposition is Disposition.ACCEPT
    # Nothing but EOM was answered.
    assert [stage for stage, _ in result.replies] == [Stage.EOM]
    # SMFIP_NODATA: the DATA step was never sent.
    sent = [cmd for direction, cmd, _ in client.transcript if direction == ">"]
    assert mp.SMFIC_DATA not in sent
    assert sent.count(mp.SMFIC_HEADER) == 200
    assert result.applied is not None
    assert result.applied.header_values("X-NoReply") == [
        "host=client.example.test helo=helo.example.test rcpts=2 headers=200 "
        f"body={len(body)} j=mx.example.test"
    ]
    # setsymlist: for MAIL only {mail_addr} and i were sent, not {auth_authen}.
    assert result.applied.header_values("X-Macros") == [
        f"mail_addr=alice@example.org i={result.queue_id} auth=None"
    ]
    # ... and the EOM list pulls {client_addr} from the connect stage.
    assert result.applied.header_values("X-Eom-Macros") == [
        f"i={result.queue_id} client_addr=203.0.113.5"
    ]


def test_libmilter_fakes_replies_when_nr_not_offered(milters: _MilterProcesses) -> None:
    """If the MTA does not offer SMFIP_NR_*, libmilter answers CONTINUE itself."""
    offered = mp.ALL_V6_PROTOCOL_BITS & ~mp.SMFIP_NOREPLY_MASK
    with MilterClient(milters.start("NoReply")) as client:
        neg = client.negotiate(protocol=offered)
        assert not neg.protocol & mp.SMFIP_NOREPLY_MASK
        result = client.send_message(SIMPLE, "<a@example.org>", ["<b@example.net>"])
        client.quit()
    assert result.connect_reply == Reply("c")
    assert result.rcpt_replies == {"<b@example.net>": Reply("c")}
    assert result.disposition is Disposition.ACCEPT


def test_header_leading_space_and_folding(milters: _MilterProcesses) -> None:
    raw = (
        b"Subject:  two spaces\r\n"
        b"X-Folded: first\r\n"
        b"\tsecond\r\n"
        b"   third\r\n"
        b"X-Tab:\tvalue\r\n"
        b"\r\n"
        b"body\r\n"
    )
    for name, expect_lead in (("LeadSpace", True), ("Scripted", False)):
        [result] = run_session(milters.start(name), [(raw, "<a@example.org>", ["<b@x.test>"])])
        assert result.applied is not None
        seen = result.applied.header_values("X-Seen")
        if expect_lead:
            assert seen == [
                " Subject='  two spaces'",
                " X-Folded=' first\\n\\tsecond\\n   third'",
                " X-Tab='\\tvalue'",
            ]
            assert result.applied.header_leading_space
            assert b"X-Seen: Subject=" in result.applied.as_bytes()
        else:
            assert seen == [
                "Subject=' two spaces'",
                "X-Folded='first\\n\\tsecond\\n   third'",
                "X-Tab='\\tvalue'",
            ]


def test_tcp_address_and_step_api(milters: _MilterProcesses) -> None:
    """Drive the steps by hand over loopback TCP (TCP_NODELAY set)."""
    with MilterClient(milters.start("Scripted", tcp=True)) as client:
        assert client._socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client.negotiate()
        client.macros(mp.SMFIC_CONNECT, {"{daemon_name}": "mx"}, j="mx.example.test")
        assert client.connect("h.example.test", mp.SMFIA_INET6, 2525, "2001:db8::1") == Reply("c")
        assert client.helo("h.example.test") == Reply("c")
        assert client.unknown("XYZZY") == Reply("c")
        assert client.mail("<a@example.org>", "SIZE=100") == Reply("c")
        rejected = client.rcpt("<bad@example.net>")
        assert rejected is not None
        assert rejected.disposition is Disposition.REJECT
        assert client.rcpt("<ok@example.net>") == Reply("c")
        assert client.data() == Reply("c")
        assert client.header("Subject", " hi") == Reply("c")
        assert client.eoh() == Reply("c")
        assert client.body(b"hello\r\n") == Reply("c")
        with pytest.raises(ValueError, match="MILTER_CHUNK_SIZE"):
            client.body(b"x" * 65536)
        eom = client.eom()
        assert eom.disposition is Disposition.CONTINUE
        assert eom.actions[0] == AddHeader(
            "X-Scripted", "msg=1 aborts=0 headers=1 body=7 chunks=1 rcpts=<ok@example.net> i=None"
        )
        assert eom.actions[1] == AddHeader("X-Seen", "Subject='hi'")
        client.abort()
        client.quit()
        assert client.closed


# ==========================================================================
# Strictness, against a scripted raw-protocol peer
# ==========================================================================


def _optneg_reply(version: int, actions: int, protocol: int, tail: bytes = b"") -> bytes:
    return mp.encode_packet(mp.SMFIC_OPTNEG, struct.pack("!III", version, actions, protocol) + tail)


@contextlib.contextmanager
def _scripted_peer(script: Callable[[socket.socket], None]) -> Iterator[MilterClient]:
    ours, theirs = socket.socketpair()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            script(theirs)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client = MilterClient.from_socket(ours, timeout=5)
    try:
        yield client
    finally:
        client.close()
        thread.join(5)
    if errors:
        raise errors[0]


def _read_until(sock: socket.socket, cmd: str) -> None:
    while True:
        got, _ = mp.read_packet(sock)
        if got == cmd:
            return


def test_quit_nc_starts_a_new_connection() -> None:
    """After SMFIC_QUIT_NC, send_message sends CONNECT (and HELO) again.

    Checked against a scripted peer: pymilter 1.0.5 hangs the worker thread on
    the CONNECT that follows QUIT_NC (the connect callback is never reached).
    """
    seen: list[str] = []

    def peer(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.ALL_V6_ACTIONS, 0))
        while True:
            cmd, _ = mp.read_packet(sock)
            seen.append(cmd)
            if cmd == mp.SMFIC_QUIT:
                return
            if cmd in mp.STEP_FLAGS:
                sock.sendall(mp.encode_packet(mp.SMFIR_CONTINUE))

    with _scripted_peer(peer) as client:
        client.negotiate()
        first = client.send_message(SIMPLE, "<a@example.org>", ["<b@example.net>"])
        client.quit_nc()
        second = client.send_message(SIMPLE, "<a@example.org>", ["<b@example.net>"])
        client.quit()
    assert first.connect_reply == Reply("c")
    assert second.connect_reply == Reply("c")
    assert second.helo_reply == Reply("c")
    steps = [c for c in seen if c != mp.SMFIC_MACRO]
    one_message = ["C", "H", "M", "R", "T", "L", "L", "L", "N", "B", "E", "A"]
    assert steps == [*one_message, "K", *one_message, "Q"]


def test_negotiation_refuses_unoffered_bits() -> None:
    def peer(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.SMFIF_ADDHDRS, mp.SMFIP_HDR_LEADSPC))

    with (
        _scripted_peer(peer) as client,
        pytest.raises(NegotiationError, match="SMFIP_HDR_LEADSPC"),
    ):
        client.negotiate(protocol=mp.ALL_V6_PROTOCOL_BITS & ~mp.SMFIP_HDR_LEADSPC)

    def peer_actions(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.SMFIF_CHGFROM, 0))

    with (
        _scripted_peer(peer_actions) as client,
        pytest.raises(NegotiationError, match="SMFIF_CHGFROM"),
    ):
        client.negotiate(actions=mp.SMFIF_ADDHDRS)


def test_unnegotiated_action_at_eom_is_refused() -> None:
    def peer(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.SMFIF_ADDHDRS, mp.SMFIP_NOSEND_MASK))
        _read_until(sock, mp.SMFIC_BODYEOB)
        sock.sendall(mp.encode_packet(mp.SMFIR_ADDHEADER, mp.encode_strings("X-Ok", "1")))
        sock.sendall(mp.encode_packet(mp.SMFIR_CHGFROM, mp.encode_strings("<x@y>")))
        # The client may already have refused CHGFROM and closed its end.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(mp.encode_packet(mp.SMFIR_ACCEPT))

    with _scripted_peer(peer) as client:
        client.negotiate(actions=mp.SMFIF_ADDHDRS | mp.SMFIF_CHGHDRS)
        with pytest.raises(UnnegotiatedActionError, match="SMFIF_CHGFROM"):
            client.eom()


def test_interleaved_replbody_is_postfix_incompatible() -> None:
    def peer(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.ALL_V6_ACTIONS, mp.SMFIP_NOSEND_MASK))
        for _ in range(2):
            _read_until(sock, mp.SMFIC_BODYEOB)
            sock.sendall(mp.encode_packet(mp.SMFIR_REPLBODY, b"part one\r\n"))
            sock.sendall(mp.encode_packet(mp.SMFIR_ADDHEADER, mp.encode_strings("X", "y")))
            sock.sendall(mp.encode_packet(mp.SMFIR_REPLBODY, b"part two\r\n"))
            sock.sendall(mp.encode_packet(mp.SMFIR_CONTINUE))

    with _scripted_peer(peer) as client:
        client.negotiate()
        with pytest.raises(PostfixIncompatibleError):
            client.eom()
        # Not strict: accepted (as Sendmail would) and the chunks concatenate.
        client.postfix_strict = False
        _drain_until_final(client)
        result = client.eom()
        assert result.replaced_body == b"part one\r\npart two\r\n"


def _drain_until_final(client: MilterClient) -> None:
    """Skip the rest of the first (aborted) EOM exchange."""
    while True:
        cmd, _ = client._recv()
        if cmd == mp.SMFIR_CONTINUE:
            return


def test_skip_requires_negotiation_and_mods_only_at_eom() -> None:
    def peer(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.ALL_V6_ACTIONS, 0x3F & ~mp.SMFIP_NOBODY))
        _read_until(sock, mp.SMFIC_BODY)
        sock.sendall(mp.encode_packet(mp.SMFIR_PROGRESS))
        sock.sendall(mp.encode_packet(mp.SMFIR_SKIP))
        _read_until(sock, mp.SMFIC_BODY)
        sock.sendall(mp.encode_packet(mp.SMFIR_ADDHEADER, mp.encode_strings("X", "y")))

    with _scripted_peer(peer) as client:
        client.negotiate(protocol=0x3F)
        with pytest.raises(mp.MilterProtocolError, match="SMFIP_SKIP was not negotiated"):
            client.body(b"x\r\n")
        assert client.progress_count == 1
        with pytest.raises(mp.MilterProtocolError, match="only allowed at end of message"):
            client.body(b"x\r\n")


def test_eom_parses_every_action_and_symlist() -> None:
    tail = struct.pack("!I", mp.SMFIM_CONNECT) + b"j {daemon_name}\0"
    tail += struct.pack("!I", mp.SMFIM_EOH) + b"i\0"

    def peer(sock: socket.socket) -> None:
        mp.read_packet(sock)
        sock.sendall(_optneg_reply(6, mp.ALL_V6_ACTIONS, mp.SMFIP_NOSEND_MASK, tail))
        _read_until(sock, mp.SMFIC_BODYEOB)
        packets = [
            (mp.SMFIR_ADDHEADER, mp.encode_strings("X-A", "a")),
            (mp.SMFIR_INSHEADER, struct.pack("!I", 1) + mp.encode_strings("X-I", "i")),
            (mp.SMFIR_CHGHEADER, struct.pack("!I", 0) + mp.encode_strings("X-C", "")),
            (mp.SMFIR_PROGRESS, b""),
            (mp.SMFIR_ADDRCPT, mp.encode_strings("<r@x>")),
            (mp.SMFIR_ADDRCPT_PAR, mp.encode_strings("<p@x>", "ORCPT=rfc822;p@x")),
            (mp.SMFIR_DELRCPT, mp.encode_strings("<d@x>")),
            (mp.SMFIR_CHGFROM, mp.encode_strings("<f@x>")),
            (mp.SMFIR_QUARANTINE, mp.encode_strings("why")),
            (mp.SMFIR_REPLBODY, b"new\r\n"),
            (mp.SMFIR_REPLYCODE, b"550-5.7.1 one\r\n550 5.7.1 two\0"),
        ]
        for cmd, data in packets:
            sock.sendall(mp.encode_packet(cmd, data))

    with _scripted_peer(peer) as client:
        neg = client.negotiate()
        assert neg.macro_lists == {mp.SMFIM_CONNECT: ("j", "{daemon_name}"), mp.SMFIM_EOH: ("i",)}
        result = client.eom()
    assert result.disposition is Disposition.REJECT
    assert result.reply == SmtpReply(550, "5.7.1", "one\ntwo", "550-5.7.1 one\r\n550 5.7.1 two")
    assert result.progress_count == 1
    assert result.quarantine_reason == "why"
    assert [type(a).__name__ for a in result.actions] == [
        "AddHeader",
        "InsertHeader",
        "ChangeHeader",
        "AddRecipient",
        "AddRecipientPar",
        "DeleteRecipient",
        "ChangeFrom",
        "Quarantine",
        "ReplaceBody",
    ]
    assert result.actions[6] == ChangeFrom("<f@x>", "")


@pytest.mark.parametrize(
    "raw",
    [
        "250 2.0.0 ok",  # not 4xx/5xx
        "550 4.7.1 class mismatch",
        "550-5.7.1 one\r\n550-5.7.1 two",  # final line must use a space
        "550 5.7.1 one\n550 two",  # bare LF
    ],
)
def test_malformed_replycode_is_refused(raw: str) -> None:
    with pytest.raises(mp.MilterProtocolError):
        SmtpReply.parse(raw)


# ==========================================================================
# apply() semantics (no sockets)
# ==========================================================================


def _eom(*actions: object) -> EomResult:
    return EomResult(
        disposition=Disposition.CONTINUE,
        reply=None,
        actions=list(actions),
        progress_count=0,
        quarantine_reason=None,
        final=Reply("c"),
    )


def _apply(headers: list[tuple[str, str]], *actions: object) -> list[tuple[str, str]]:
    return _eom(*actions).apply(headers, b"", "<s@x>", ["<r@x>"]).headers


HEADERS = [("A", "1"), ("B", "1"), ("A", "2"), ("C", "1"), ("a", "3")]


def test_apply_change_counts_by_name_case_insensitively() -> None:
    assert _apply(HEADERS, ChangeHeader(3, "A", "new")) == [
        ("A", "1"),
        ("B", "1"),
        ("A", "2"),
        ("C", "1"),
        ("A", "new"),  # Postfix rewrites the whole line, so the milter's spelling wins
    ]
    # Index 0 is treated as 1 (Sendmail compatibility).
    assert _apply(HEADERS, ChangeHeader(0, "B", "x"))[1] == ("B", "x")


def test_apply_deleted_headers_no_longer_count() -> None:
    # Delete A#1, then A#1 is what used to be A#2.
    assert _apply(HEADERS, ChangeHeader(1, "A", ""), ChangeHeader(1, "A", "was two")) == [
        ("B", "1"),
        ("A", "was two"),
        ("C", "1"),
        ("a", "3"),
    ]


def test_apply_added_headers_count_for_later_changes() -> None:
    assert _apply(
        [("X", "orig")],
        AddHeader("X", "added"),
        ChangeHeader(2, "X", "changed added"),
        InsertHeader(0, "X", "inserted top"),
        ChangeHeader(1, "X", "changed top"),
    ) == [("X", "changed top"), ("X", "orig"), ("X", "changed added")]


def test_apply_index_beyond_count() -> None:
    # Change appends, delete is a no-op, insert appends.
    assert _apply(HEADERS, ChangeHeader(9, "B", "late"))[-1] == ("B", "late")
    assert _apply(HEADERS, ChangeHeader(9, "B", "")) == HEADERS
    assert _apply(HEADERS, InsertHeader(99, "Z", "end"))[-1] == ("Z", "end")
    assert _apply(HEADERS, InsertHeader(2, "Z", "mid"))[2] == ("Z", "mid")


def test_apply_mta_headers_are_hidden_but_count_for_inserts() -> None:
    received = [("Received", "from mta")]
    seen = [("Received", "from elsewhere"), ("Subject", "s")]
    applied = _eom(
        ChangeHeader(1, "Received", "changed"),
        InsertHeader(0, "X-Above", "above our Received"),
        InsertHeader(2, "X-Below", "just below our Received"),
    ).apply(seen, b"", "<s@x>", [], mta_headers=received)
    assert applied.headers == [
        ("X-Above", "above our Received"),
        ("Received", "from mta"),
        ("X-Below", "just below our Received"),
        ("Received", "changed"),
        ("Subject", "s"),
    ]


def test_apply_envelope_and_body() -> None:
    applied = _eom(
        AddRecipient("<new@x>"),
        DeleteRecipient("old@x"),  # matches with or without <>
        ChangeFrom("<bounce@x>", "SIZE=1"),
        ReplaceBody(b"a\r\n"),
        ReplaceBody(b"b\r\n"),
        Quarantine("spam"),
    ).apply([], b"orig\r\n", "<s@x>", ["<old@x>", "<keep@x>", "<old@x>"])
    assert applied == AppliedMessage(
        headers=[],
        body=b"a\r\nb\r\n",
        sender="<bounce@x>",
        sender_esmtp_args="SIZE=1",
        recipients=["<keep@x>", "<new@x>"],
        quarantine_reason="spam",
    )
    untouched = _eom().apply([("S", "v")], b"orig\r\n", "<s@x>", ["<r@x>"])
    assert untouched.body == b"orig\r\n"
    assert untouched.as_bytes() == b"S: v\r\n\r\norig\r\n"


def test_parse_message_keeps_folding_and_finds_body() -> None:
    parsed = parse_message(b"Subject: a\r\n b\r\nX-Empty:\r\nNot a header line\r\nmore body")
    assert parsed.raw_headers == [("Subject", " a\n b"), ("X-Empty", "")]
    assert parsed.milter_headers(leading_space=False) == [("Subject", "a\n b"), ("X-Empty", "")]
    assert parsed.body == b"Not a header line\r\nmore body\r\n"
    assert parse_message("Subject: x\n\n").body == b""
