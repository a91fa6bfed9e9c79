"""The brain's decisions, through the core's in-process engine and a real clamd."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
from av_helpers import RECIPIENTS, RecordingMonkey, SmallStreamClamd, make_brain, run, tcp
from miltermonkey_av import __version__
from miltermonkey_av.brain import AntiVirusBrain, needs_for
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.result import ScanResult, Status
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.edits import Capability
from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.offline import OfflineResult
from miltermonkey_core.testing.process import free_port

pytestmark = pytest.mark.engines

Factory = Callable[..., AntiVirusBrain]
NOTIFYING = tuple(s for s in av_samples.INFECTED if s.expect != av_samples.NAME_WORM)


def parsed(result: OfflineResult) -> EmailMessage:
    msg = email.message_from_bytes(result.message_bytes, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def monkey_of(brain: AntiVirusBrain) -> RecordingMonkey:
    assert isinstance(brain.monkey, RecordingMonkey)
    return brain.monkey


# --- relay mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("sample", av_samples.INFECTED, ids=lambda s: s.name)
def test_relay_mode_rejects_every_infected_sample(av: Factory, sample: av_samples.Sample) -> None:
    brain = av()
    result = run(brain, sample.raw)
    assert result.action is Action.REJECT
    assert result.verdict is not None and result.verdict.reply is not None
    reply = result.verdict.reply
    assert (reply.code, reply.xcode) == (550, "5.7.1")
    assert reply.text == f"Virus found: {sample.expect}"
    assert monkey_of(brain).sent == []


@pytest.mark.parametrize("sample", av_samples.CLEAN, ids=lambda s: s.name)
@pytest.mark.parametrize("relay_mode", [True, False])
def test_clean_mail_is_untouched_but_tagged(av: Factory, sample: av_samples.Sample,
                                            relay_mode: bool) -> None:
    result = run(av(relay_mode=relay_mode), sample.raw)
    assert result.action is Action.ACCEPT
    assert result.header("X-Virus-Status") == "Clean"
    assert result.header("X-Virus-Scanned") == f"MilterMonkey-AV {__version__} on mx.example.org"
    # only our two headers were added; the body is byte for byte what came in
    assert [type(e).__name__ for e in result.ctx.edits] == ["AddHeader", "AddHeader"]
    original = email.message_from_bytes(sample.raw, policy=email.policy.default)
    assert parsed(result).get_body() is not None
    assert result.message_bytes.split(b"\r\n\r\n", 1)[1] == \
        sample.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    assert original["Subject"] == parsed(result)["Subject"]


def test_forged_virus_headers_from_outside_are_replaced(av: Factory) -> None:
    forged = (b"X-Virus-Status: Clean\r\nX-Virus-Scanned: by a friend\r\n"
              b"X-Virus-Status: Clean, trust me\r\n")
    raw = forged + av_samples.sample("eicar-zip").raw
    result = run(av(infected_action="quarantine"), raw)
    assert result.ctx.headers.get_all("X-Virus-Status") == [
        f"Infected ({av_samples.NAME_EICAR})"]
    assert result.ctx.headers.get_all("X-Virus-Scanned") == [
        f"MilterMonkey-AV {__version__} on mx.example.org"]
    clean = run(av(), forged + av_samples.sample("clean-plain").raw)
    assert clean.ctx.headers.get_all("X-Virus-Status") == ["Clean"]


def test_add_headers_off_adds_nothing_and_needs_no_edit_rights(av: Factory) -> None:
    brain = av(add_headers=False)
    assert brain.needs.actions == frozenset()
    result = run(brain, av_samples.sample("clean-plain").raw)
    assert result.ctx.edits == []


# --- notify mode --------------------------------------------------------------------------


@pytest.mark.parametrize("sample", NOTIFYING, ids=lambda s: s.name)
def test_notify_mode_replaces_every_infected_message(av: Factory,
                                                     sample: av_samples.Sample) -> None:
    brain = av(relay_mode=False, notify_sender=True, who="Example Mail",
               helpaddr="help@example.org", domainname="example.org")
    result = run(brain, sample.raw)
    assert result.action is Action.ACCEPT
    msg = parsed(result)
    assert msg.get_content_type() == "text/plain"
    assert not msg.is_multipart()
    assert msg["Subject"].startswith("[virus removed] ")
    assert msg["X-Virus-Status"] == f"Infected ({sample.expect})"
    assert msg["From"] and msg["To"]  # kept: the recipient sees which message it was
    assert msg["MIME-Version"] == "1.0"
    assert [h for h in msg if h.lower().startswith("content-")] == [
        "Content-Type", "Content-Transfer-Encoding"]
    text = msg.get_content()
    assert sample.expect in text
    assert "help@example.org" in text and "Example Mail" in text
    assert "4XyzQ1D" in text  # queue id
    # nothing of the infected content survives
    assert sample.hidden is None or sample.hidden not in result.message_bytes
    assert av_samples.EICAR not in result.message_bytes
    # and the sender was told, once
    assert len(monkey_of(brain).sent) == 1


def test_notice_body_of_8bit_latin1_subject(av: Factory) -> None:
    result = run(av(relay_mode=False), av_samples.sample("eicar-8bit-headers").raw)
    msg = parsed(result)
    assert msg["Subject"] == "[virus removed] Grüße été %s %v %%"
    assert "Grüße été" in msg.get_content()
    # the header went out encoded (RFC 2047), never as raw 8-bit
    assert (result.ctx.headers.get("Subject") or "").isascii()


def test_sender_notice(av: Factory) -> None:
    brain = av(relay_mode=False, notify_sender=True, who="Example Mail",
               helpaddr="help@example.org", domainname="example.org")
    run(brain, av_samples.sample("alpha-zip").raw, sender="<alice@example.org>")
    [(env_from, rcpts, data)] = monkey_of(brain).sent
    assert env_from == ""  # null sender: the notice can never bounce
    assert rcpts == ["alice@example.org"]
    notice = email.message_from_bytes(data, policy=email.policy.default)
    assert notice["To"] == "alice@example.org"
    assert notice["From"] == "Example Mail <help@example.org>"
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice["In-Reply-To"] == "<alpha.zipped@example.org>"
    assert notice["Subject"] == "Virus found in your message: alpha zipped"
    assert notice["Message-ID"].endswith("@mx.example.org>")
    body = notice.get_content()
    assert av_samples.NAME_ALPHA in body
    assert "bob@example.net, carol@example.net" in body
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_sender_notice_is_off_by_default(av: Factory) -> None:
    brain = av(relay_mode=False)
    result = run(brain, av_samples.sample("alpha-zip").raw)
    assert result.header("X-Virus-Status") == f"Infected ({av_samples.NAME_ALPHA})"
    assert monkey_of(brain).sent == []


@pytest.mark.parametrize(("sender", "extra"), [
    ("<>", b""),
    ("<MAILER-DAEMON@example.org>", b""),
    ("<alice@example.org>", b"Auto-Submitted: auto-generated\r\n"),
    ("<alice@example.org>", b"Precedence: bulk\r\n"),
    ("<alice@example.org>", b"List-Id: <list.example.org>\r\n"),
])
def test_no_sender_notice_to_bounces_robots_and_lists(av: Factory, sender: str,
                                                      extra: bytes) -> None:
    brain = av(relay_mode=False, notify_sender=True)
    result = run(brain, extra + av_samples.sample("alpha-zip").raw, sender=sender)
    assert result.header("X-Virus-Status") == f"Infected ({av_samples.NAME_ALPHA})"
    assert monkey_of(brain).sent == []
    assert any("no sender notice" in line for line in result.log)


def test_discard_pattern_discards_without_any_notice(av: Factory) -> None:
    brain = av(relay_mode=False, notify_sender=True)
    result = run(brain, av_samples.sample("worm-mydoom").raw)
    assert result.action is Action.DISCARD
    assert monkey_of(brain).sent == []
    assert any("discard_pattern" in line for line in result.log)


def test_custom_discard_pattern(av: Factory) -> None:
    brain = av(relay_mode=False, notify_sender=True, discard_pattern=r"\.Alpha\b")
    assert run(brain, av_samples.sample("alpha-nested").raw).action is Action.DISCARD
    worm = run(brain, av_samples.sample("worm-mydoom").raw)  # no longer matched
    assert worm.action is Action.ACCEPT
    assert monkey_of(brain).sent  # its forged sender got a notice: the admin asked for it


def test_discard_pattern_does_not_apply_in_relay_mode(av: Factory) -> None:
    assert run(av(), av_samples.sample("worm-mydoom").raw).action is Action.REJECT


def test_notify_recipients_off_drops_the_message(av: Factory) -> None:
    brain = av(relay_mode=False, notify_recipients=False, notify_sender=True)
    result = run(brain, av_samples.sample("alpha-base64").raw)
    assert result.action is Action.DISCARD
    assert len(monkey_of(brain).sent) == 1


def test_failed_sender_notice_is_logged_not_fatal(av: Factory) -> None:
    # A real Monkey sending by SMTP to a port where nobody listens.
    monkey = Monkey(hostname="mx.example.org", brain="av",
                    notify_smtp=f"127.0.0.1:{free_port()}")
    brain = make_brain(monkey, clamd=av().options.clamd, relay_mode=False, notify_sender=True)
    result = run(brain, av_samples.sample("alpha-base64").raw)
    assert result.action is Action.ACCEPT
    assert result.header("X-Virus-Status") == f"Infected ({av_samples.NAME_ALPHA})"
    assert any("sender notice to alice@example.org failed" in line for line in result.log)


# --- other actions ------------------------------------------------------------------------


def test_quarantine(av: Factory) -> None:
    brain = av(infected_action="quarantine")
    assert Capability.QUARANTINE in brain.needs.actions
    result = run(brain, av_samples.sample("eicar-base64").raw)
    assert result.action is Action.ACCEPT
    assert result.ctx.quarantine_request is not None
    assert result.ctx.quarantine_request.reason == f"virus {av_samples.NAME_EICAR}"
    assert result.header("X-Virus-Status") == f"Infected ({av_samples.NAME_EICAR})"


def test_infected_action_discard(av: Factory) -> None:
    brain = av(infected_action="discard", notify_sender=True)
    assert run(brain, av_samples.sample("qp-text").raw).action is Action.DISCARD
    assert monkey_of(brain).sent == []


def test_reject_text_is_configurable_and_sanitised(av: Factory) -> None:
    brain = av(reject_code=554, reject_xcode="5.7.0", reject_text="No thanks (%v), 100% sure")
    brain.engine.scan = lambda message: ScanResult(  # type: ignore[method-assign]
        Status.INFECTED, ("Evil\r\n250 OK\r\nBcc:%s",), "fake")
    result = run(brain, av_samples.sample("clean-plain").raw)
    assert result.verdict is not None and result.verdict.reply is not None
    reply = result.verdict.reply
    assert (reply.code, reply.xcode) == (554, "5.7.0")
    assert reply.lines == ("No thanks (Evil 250 OK Bcc:%%s), 100%% sure",)


# --- sizes --------------------------------------------------------------------------------


def test_minscansize_default_scans_tiny_viruses(av: Factory) -> None:
    tiny = b"Subject: t\r\n\r\n" + av_samples.EICAR + b"\r\n"
    assert len(tiny) < 100
    assert run(av(), tiny).action is Action.REJECT


def test_minscansize_skips_small_mail_with_a_tag(av: Factory) -> None:
    result = run(av(minscansize=50000), av_samples.sample("eicar-zip").raw)
    assert result.action is Action.ACCEPT  # the seed's 50000 let this through
    assert result.header("X-Virus-Status") == "Unscanned (smaller than minscansize 50000)"


@pytest.mark.parametrize(("policy", "action", "code"), [
    ("accept-tag", Action.ACCEPT, None),
    ("reject", Action.REJECT, 552),
    ("tempfail", Action.TEMPFAIL, 452),
])
def test_oversize_policy(av: Factory, policy: str, action: Action, code: int | None) -> None:
    result = run(av(max_scan_size="10k", oversize_action=policy),
                 av_samples.sample("clean-multipart").raw)
    assert result.action is action
    if code is None:
        assert result.header("X-Virus-Status") == "Unscanned (too large)"
    else:
        assert result.verdict is not None and result.verdict.reply is not None
        assert result.verdict.reply.code == code
    assert any("above max_scan_size 10240" in line for line in result.log)


@pytest.mark.parametrize(("policy", "action"), [
    ("accept-tag", Action.ACCEPT), ("reject", Action.REJECT), ("tempfail", Action.TEMPFAIL)])
def test_clamd_stream_limit_follows_oversize_policy(make_clamd: Callable[..., Clamd],
                                                    policy: str, action: Action) -> None:
    c = make_clamd(SmallStreamClamd)
    brain = make_brain(clamd=[tcp(c)], oversize_action=policy)
    raw = (b"Subject: big\r\n\r\n" + b"A" * 2_000_000 + av_samples.EICAR + b"\r\n")
    result = run(brain, raw)
    assert result.action is action  # never "Clean"
    assert result.header("X-Virus-Status") != "Clean"
    assert any("StreamMaxLength" in line for line in result.log)


# --- engine failures: the core's on_error (tempfail) -----------------------------------------


def test_clamd_down_tempfails() -> None:
    brain = make_brain(clamd=[f"tcp:127.0.0.1:{free_port()}"], connect_timeout=0.5)
    result = run(brain, av_samples.sample("clean-plain").raw)
    assert result.action is Action.TEMPFAIL
    assert result.verdict is not None and result.verdict.reply is not None
    assert result.verdict.reply.code == 451
    assert [r.outcome for r in result.results] == ["error"]
    assert "EngineUnavailable" in result.results[0].detail
    assert result.ctx.edits == []  # nothing half-done


def test_clamd_stopped_mid_run_then_back(make_clamd: Callable[..., Clamd]) -> None:
    c = make_clamd()
    brain = make_brain(clamd=[tcp(c)], clamd_cooldown=0.2)
    raw = av_samples.sample("eicar-zip").raw
    assert run(brain, raw).action is Action.REJECT
    port = c.tcp_port
    c.stop()
    assert run(brain, raw).action is Action.TEMPFAIL
    assert run(brain, av_samples.sample("clean-plain").raw).action is Action.TEMPFAIL
    c.tcp_port = port
    c.start()
    assert run(brain, raw).action is Action.REJECT  # probed with PING, back in use


def test_failover_to_second_clamd(make_clamd: Callable[..., Clamd]) -> None:
    c1, c2 = make_clamd(), make_clamd()
    brain = make_brain(clamd=[tcp(c1), tcp(c2)])
    c1.kill()
    for sample in av_samples.SAMPLES:
        result = run(brain, sample.raw)
        if sample.expect is None:
            assert result.header("X-Virus-Status") == "Clean"
        else:
            assert result.action is Action.REJECT
    log = run(brain, av_samples.sample("clean-plain").raw).log
    assert not any("skipping clamd" in line for line in log)  # warned once, earlier


def test_scan_error_in_chain_with_accept_policy_is_the_admins_choice(av: Factory) -> None:
    """on_error is the core's; with 'accept' the brain's failure lets mail pass (logged)."""
    from miltermonkey_core.engine.chain import BrainSlot, Chain
    from miltermonkey_core.engine.offline import run_engine
    from miltermonkey_core.engine.session import Engine

    brain = make_brain(clamd=[f"tcp:127.0.0.1:{free_port()}"], connect_timeout=0.5)
    slot = BrainSlot(name="av", use="av", brain=brain, monkey=brain.monkey, on_error="tag")
    result = run_engine(Engine(Chain([slot]), brain.monkey), av_samples.sample("clean-plain").raw)
    assert result.action is Action.ACCEPT
    assert result.header("X-MilterMonkey-Unchecked") == "av"


# --- needs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "actions", "envelope"), [
    ({}, {"add_headers", "change_headers"}, False),
    ({"add_headers": False}, set(), False),
    ({"relay_mode": False}, {"add_headers", "change_headers", "change_body"}, True),
    ({"relay_mode": False, "add_headers": False},
     {"add_headers", "change_headers", "change_body"}, True),
    ({"infected_action": "quarantine", "add_headers": False}, {"quarantine"}, False),
    ({"infected_action": "discard", "add_headers": False}, set(), False),
])
def test_needs_follow_the_options(options: dict[str, Any], actions: set[str],
                                  envelope: bool) -> None:
    needs = needs_for(AntiVirusOptions(**options))
    assert needs.actions == frozenset(actions)
    assert needs.envelope is envelope
    assert needs.headers and needs.body


def test_defaults_from_hostname() -> None:
    brain = make_brain(RecordingMonkey(hostname="mx1.mail.example.org"))
    assert brain.domainname == "mail.example.org"
    assert brain.helpaddr == "postmaster@mail.example.org"
    assert brain.who == "the mail system at mx1.mail.example.org"
    assert brain.action == "reject"


def test_recipient_notice_names_the_sender_not_the_other_recipients(av: Factory) -> None:
    result = run(av(relay_mode=False), av_samples.sample("alpha-zip").raw,
                 recipients=RECIPIENTS)
    text = parsed(result).get_content()
    assert "alice@example.org" in text
    assert "carol@example.net" not in text  # Bcc'd co-recipients stay private
