"""End to end: real SMTP into a real Sendmail, through the monkey, out to smtp-sink.

The counterpart of ``test_e2e_postfix.py`` on the MTA the milter protocol was
written for.  One private Sendmail and one sink serve the module; each test
points Sendmail at the daemons it starts (:meth:`SendmailStack.use` restarts
Sendmail, about 0.2 s).  Expected header orders are the ones Postfix
delivers: added headers after the message's own, in config order.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from miltermonkey_core.milterkey import generate_secret_file
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sendmail import Sendmail, SendmailMilter, queue_id_from_reply
from miltermonkey_core.testing.sink import SinkMessage, SmtpSink, parse_dump
from miltermonkey_core.testing.smtp import SmtpResult, send_mail

pytestmark = pytest.mark.e2e

Monkeys = Callable[..., MonkeyProcess]

@attrs.define
class SendmailStack:
    """The module's Sendmail and sink, and what the tests do with them."""

    sendmail: Sendmail
    sink: SmtpSink

    def use(self, *monkeys: MonkeyProcess, flags: str = "T") -> None:
        """Put *monkeys* in front of Sendmail, in this order, for the next SMTP sessions."""
        self.sendmail.set_milters([SendmailMilter.at(m.name, m.address, flags) for m in monkeys])

    def send(self, raw: bytes, sender: str = "sender@example.test",
             recipients: Sequence[str] = ("rcpt@example.test",)) -> SmtpResult:
        return send_mail(self.sendmail.smtp_port, raw, sender, list(recipients))

    def deliver(self, raw: bytes, subject: str) -> SinkMessage:
        """Send *raw* and return it as the sink received it."""
        res = self.send(raw)
        assert res.ok, f"{res}\n{self.sendmail.maillog()[-3000:]}"
        dump = self.sink.wait_for_text(f"Subject: {subject}".encode(), timeout=30)
        return parse_dump(dump)


@pytest.fixture(scope="module")
def sendmail_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SendmailStack]:
    require_or_skip(Sendmail)
    require_or_skip(SmtpSink)
    base = tmp_path_factory.mktemp("sendmail")
    sink = SmtpSink(base / "sink", free_port())
    sendmail = Sendmail(base / "sendmail", free_port(), sink.port)
    sink.start()
    try:
        sendmail.start()
        try:
            yield SendmailStack(sendmail, sink)
        finally:
            sendmail.stop()
    finally:
        sink.stop()


@pytest.fixture
def sm(sendmail_stack: SendmailStack) -> SendmailStack:
    """The module's stack with an empty sink, so counting deliveries means something.

    The queue must be empty first: a message still on its way to the sink
    would arrive in the next test, and one left queued by a restart would
    come back half a minute later.
    """
    sendmail_stack.sendmail.wait_queue_empty(30)
    sendmail_stack.sink.clear()
    return sendmail_stack


def message(subject: str, body: str = "hello\r\n", extra: str = "") -> bytes:
    """A complete message: Sendmail adds no Date or Message-Id to it."""
    return (f"From: a@example.com\r\nTo: b@example.com\r\n{extra}Subject: {subject}\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.com>\r\n"
            f"\r\n{body}").encode()


def own_headers(raw: bytes) -> list[tuple[str, str]]:
    return [(name, value.strip()) for name, _, value in
            (line.partition(":") for line in raw.split(b"\r\n\r\n")[0].decode().split("\r\n"))]


def after_trace(delivered: SinkMessage) -> list[tuple[str, str]]:
    """The delivered header without Sendmail's Received line."""
    return [(k, v) for k, v in delivered.headers() if k != "Received"]


# --------------------------------------------------------------------------
# delivery, both socket kinds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_trivial_header_delivered_through_sendmail(
    sm: SendmailStack, monkey_daemon: Monkeys, unix: bool
) -> None:
    m = monkey_daemon([{"use": "trivial"}], {"hostname": "mm.example"}, unix=unix)
    sm.use(m)
    subject = f"trivial-{'unix' if unix else 'tcp'}"
    res = sm.send(message(subject))
    assert res.ok, res
    qid = queue_id_from_reply(res.text)
    assert qid is not None, res
    got = parse_dump(sm.sink.wait_for_text(f"Subject: {subject}".encode(), timeout=30))
    assert got.header_values("X-MilterMonkey") == ["trivial on mm.example"]
    [received] = got.header_values("Received")
    assert "by sendmail.milter.test" in received and f"id {qid}" in received
    sm.sendmail.wait_for_log(
        rf"{qid}: Milter \({m.name}\) (?:add|insert \(\d+\)): header: "
        r"X-MilterMonkey: trivial on mm\.example")


