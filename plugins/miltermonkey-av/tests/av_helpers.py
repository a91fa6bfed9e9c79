"""Helpers shared by the AV brain's tests (fixtures live in conftest.py)."""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from miltermonkey_av.brain import AntiVirusBrain
from miltermonkey_av.options import AntiVirusOptions
from miltermonkey_av.testing import Clamd, FakeClamd, clamd_command, instream
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.monkey import Monkey
from miltermonkey_core.contract.verdict import Action
from miltermonkey_core.engine.build import chain_of
from miltermonkey_core.engine.offline import OfflineResult, run_engine
from miltermonkey_core.engine.session import Engine
from miltermonkey_core.testing.postfix import Postfix

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


def maillog_ids(postfix: Postfix, pattern: str, count: int = 1,
                timeout: float = 15.0) -> list[str]:
    """The queue ids (group 1 of ``pattern``) in Postfix's log, once ``count`` are there:
    Postfix logs through postlogd, a little after the SMTP reply."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(pattern, postfix.maillog())
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


class LoggingClamd(Clamd):
    """A clamd that also logs clean scans (``LogClean yes``), so a test can count its scans.

    ``IdleTimeout 2``: without concurrent reloads clamd applies a RELOAD once its
    worker threads have been idle that long (30 s by default).
    """

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text()
        assert "LogClean no" in text
        self.config_path.write_text(text.replace("LogClean no", "LogClean yes")
                                    + "IdleTimeout 2\n")

    def scans(self) -> list[str]:
        """clamd's log line of every stream it scanned, clean or not."""
        if not self.log_path.exists():
            return []
        return [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                if "instream(" in ln]


def smtp_data(postfix: Postfix, raw: bytes, timeout: float = 60, client: str | None = None,
              sender: str = "alice@example.org",
              rcpts: Sequence[str] = ("bob@example.net",)) -> tuple[int, str]:
    """One message through Postfix's SMTP port: the reply to the end of DATA.

    ``client`` is a loopback source address (Postfix's access rules key on it).
    """
    source = None if client is None else (client, 0)
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, local_hostname="client.test",
                      timeout=timeout, source_address=source) as s:
        s.ehlo()
        code, text = s.mail(sender)
        assert code == 250, text
        for rcpt in rcpts:
            code, text = s.rcpt(rcpt)
            assert code == 250, text
        try:
            code, text = s.data(raw)
        except smtplib.SMTPDataError as e:
            code, text = e.smtp_code, e.smtp_error
    return code, text.decode(errors="replace")


def settle(directory: Path, seconds: float) -> None:
    """Wait until the newest file in ``directory`` is ``seconds`` old (the brain's cache_settle)."""
    newest = max([directory.stat().st_mtime] + [p.stat().st_mtime for p in directory.iterdir()])
    time.sleep(max(0.0, newest + seconds + 0.05 - time.time()))


def reload_with(c: Clamd, filename: str, content: str, probe: bytes, expect: str,
                timeout: float = 90.0) -> float:
    """Add a signature file to ``c``'s database, RELOAD, and wait until ``probe`` is found
    as ``expect``; returns the seconds that took.  (clamd may take its time: it reloads
    from its main loop.)"""
    path = c.db_dir / filename
    path.write_text(content, encoding="utf-8")
    t0 = time.monotonic()
    assert clamd_command(c.tcp_address, "RELOAD") == "RELOADING"
    while time.monotonic() - t0 < timeout:
        if expect in instream(c.tcp_address, probe):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"clamd did not load {filename} within {timeout} s")


@attrs.define
class Seen:
    """One connection a :class:`CountingClamd` relayed."""

    command: str
    #: Message bytes received (INSTREAM).
    size: int = 0
    #: "scanned" (terminator received, answered), "hung up" (closed before the terminator).
    end: str = ""
    reply: str = ""


class CountingClamd(FakeClamd):
    """A pass-through to a real clamd that records every connection: the command, the
    INSTREAM bytes and whether the client finished the stream or hung up first.

    ``hold`` makes INSTREAM wait that long before it reads each frame, a slow clamd."""

    def __init__(self, target: Clamd) -> None:
        self.target = target
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        super().__init__(self._relay)

    def _relay(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        buf = bytearray()

        def need(count: int) -> bool:
            while len(buf) < count:
                data = conn.recv(65536)
                if not data:
                    return False
                buf.extend(data)
            return True

        while b"\0" not in buf:
            data = conn.recv(4096)
            if not data:
                return
            buf.extend(data)
        end = buf.index(b"\0")
        command = buf[1:end].decode()
        del buf[: end + 1]
        seen = Seen(command)
        with self.lock:
            self.seen.append(seen)
        if command != "INSTREAM":
            seen.reply = clamd_command(self.target.tcp_address, command)
            conn.sendall(seen.reply.encode() + b"\0")
            return
        payload = bytearray()
        while True:
            if not need(4):
                seen.end = "hung up"
                return
            size = int.from_bytes(buf[:4], "big")
            if size == 0:
                break
            if not need(4 + size):
                seen.end = "hung up"
                return
            payload += buf[4 : 4 + size]
            seen.size = len(payload)
            del buf[: 4 + size]
        seen.reply = instream(self.target.tcp_address, bytes(payload))
        seen.end = "scanned"
        conn.sendall(seen.reply.encode() + b"\0")

    def streams(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.command == "INSTREAM"]

    def wait(self, done: Callable[[list[Seen]], bool], timeout: float = 10.0) -> list[Seen]:
        """The INSTREAM connections, once ``done`` says they are as a test expects (the relay
        reads on its own threads, a little behind the client)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            streams = self.streams()
            if done(streams):
                return streams
            time.sleep(0.02)
        raise AssertionError(f"streams not as expected: {self.streams()}")

    def wait_until(self, end: str, count: int = 1, timeout: float = 10.0) -> list[Seen]:
        """The INSTREAM connections that ended so, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in self.streams() if s.end == end]
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{count} stream(s) ending {end!r} not seen: {self.streams()}")


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
