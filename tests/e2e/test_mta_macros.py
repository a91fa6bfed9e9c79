"""Which macros Postfix and Sendmail really send, stage by stage (issue 15).

A raw recording milter sits where the daemon would: it negotiates like the
daemon (every step sent and answered), optionally with the daemon's own
SETSYMLIST request (:data:`~miltermonkey_core.milter.negotiation.CORE_MACROS`),
answers every step, and records each SMFIC_MACRO packet with the step it
belongs to.  One message goes through a real Postfix and a real Sendmail,
with each MTA's default macro lists and with the lists the docs recommend.
The tables in docs/postfix.md and docs/sendmail.md are these records; the
assertions below are the facts those pages and the README state.
``MILTERMONKEY_MACRO_REPORT=FILE`` writes every record as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from miltermonkey_core.milter import protocol as p
from miltermonkey_core.milter.negotiation import CORE_MACROS, MACRO_STAGES
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sendmail import Sendmail, SendmailMilter
from miltermonkey_core.testing.sink import SmtpSink
from miltermonkey_core.testing.smtp import send_mail

pytestmark = pytest.mark.e2e

#: The step each SMFIC_MACRO packet's first byte names, as the docs call it.
STEP_NAMES = {p.SMFIC_CONNECT: "connect", p.SMFIC_HELO: "helo", p.SMFIC_MAIL: "mail",
              p.SMFIC_RCPT: "rcpt", p.SMFIC_DATA: "data", p.SMFIC_HEADER: "header",
              p.SMFIC_EOH: "eoh", p.SMFIC_BODY: "body", p.SMFIC_BODYEOB: "eom",
              p.SMFIC_UNKNOWN: "unknown"}

#: What the README and docs tell admins to put in main.cf / sendmail.mc.
POSTFIX_RECOMMENDED = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v {client_addr} {client_name}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                          "{mail_mailer}",
}
SENDMAIL_RECOMMENDED = {
    "connect": ["j", "_", "v", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
                "{client_addr}", "{client_name}", "{client_port}"],
    "envfrom": ["i", "{auth_type}", "{auth_authen}", "{mail_addr}"],
    "envrcpt": ["i", "{rcpt_addr}", "{rcpt_mailer}"],
    "eom": ["i", "{msg_id}"],
}


class RecordingMilter:
    """A milter that answers everything and remembers every macro packet, in order."""

    def __init__(self, symlist: Mapping[str, Sequence[str]] | None) -> None:
        self.symlist = symlist
        self.records: list[tuple[str, dict[str, str]]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._conversation, args=(conn,), daemon=True).start()

    def _optneg_reply(self, data: bytes) -> bytes:
        _, actions, _ = struct.unpack("!III", data[:12])
        want = p.SMFIF_ADDHDRS | (p.SMFIF_SETSYMLIST if self.symlist is not None else 0)
        reply = bytearray(struct.pack("!III", 6, actions & want, 0))
        if self.symlist is not None and actions & p.SMFIF_SETSYMLIST:
            for stage, names in self.symlist.items():
                reply += struct.pack("!I", MACRO_STAGES[stage])
                reply += " ".join(names).encode() + b"\0"
        return bytes(reply)

    def _conversation(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        with conn:
            while True:
                try:
                    cmd, data = p.read_packet(conn)
                except (OSError, p.MilterProtocolError):
                    return
                if cmd == p.SMFIC_OPTNEG:
                    p.send_packet(conn, p.SMFIC_OPTNEG, self._optneg_reply(data))
                elif cmd == p.SMFIC_MACRO:
                    strings = [s.decode("utf-8", "replace") for s in p.split_nul_strings(data[1:])]
                    step = STEP_NAMES.get(chr(data[0]), repr(chr(data[0])))
                    self.records.append((step, dict(zip(strings[0::2], strings[1::2],
                                                        strict=False))))
                elif cmd == p.SMFIC_BODYEOB:
                    p.send_packet(conn, p.SMFIR_ACCEPT)
                elif cmd == p.SMFIC_QUIT:
                    return
                elif cmd not in (p.SMFIC_ABORT, p.SMFIC_QUIT_NC):
                    p.send_packet(conn, p.SMFIR_CONTINUE)

    def by_step(self) -> dict[str, dict[str, str]]:
        """Each step's macros (names and values; the first packet of each step)."""
        out: dict[str, dict[str, str]] = {}
        for step, macros in self.records:
            out.setdefault(step, macros)
        return out


MESSAGE = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: macros\r\n"
           b"Message-ID: <macros@example.test>\r\n\r\nhello\r\n")


