"""The brain inside a real MilterMonkey daemon, driven over the milter protocol.

The daemon runs as a subprocess exactly as in production (libmilter, worker
threads, negotiation); the MTA side is the core's pure-Python client, which
applies the edits the way Postfix's cleanup server does.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from av_helpers import tcp, unix
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.testing.client import SessionResult, run_session
from miltermonkey_core.testing.daemon import MonkeyProcess
from miltermonkey_core.testing.part import require_or_skip
from miltermonkey_core.testing.process import free_port
from miltermonkey_core.testing.sink import SmtpSink, parse_dump

pytestmark = pytest.mark.engines

SENDER = "<alice@example.org>"
RCPTS = ["<bob@example.net>"]


def send(m: MonkeyProcess, samples: list[av_samples.Sample] | tuple[av_samples.Sample, ...],
         sender: str = SENDER) -> list[SessionResult]:
    """Every sample as one message of one milter session."""
    return run_session(m.address, [(s.raw, sender, RCPTS) for s in samples])


@pytest.fixture(scope="module")
def notice_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    require_or_skip(SmtpSink)
    sink = SmtpSink(tmp_path_factory.mktemp("notice-sink"), free_port())
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory, clamd: Clamd,
            notice_sink: SmtpSink) -> Iterator[dict[str, MonkeyProcess]]:
    """One daemon per mode, started once for the module."""
    base = tmp_path_factory.mktemp("monkeys")
    common = {"notify_smtp": f"127.0.0.1:{notice_sink.port}", "hostname": "mx.example.org"}
    configs: dict[str, dict[str, Any]] = {
        "relay": {"use": "av", "clamd": [unix(clamd), tcp(clamd)]},
        "notify": {"use": "av", "clamd": [tcp(clamd)], "relay_mode": False,
                   "notify_sender": True, "who": "Example Mail", "domainname": "example.org",
                   "helpaddr": "help@example.org"},
        "quarantine": {"use": "av", "clamd": [unix(clamd)], "infected_action": "quarantine"},
    }
    started: dict[str, MonkeyProcess] = {}
    try:
        for name, brain in configs.items():
            started[name] = MonkeyProcess(base / name, [brain], common, name=name).start()
        yield started
    finally:
        for m in started.values():
            m.stop()


def test_relay_mode_over_the_protocol(daemons: dict[str, MonkeyProcess]) -> None:
    m = daemons["relay"]
    results = send(m, av_samples.SAMPLES)
    for s, r in zip(av_samples.SAMPLES, results, strict=True):
        if s.expect is None:
            assert r.accepted, s.name
            assert r.applied is not None
            assert r.applied.header_values("X-Virus-Status") == ["Clean"]
            assert r.applied.body == r.body  # untouched
        else:
            assert r.rejected, s.name
            assert r.reply is not None
            assert (r.reply.code, r.reply.enhanced_code) == (550, "5.7.1")
            assert r.reply.text == f"Virus found: {s.expect}"
    # relay mode never asks the MTA for the right to change bodies
    assert "SMFIF_CHGBODY" not in results[0].negotiated.action_names
    assert m.alive()


def test_notify_mode_over_the_protocol(daemons: dict[str, MonkeyProcess],
                                       notice_sink: SmtpSink) -> None:
    notice_sink.clear()
    m = daemons["notify"]
    samples = [av_samples.sample(n) for n in ("alpha-zip", "clean-plain", "worm-mydoom")]
    infected, clean, worm = send(m, samples)
    assert "SMFIF_CHGBODY" in infected.negotiated.action_names
    # infected: delivered as a notice
    assert infected.accepted and infected.applied is not None
    msg = email.message_from_bytes(infected.applied.as_bytes(), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg.get_content_type() == "text/plain"
    assert msg["Subject"] == "[virus removed] alpha zipped"
    assert msg.get_all("X-Virus-Status") == [f"Infected ({av_samples.NAME_ALPHA})"]
    assert av_samples.NAME_ALPHA in msg.get_content()
    assert av_samples.ALPHA not in infected.applied.as_bytes()
    # clean: untouched
    assert clean.accepted and clean.applied is not None
    assert clean.applied.body == clean.body
    # the mass-mailer: discarded, no notice
    assert worm.discarded
    # exactly one sender notice, for the alpha message, sent by SMTP from <>
    [path] = notice_sink.wait_for(1, timeout=10)
    notice = parse_dump(path)
    assert notice.sender == ""
    assert notice.recipients == ("alice@example.org",)
    assert notice.header("Subject") == "Virus found in your message: alpha zipped"
    assert notice.header("Auto-Submitted") == "auto-replied"
    assert av_samples.NAME_ALPHA.encode() in notice.body
    m.wait_for_log("sender notice sent to alice@example.org")
    assert len(notice_sink.messages()) == 1


def test_quarantine_over_the_protocol(daemons: dict[str, MonkeyProcess]) -> None:
    infected, clean = send(daemons["quarantine"], [av_samples.sample("eicar-base64"),
                                                   av_samples.sample("clean-zip")])
    assert infected.accepted and infected.eom is not None
    assert infected.eom.quarantine_reason == f"virus {av_samples.NAME_EICAR}"
    assert "SMFIF_QUARANTINE" in infected.negotiated.action_names
    assert clean.eom is not None and clean.eom.quarantine_reason is None


def test_clamd_stopped_mid_run_tempfails(tmp_path: Path,
                                         make_clamd: Callable[..., Clamd]) -> None:
    c = make_clamd()
    with MonkeyProcess(tmp_path / "m", [{"use": "av", "clamd": [tcp(c)],
                                         "connect_timeout": 1}]) as m:
        eicar = av_samples.sample("eicar-zip")
        [before] = send(m, [eicar])
        assert before.rejected
        c.stop()
        results = send(m, [eicar, av_samples.sample("clean-plain")])
        for r in results:
            assert r.tempfailed
            assert r.reply is not None and r.reply.code == 451
        assert m.alive()
        m.wait_for_log("EngineUnavailable")


def test_failover_over_the_protocol(tmp_path: Path, make_clamd: Callable[..., Clamd]) -> None:
    c1, c2 = make_clamd(), make_clamd()
    with MonkeyProcess(tmp_path / "m", [{"use": "av", "clamd": [tcp(c1), unix(c2)]}],
                       unix=True) as m:
        c1.kill()
        results = send(m, av_samples.SAMPLES)
        for s, r in zip(av_samples.SAMPLES, results, strict=True):
            assert r.rejected == (s.expect is not None), s.name
        log = m.wait_for_log("skipping clamd")
        assert log.count("skipping clamd") == 1


def test_oversize_tag_over_the_protocol(tmp_path: Path, clamd: Clamd) -> None:
    with MonkeyProcess(tmp_path / "m", [{"use": "av", "clamd": [unix(clamd)],
                                         "max_scan_size": "4k"}]) as m:
        [big, small] = send(m, [av_samples.sample("clean-multipart"),
                                av_samples.sample("eicar-body")])
        assert big.applied is not None
        assert big.applied.header_values("X-Virus-Status") == ["Unscanned (too large)"]
        assert small.rejected
