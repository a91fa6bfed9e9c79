"""End to end: an SMTP client -> a real Postfix -> the MilterMonkey daemon -> clamd.

One private Postfix serves every mode: ``smtpd_milter_maps`` (Postfix >= 3.2)
picks the milter by the client's address, so the relay-mode daemon answers
clients from 127.0.0.1, the notify-mode daemon 127.0.0.2 and the quarantine
daemon 127.0.0.3.  That saves a two-second ``postfix reload`` per mode.

In notify mode the sender notice goes back into this same Postfix by SMTP
(the daemon's ``notify_smtp``), passes the relay daemon (it is clean), and
must arrive at the sink like any other mail.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import attrs
import pytest
from av_helpers import smtp_data, tcp, unix
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.postfix import Postfix
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SinkMessage, SmtpSink, parse_dump

pytestmark = [pytest.mark.e2e, pytest.mark.engines]

RELAY_CLIENT, NOTIFY_CLIENT, QUARANTINE_CLIENT = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@attrs.define
class Stack:
    postfix: Postfix
    sink: SmtpSink
    monkeys: dict[str, MonkeyProcess]

    def send(self, raw: bytes, client: str = RELAY_CLIENT, sender: str = "alice@example.org",
             rcpts: tuple[str, ...] = ("bob@example.net",)) -> tuple[int, str]:
        """Send from ``client`` (a loopback source address); return the final reply."""
        payload = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return smtp_data(self.postfix, payload, client=client, sender=sender, rcpts=rcpts)

    def delivered(self, count: int) -> list[SinkMessage]:
        return [parse_dump(p) for p in self.sink.wait_for(count, timeout=30)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, clamd: Clamd) -> Iterator[Stack]:
    require_or_skip(Postfix)
    require_or_skip(SmtpSink)
    base = tmp_path_factory.mktemp("e2e")
    sink = SmtpSink(base / "sink", free_port())
    smtp_port = free_port()
    brains: dict[str, dict[str, Any]] = {
        "relay": {"use": "av", "clamd": [unix(clamd)]},
        "notify": {"use": "av", "clamd": [tcp(clamd)], "relay_mode": False,
                   "notify_sender": True, "who": "Example Mail", "domainname": "example.org",
                   "helpaddr": "help@example.org"},
        "quarantine": {"use": "av", "clamd": [unix(clamd)], "infected_action": "quarantine"},
    }
    daemon = {"hostname": "mx.example.org", "notify_smtp": f"127.0.0.1:{smtp_port}"}
    monkeys = {name: MonkeyProcess(base / name, [b], daemon, name=name)
               for name, b in brains.items()}
    cidr = base / "milters.cidr"
    cidr.write_text(f"{NOTIFY_CLIENT}/32 {monkeys['notify'].postfix_spec}\n"
                    f"{QUARANTINE_CLIENT}/32 {monkeys['quarantine'].postfix_spec}\n")
    postfix = Postfix(base / "postfix", smtp_port, sink.port,
                      milters=monkeys["relay"].postfix_spec,
                      extra={"smtpd_milter_maps": f"cidr:{cidr}"})
    try:
        sink.start()
        for m in monkeys.values():
            m.start()
        postfix.start()
        yield Stack(postfix, sink, monkeys)
    finally:
        postfix.stop()
        for m in monkeys.values():
            m.stop()
        sink.stop()


@pytest.fixture
def fresh(stack: Stack) -> Stack:
    stack.sink.clear()
    return stack


def test_relay_mode_client_sees_5xx(fresh: Stack) -> None:
    for name in ("eicar-zip", "alpha-nested", "qp-text"):
        s = av_samples.sample(name)
        code, text = fresh.send(s.raw)
        assert code == 550, (name, text)
        assert text == f"5.7.1 Virus found: {s.expect}"
    assert fresh.postfix.queue_empty()
    assert "milter-reject: END-OF-MESSAGE" in fresh.postfix.maillog()


def test_clean_mail_is_delivered_tagged(fresh: Stack) -> None:
    s = av_samples.sample("clean-multipart")
    code, text = fresh.send(s.raw)
    assert code == 250, text
    [msg] = fresh.delivered(1)
    assert msg.header_values("X-Virus-Status") == ["Clean"]
    assert (msg.header("X-Virus-Scanned") or "").startswith("MilterMonkey-AV ")
    # smtp-sink stores LF line ends; compare decoded parts of the same line convention
    original = email.message_from_bytes(s.raw.replace(b"\r\n", b"\n"),
                                        policy=email.policy.default)
    delivered = email.message_from_bytes(msg.message, policy=email.policy.default)
    assert [p.get_content() for p in delivered.walk() if not p.is_multipart()] == \
        [p.get_content() for p in original.walk() if not p.is_multipart()]


def test_notify_mode_recipient_and_sender_notices_arrive(fresh: Stack) -> None:
    s = av_samples.sample("alpha-zip")
    code, text = fresh.send(s.raw, client=NOTIFY_CLIENT)
    assert code == 250, text  # accepted: the recipient gets a notice instead
    msgs = fresh.delivered(2)
    by_rcpt = {m.recipients: m for m in msgs}
    recipient_copy = by_rcpt[("bob@example.net",)]
    sender_notice = by_rcpt[("alice@example.org",)]

    r = email.message_from_bytes(recipient_copy.message, policy=email.policy.default)
    assert isinstance(r, EmailMessage)
    assert r["Subject"] == "[virus removed] alpha zipped"
    assert r.get_content_type() == "text/plain"
    assert av_samples.NAME_ALPHA in r.get_content()
    assert av_samples.ALPHA not in recipient_copy.message
    assert r.get_all("X-Virus-Status") == [f"Infected ({av_samples.NAME_ALPHA})"]

    assert sender_notice.sender == ""  # the null sender: it can never bounce back
    n = email.message_from_bytes(sender_notice.message, policy=email.policy.default)
    assert isinstance(n, EmailMessage)
    assert n["From"] == "Example Mail <help@example.org>"
    assert n["Subject"] == "Virus found in your message: alpha zipped"
    assert av_samples.NAME_ALPHA in n.get_content()
    # it went through the relay daemon on its way out, and was clean
    assert n.get_all("X-Virus-Status") == ["Clean"]


def test_notify_mode_forging_worm_is_discarded_silently(fresh: Stack) -> None:
    code, text = fresh.send(av_samples.sample("worm-mydoom").raw, client=NOTIFY_CLIENT,
                            sender="postmaster@victim.example")
    assert code == 250, text  # the client cannot tell...
    marker = fresh.send(av_samples.sample("clean-plain").raw, client=NOTIFY_CLIENT)
    assert marker[0] == 250
    [msg] = fresh.delivered(1)  # ...but only the clean message arrives, and no notice
    assert msg.header("Subject") == "hello"
    fresh.postfix.wait_queue_empty()
    assert fresh.sink.messages() == [msg.path]
    assert "milter-discard" in fresh.postfix.maillog()


def test_quarantine_goes_to_the_hold_queue(fresh: Stack) -> None:
    code, text = fresh.send(av_samples.sample("eicar-base64").raw, client=QUARANTINE_CLIENT)
    assert code == 250, text
    held = fresh.postfix.hold_queue()
    assert len(held) == 1
    assert "milter triggers HOLD action" in fresh.postfix.maillog()
    fresh.monkeys["quarantine"].wait_for_log(f"infected: {av_samples.NAME_EICAR}")
    fresh.postfix.purge_queue()


@pytest.mark.parametrize(("name", "raw"), [
    ("rfc822-20", av_samples.nested_rfc822(20)),
    ("parts-50000", av_samples.many_parts(50_000)),
    ("zip-20", av_samples.nested_zip_message(20)),
])
def test_eicar_past_the_scanners_limits_is_refused(fresh: Stack, name: str, raw: bytes) -> None:
    """Issue 13: delivered as Clean before.  Through Postfix and the daemon: 554, nothing
    delivered, and the daemon's log line carries Postfix's queue id."""
    code, text = fresh.send(raw.replace(b"Subject: ", b"Subject: " + name.encode() + b" ", 1))
    assert code == 554, (name, text)
    assert text.startswith("5.7.0 Message refused: ")
    rejected = re.findall(r"(\w+): milter-reject: END-OF-MESSAGE [^\n]*5\.7\.0 Message refused",
                          fresh.postfix.maillog())
    assert rejected, fresh.postfix.maillog()[-2000:]
    needle = f"{rejected[-1]}: not scanned to the end"
    log = fresh.monkeys["relay"].wait_for_log(needle)
    [line] = [ln for ln in log.splitlines() if needle in ln]
    assert "limits_action reject" in line and "max_mime_" in line  # the brain's own walk
    assert fresh.postfix.queue_empty()
    assert fresh.sink.messages() == []