def record(name: str, send: Any, symlist: bool, configure: Any) -> dict[str, dict[str, str]]:
    milter = RecordingMilter(dict(CORE_MACROS) if symlist else None)
    try:
        configure(milter.address)
        result = send()
        assert result.ok, result
        seen = milter.by_step()
    finally:
        milter.close()
    report = os.environ.get("MILTERMONKEY_MACRO_REPORT")
    if report:
        path = Path(report)
        old = json.loads(path.read_text()) if path.exists() else {}
        old[name] = seen
        path.write_text(json.dumps(old, indent=1, sort_keys=True))
    return seen


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postfix]:
    require_or_skip(Postfix)
    base = tmp_path_factory.mktemp("pf-macros")
    sink = SmtpSink(base / "sink", free_port())
    pf = Postfix(base / "pf", free_port(), sink.port)
    sink.start()
    try:
        pf.start()
        try:
            yield pf
        finally:
            pf.stop()
    finally:
        sink.stop()


POSTFIX_DEFAULTS = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v _",
    "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                          "{mail_mailer}",
    "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "milter_data_macros": "i",
    "milter_end_of_header_macros": "i",
    "milter_end_of_data_macros": "i",
}


@pytest.mark.parametrize("symlist", [False, True], ids=["lists", "setsymlist"])
@pytest.mark.parametrize("lists", ["defaults", "recommended"])
def test_postfix_macros(postfix: Postfix, symlist: bool, lists: str) -> None:
    params = dict(POSTFIX_DEFAULTS)
    if lists == "recommended":
        params.update(POSTFIX_RECOMMENDED)

    def configure(address: tuple[str, int]) -> None:
        postfix.set_milters(f"inet:{address[0]}:{address[1]}", milter_protocol="6", **params)

    seen = record(f"postfix {lists} {'setsymlist' if symlist else 'lists'}",
                  lambda: send_mail(postfix.smtp_port, MESSAGE, "a@example.test",
                                    ["b@example.test"]),
                  symlist, configure)
    # Postfix opens the queue file after the first recipient is accepted
    # (smtpd_delay_open_until_valid_rcpt): no queue id with MAIL or that RCPT,
    # then the same one with every later step, headers and body chunks included
    assert "i" not in seen["mail"] and "i" not in seen["rcpt"]
    queue_id = seen["data"]["i"]
    for step in ("header", "eoh", "body", "eom"):
        assert seen[step] == {"i": queue_id}, step
    assert seen["connect"]["v"].startswith("Postfix")
    assert seen["helo"] == {}  # the TLS macros, on a session without TLS
    if symlist:
        # Postfix takes the milter's lists instead of main.cf's
        assert set(seen["connect"]) <= set(CORE_MACROS["connect"])
        assert {"{client_addr}", "{client_name}", "{daemon_addr}", "{daemon_port}"} <= set(
            seen["connect"])
        assert "{if_addr}" not in seen["connect"]  # a Sendmail macro Postfix does not know
    else:
        assert set(seen["connect"]) == set(params["milter_connect_macros"].split())


# --------------------------------------------------------------------------
# Sendmail
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sendmail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sendmail]:
    require_or_skip(Sendmail)
    base = tmp_path_factory.mktemp("sm-macros")
    sink = SmtpSink(base / "sink", free_port())
    sm = Sendmail(base / "sm", free_port(), sink.port)
    sink.start()
    try:
        sm.start()
        try:
            yield sm
        finally:
            sm.stop()
    finally:
        sink.stop()


@pytest.mark.parametrize("symlist", [False, True], ids=["lists", "setsymlist"])
@pytest.mark.parametrize("lists", ["defaults", "recommended"])
def test_sendmail_macros(sendmail: Sendmail, symlist: bool, lists: str) -> None:
    macros = SENDMAIL_RECOMMENDED if lists == "recommended" else None

    def configure(address: tuple[str, int]) -> None:
        sendmail.set_milters([SendmailMilter.at("recorder", address)], macros)

    seen = record(f"sendmail {lists} {'setsymlist' if symlist else 'lists'}",
                  lambda: send_mail(sendmail.smtp_port, MESSAGE, "a@example.test",
                                    ["b@example.test"]),
                  symlist, configure)
    queue_id = seen["mail"]["i"]
    assert queue_id
    assert "{if_addr}" not in seen["connect"]  # never defined on loopback
    assert "header" not in seen and "body" not in seen  # unlike Postfix
    if symlist:
        # Sendmail 8.14+ takes the milter's lists instead of sendmail.mc's,
        # {daemon_addr}, {daemon_port} and {client_name} by those names
        assert {"v", "{client_addr}", "{client_name}", "{daemon_addr}", "{daemon_port}"} <= set(
            seen["connect"])
        assert set(seen["connect"]) <= set(CORE_MACROS["connect"])
        for step in ("rcpt", "data", "eoh", "eom"):
            assert seen[step]["i"] == queue_id, step
    elif lists == "defaults":
        # Sendmail's own lists: the queue id with MAIL only, nothing at DATA or EOH
        assert set(seen["connect"]) == {"j", "_", "{daemon_name}", "{if_name}"}
        assert "i" not in seen["rcpt"] and "i" not in seen["eom"]
        assert "data" not in seen and "eoh" not in seen
    else:
        assert set(seen["connect"]) == set(SENDMAIL_RECOMMENDED["connect"])
        assert seen["eom"]["i"] == queue_id