def test_filter_and_macro_settings_reach_sendmail(
    sm: SendmailStack, monkey_daemon: Monkeys
) -> None:
    m = monkey_daemon([{"use": "trivial", "header_value": "configured"}], unix=True)
    timeouts = {"C": "2s", "S": "5s", "R": "7s", "E": "1m"}
    macros = {"connect": ["j", "{daemon_name}"], "eom": ["i", "{msg_id}"]}
    sm.sendmail.set_milters([SendmailMilter.at("configured", m.address, "T", timeouts)], macros)
    options = sm.sendmail.cf_options()
    assert options["InputMailFilters"] == "configured"
    assert options["Milter.macros.connect"] == "j, {daemon_name}"
    assert options["Milter.macros.eom"] == "i, {msg_id}"
    assert options["Milter.macros.envfrom"].startswith("i, ")  # a stage not given: default
    filters = [ln for ln in sm.sendmail.cf_path.read_text().splitlines() if ln.startswith("X")]
    assert filters == [f"Xconfigured, S=unix:{m.address}, F=T, T=C:2s;S:5s;R:7s;E:1m"]
    got = sm.deliver(message("configured"), "configured")
    assert got.header_values("X-MilterMonkey") == ["configured"]


# --------------------------------------------------------------------------
# header order
# --------------------------------------------------------------------------

ORDER_CASES = [
    pytest.param(("X-Order", "X-Order"), "", id="same-name"),
    pytest.param(("X-Order", "X-Order"), "X-Order: original\r\n", id="same-name-present"),
    pytest.param(("X-First", "X-Second"), "", id="different-names"),
    pytest.param(("X-First", "X-Second"), "X-Second: original\r\n",
                 id="different-names-present"),
]


@pytest.mark.parametrize(("names", "present"), ORDER_CASES)
def test_headers_added_in_config_order(
    sm: SendmailStack, monkey_daemon: Monkeys, names: tuple[str, str], present: str
) -> None:
    brains = [{"use": "trivial", "name": brain, "header_name": header, "header_value": brain}
              for brain, header in zip(("first", "second"), names, strict=True)]
    sm.use(monkey_daemon(brains, unix=True))
    subject = f"order-{'-'.join(names)}-{bool(present)}"
    raw = message(subject, extra=present)
    got = sm.deliver(raw, subject)
    assert after_trace(got) == [*own_headers(raw), (names[0], "first"), (names[1], "second")]


@pytest.mark.parametrize(("names", "present"), ORDER_CASES)
def test_postfix_and_sendmail_deliver_the_same_header_order(
    sm: SendmailStack, postfix_stack: Any, monkey_daemon: Monkeys, names: tuple[str, str],
    present: str,
) -> None:
    """The same message through both MTAs, the same brains: the same headers, in order."""
    brains = [{"use": "trivial", "name": brain, "header_name": header, "header_value": brain}
              for brain, header in zip(("first", "second"), names, strict=True)]
    m = monkey_daemon(brains, unix=True)
    sm.use(m)
    postfix_stack.use_milters(f"unix:{m.address}")
    subject = f"both-{'-'.join(names)}-{bool(present)}"
    raw = message(subject, extra=present)
    via_sendmail = after_trace(sm.deliver(raw, subject))
    res = postfix_stack.send(raw)
    assert res.ok, res
    via_postfix = [(k, v) for k, v in parse_dump(postfix_stack.sink.wait_for_text(
        f"Subject: {subject}".encode(), timeout=30)).headers() if k != "Received"]
    print(f"\n{subject}: delivered via Sendmail {via_sendmail}\n"
          f"{subject}: delivered via Postfix  {via_postfix}")  # shown with pytest -s
    assert via_sendmail == via_postfix
    assert via_postfix[-2:] == [(names[0], "first"), (names[1], "second")]


# --------------------------------------------------------------------------
# verdicts the SMTP client sees
# --------------------------------------------------------------------------


def test_reject_at_rcpt_and_at_end_of_message(sm: SendmailStack, monkey_daemon: Monkeys) -> None:
    sm.use(monkey_daemon([{"use": "gate"}], unix=True))
    res = sm.send(message("gate-rcpt"), recipients=["refused@example.com"])
    assert (res.code, res.stage) == (550, "rcpt"), res
    assert "5.1.1" in res.text and "refused by gate" in res.text
    mark = sm.sendmail.log_mark()
    res = sm.send(message("gate-eom", "REJECT-ME please\r\n"))
    assert (res.code, res.stage) == (550, "data"), res
    assert res.text == "5.7.1 gate: body matched"
    sm.sendmail.wait_for_log(r"Milter: data, reject=550 5\.7\.1 gate: body matched", since=mark)
    assert sm.send(message("gate-pass")).ok
    assert [parse_dump(p).header("Subject") for p in sm.sink.wait_for(1)] == ["gate-pass"]


