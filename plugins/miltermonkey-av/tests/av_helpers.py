"""Helpers shared by the AV brain's tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miltermonkey_av.brain import AntiVirusBrain
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.offline import OfflineResult, run_engine
from miltermonkey_core.engine.session import Engine

SIGNATURES = Path(__file__).parent / "signatures"
SENDER = "<alice@example.org>"
RECIPIENTS = ("<bob@example.net>", "<carol@example.net>")
QID = "4XyzQ1D"  # the queue id run() sends
#: Structure limits so high that only the engine decides (the walk still runs).
CLAMD_DECIDES = {"max_mime_depth": 10_000, "max_mime_parts": 1_000_000}


def signature_db() -> dict[str, str]:
    """The committed signature database, file name -> content."""
    return {p.name: p.read_text() for p in sorted(SIGNATURES.iterdir()) if p.is_file()}


class SmallStreamClamd(Clamd):
    """A clamd whose StreamMaxLength is 1 MiB, to provoke 'size limit exceeded'."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text()
        assert "StreamMaxLength 25M" in text
        self.config_path.write_text(text.replace("StreamMaxLength 25M", "StreamMaxLength 1M"))


class RecordingMonkey(Monkey):
    """A monkey whose notices are recorded instead of sent."""

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("hostname", "mx.example.org")
        kw.setdefault("brain", "av")
        kw.setdefault("debug_level", 60)
        super().__init__(**kw)
        self.sent: list[tuple[str, list[str], bytes]] = []
        self.sendmail_paths: list[str | None] = []

    def send_mail(self, sender: str, recipients: Sequence[str], message: bytes,
                  sendmail_path: str | None = None) -> None:
        self.sent.append((sender, list(recipients), message))
        self.sendmail_paths.append(sendmail_path)


def tcp(c: Clamd) -> str:
    return f"tcp:127.0.0.1:{c.tcp_port}"


def unix(c: Clamd) -> str:
    return f"unix:{c.unix_socket}"


def make_brain(monkey: Monkey | None = None, name: str = "av", **options: Any) -> AntiVirusBrain:
    return AntiVirusBrain(AntiVirusOptions(**options), monkey or RecordingMonkey(), name)


def run(
    brain: AntiVirusBrain,
    raw: bytes,
    sender: str = SENDER,
    recipients: Sequence[str] = RECIPIENTS,
    macros: Mapping[str, str] | None = None,
) -> OfflineResult:
    """One message through the core's real engine code path, in-process."""
    engine = Engine(chain_of(brain), brain.monkey)
    return run_engine(engine, raw, sender, recipients, macros or {"i": QID})


def brain_on(c: Clamd, **options: object) -> AntiVirusBrain:
    return make_brain(clamd=[unix(c)], **options)


def assert_virus(result: OfflineResult) -> None:
    assert result.action is Action.REJECT
    assert result.verdict is not None and result.verdict.reply is not None
    assert result.verdict.reply.text == f"Virus found: {av_samples.NAME_EICAR}"


def assert_refused_for_limits(result: OfflineResult, reason: str) -> None:
    """554 5.7.0, never Clean, and a log line with the queue id saying which limit."""
    assert result.action is Action.REJECT, result.verdict
    assert result.verdict is not None and result.verdict.reply is not None
    reply = result.verdict.reply
    assert (reply.code, reply.xcode) == (554, "5.7.0")
    assert reply.text.startswith("Message refused: ")
    assert result.header("X-Virus-Status") is None
    [line] = [ln for ln in result.log if "not scanned to the end" in ln]
    assert f"{QID}: not scanned to the end: " in line and reason in line
    assert "limits_action reject" in line
