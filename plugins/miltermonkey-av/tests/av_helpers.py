"""Helpers shared by the AV brain's tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miltermonkey_av.brain import AntiVirusBrain
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.testing import Clamd

from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.offline import OfflineResult, run_engine
from miltermonkey_core.engine.session import Engine

SIGNATURES = Path(__file__).parent / "signatures"
SENDER = "<alice@example.org>"
RECIPIENTS = ("<bob@example.net>", "<carol@example.net>")


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
    return run_engine(engine, raw, sender, recipients, macros or {"i": "4XyzQ1D"})