def test_tempfail_from_a_brain(sm: SendmailStack, monkey_daemon: Monkeys) -> None:
    pytest.importorskip("miltermonkey_spam")
    brains = [{"use": "spam", "servers": [f"127.0.0.1:{free_port()}"],
               "on_engine_error": "tempfail"}]
    sm.use(monkey_daemon(brains, unix=True))
    res = sm.send(message("spamd-down"))
    assert (res.code, res.stage) == (451, "data"), res
    assert res.text == "4.7.1 Spam filter temporarily unavailable, try again later"


@pytest.mark.parametrize(("flags", "code", "stage"),
                         [("T", 451, "mail"), ("R", 554, "connect"), ("", 250, None)],
                         ids=["F=T", "F=R", "no-flags"])
def test_unreachable_milter_follows_the_filter_flags(
    sm: SendmailStack, tmp_path: Path, flags: str, code: int, stage: str | None
) -> None:
    sm.sendmail.set_milters([SendmailMilter.at("gone", str(tmp_path / "nobody.sock"), flags)])
    res = sm.send(message(f"unreachable-{flags or 'none'}"))
    assert (res.code, res.stage) == (code, stage), res
    if not flags:  # skipped: delivered as it came
        got = parse_dump(sm.sink.wait_for_text(b"Subject: unreachable-none", timeout=30))
        assert after_trace(got) == own_headers(message("unreachable-none"))


@pytest.mark.parametrize(("on_error", "refused"), [("tempfail", True), ("accept", False)])
def test_brain_that_raises_follows_its_on_error_policy(
    sm: SendmailStack, monkey_daemon: Monkeys, on_error: str, refused: bool
) -> None:
    brains = [{"use": "fault", "when_subject": "explode", "on_error": on_error},
              {"use": "trivial", "header_name": "X-After", "header_value": "ran"}]
    m = monkey_daemon(brains, unix=True)
    sm.use(m)
    mark = sm.sendmail.log_mark()
    res = sm.send(message(f"please-explode-{on_error}"))
    failed = m.wait_for_log("brain fault failed")
    line = next(ln for ln in failed.splitlines() if "brain fault failed" in ln)
    assert "RuntimeError" in line and f"policy {on_error}" in line
    if refused:
        assert (res.code, res.stage) == (451, "data") and res.text.startswith("4.3.0"), res
        # the daemon's line carries the queue id Sendmail gave the refused message
        qid = sm.sendmail.wait_for_log(r"(\w+): Milter: data, reject=451 4\.3\.0",
                                       since=mark).group(1)
        assert f"{qid}: brain fault failed" in line, line
    else:
        assert res.ok, res
        got = parse_dump(sm.sink.wait_for_text(b"please-explode-accept", timeout=30))
        assert got.header_values("X-After") == ["ran"]
        assert got.header_values("X-Fault") == []  # its half-done edit was dropped
    # the daemon keeps serving, and the next message is untouched by the fault
    calm = sm.deliver(message(f"calm-{on_error}"), f"calm-{on_error}")
    assert calm.header_values("X-After") == ["ran"]
    assert calm.header_values("X-Fault") == ["passed"]
    assert m.alive()


# --------------------------------------------------------------------------
# the real brains on their engines
# --------------------------------------------------------------------------


@pytest.mark.engines
def test_av_refuses_eicar_and_tags_clean_mail(
    sm: SendmailStack, monkey_daemon: Monkeys, clamd_server: Any
) -> None:
    av = pytest.importorskip("miltermonkey_av.testing")
    brains = [{"use": "av", "clamd": [f"tcp:127.0.0.1:{clamd_server.tcp_address[1]}"]}]
    sm.use(monkey_daemon(brains, unix=True))
    eicar = av.sample("eicar-base64")
    res = sm.send(eicar.raw)
    assert (res.code, res.stage) == (550, "data"), res
    assert res.text == f"5.7.1 Virus found: {eicar.expect}"
    clean = sm.deliver(message("av-clean"), "av-clean")
    assert clean.header_values("X-Virus-Status") == ["Clean"]
    assert [parse_dump(p).header("Subject") for p in sm.sink.messages()] == ["av-clean"]


@pytest.mark.engines
def test_spam_flags_gtube(sm: SendmailStack, monkey_daemon: Monkeys, spamd_server: Any) -> None:
    samples = pytest.importorskip("miltermonkey_spam.testing")
    host, port = spamd_server.address
    sm.use(monkey_daemon([{"use": "spam", "servers": [f"{host}:{port}"]}], unix=True))
    got = sm.deliver(samples.spam("spam-gtube"), "spam-gtube")
    assert got.header_values("X-Spam-Flag") == ["YES"]
    [status] = got.header_values("X-Spam-Status")
    assert " ".join(status.split()).startswith("Yes, score=") and "GTUBE" in status


@pytest.mark.engines
def test_milter_key_across_two_sendmail_hops(
    sm: SendmailStack, monkey_daemon: Monkeys, clamd_server: Any, tmp_path: Path
) -> None:
    """Hop 1 scans and signs; hop 2 trusts the key and skips av, whose clamd is down."""
    pytest.importorskip("miltermonkey_av")
    secret = tmp_path / "miltersecret"
    generate_secret_file(secret, "site1")
    key = {"milter_key": True, "miltersecretfile": str(secret)}
    clamd = f"tcp:127.0.0.1:{clamd_server.tcp_address[1]}"
    relay = monkey_daemon([{"use": "av", "clamd": [clamd], "skip_if_key": False}],
                          {**key, "hostname": "relay.example"}, unix=True, name="relay")
    dead_clamd = f"tcp:127.0.0.1:{free_port()}"  # av at the MX would tempfail here
    mx = monkey_daemon([{"use": "av", "clamd": [dead_clamd], "skip_if_key": True},
                        {"use": "trivial", "header_name": "X-Hop", "header_value": "mx"}],
                       {**key, "hostname": "mx.example"}, unix=True, name="mx")

    sm.use(relay)
    first = sm.deliver(message("two-hops"), "two-hops")
    assert first.header_values("X-Virus-Status") == ["Clean"]
    [relay_key] = first.header_values("X-Milter-Key")
    assert "host=relay.example" in relay_key

    sm.use(mx)
    sm.sink.clear()
    second = sm.deliver(first.message, "two-hops")
    log = mx.wait_for_log("trusted milter key: skipping av")
    assert "av=skipped" in log
    assert second.header_values("X-Hop") == ["mx"]
    assert len(second.header_values("Received")) == 2  # it went through Sendmail twice
    [mx_key] = second.header_values("X-Milter-Key")
    assert "host=mx.example" in mx_key and "av:continue" in "".join(mx_key.split())


# --------------------------------------------------------------------------
# one SMTP session, several messages
# --------------------------------------------------------------------------


def test_several_messages_in_one_session_with_rset(
    sm: SendmailStack, monkey_daemon: Monkeys
) -> None:
    m = monkey_daemon([{"use": "gate"}, {"use": "trivial", "header_value": "once"}], unix=True)
    sm.use(m)
    replies: list[int] = []
    with smtplib.SMTP("127.0.0.1", sm.sendmail.smtp_port, local_hostname="client.test",
                      timeout=60) as client:
        client.ehlo()

        def transaction(subject: str, rcpt: str = "rcpt@example.test",
                        body: str = "hello\r\n") -> None:
            client.mail("sender@example.test")
            code, _ = client.rcpt(rcpt)
            if code == 250:
                try:
                    code, _ = client.data(message(subject, body))
                except smtplib.SMTPDataError as exc:
                    code = exc.smtp_code
            replies.append(code)
            client.rset()

        transaction("session-1")
        client.mail("sender@example.test")  # a transaction abandoned before DATA
        client.rcpt("rcpt@example.test")
        client.rset()
        transaction("session-2", body="REJECT-ME\r\n")
        transaction("session-3", rcpt="refused@example.test")
        transaction("session-4")
        transaction("session-5")
    assert replies == [250, 550, 550, 250, 250]
    got = [parse_dump(p) for p in sm.sink.wait_for(3, timeout=30)]
    assert sorted(g.header("Subject") or "" for g in got) == ["session-1", "session-4",
                                                             "session-5"]
    for g in got:
        assert g.header_values("X-MilterMonkey") == ["once"], g.headers()
    assert len(sm.sink.messages()) == 3


# --------------------------------------------------------------------------
# the daemon's log names Sendmail's queue id
# --------------------------------------------------------------------------


@pytest.mark.parametrize("brain", [
    pytest.param({"use": "trivial"}, id="trivial"),
    pytest.param({"use": "stamp"}, id="envelope-brain"),
])
def test_queue_id_in_the_per_message_log_line(
    sm: SendmailStack, monkey_daemon: Monkeys, brain: dict[str, Any]
) -> None:
    m = monkey_daemon([brain], unix=True)
    sm.use(m)
    res = sm.send(message(f"qid-{brain['use']}"))
    qid = queue_id_from_reply(res.text)
    assert res.ok and qid is not None, res
    sm.sink.wait_for(1)
    log = m.wait_for_log(": accept in ")
    assert f"{qid}: accept in " in log, log
