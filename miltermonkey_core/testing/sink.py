"""Postfix's ``smtp-sink`` as the next hop, and the messages it received.

Tests see exactly what a milter did to a message only after the MTA applied
it, so a private Postfix relays everything to :class:`SmtpSink`, which dumps
each message to a file; :func:`parse_dump` reads one back as a
:class:`SinkMessage` with the envelope and the header as delivered.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import attrs

from miltermonkey_core.testing.part import ChildProcessPart
from miltermonkey_core.testing.process import (
    StackError,
    StackTimeoutError,
    binary,
    chown,
    is_root,
    port_in_use,
    wait_port_free,
    wait_until,
)

__all__ = ["SinkMessage", "SmtpSink", "parse_dump"]

_ADDRESS = re.compile(r"^\s*(?:from:|to:)?\s*<([^>]*)>", re.IGNORECASE)


def _address(args: str) -> str:
    match = _ADDRESS.match(args)
    if match:
        return match.group(1)
    words = args.split(maxsplit=1)
    return words[0] if words else ""


@attrs.frozen
class SinkMessage:
    """One message as Postfix delivered it to :class:`SmtpSink`.

    ``message`` is the message exactly as smtp-sink stored it: dot-unstuffed,
    with LF line endings (smtp-sink writes text lines).
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes
    client_addr: str = ""
    helo: str | None = None
    mail_args: str = ""
    rcpt_args: tuple[str, ...] = ()
    path: Path | None = None

    def _split(self) -> tuple[bytes, bytes]:
        msg = self.message
        if msg.startswith((b"\n", b"\r\n")):  # no header at all
            return b"", msg.split(b"\n", 1)[1]
        for sep in (b"\r\n\r\n", b"\n\n"):
            head, found, body = msg.partition(sep)
            if found and b"\n\n" not in head and b"\r\n\r\n" not in head:
                return head + sep[: len(sep) // 2], body
        return msg, b""  # no blank line: all header

    def headers(self) -> list[tuple[str, str]]:
        """The header fields in order, unfolded, as (name, value) pairs."""
        head, _body = self._split()
        fields: list[tuple[str, str]] = []
        for raw in re.split(rb"\r?\n", head):
            if not raw:
                continue
            line = raw.decode("utf-8", errors="replace")
            if line[0] in " \t" and fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line)
                continue
            name, _colon, value = line.partition(":")
            fields.append((name.strip(), value.lstrip(" \t")))
        return fields

    def header(self, name: str) -> str | None:
        """The value of the first header named *name* (any case), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """All values of the headers named *name* (any case), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers() if key.lower() == wanted]

    @property
    def body(self) -> bytes:
        """Everything after the blank line that ends the header."""
        return self._split()[1]


def parse_dump(path: Path | str) -> SinkMessage:
    """Parse one ``smtp-sink -d`` dump file.

    The format (smtp-sink(1), "DUMP FILE FORMAT"): records ``X-Client-Addr``,
    ``X-Client-Proto``, ``X-Helo-Args`` (if HELO/EHLO was sent),
    ``X-Mail-Args`` (the MAIL FROM arguments, e.g. ``<a@b> SIZE=5``) and one
    ``X-Rcpt-Args`` per recipient, then a three-line ``Received:`` header that
    marks the end of smtp-sink's own records, then the message as received,
    then one empty line.
    """
    path = Path(path)
    data = path.read_bytes()
    records: list[tuple[str, str]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end].decode("utf-8", errors="replace")
        pos = end + 1
        name, _colon, value = line.partition(":")
        if name.lower() == "received":
            # Skip the continuation lines of smtp-sink's Received: header.
            while pos < len(data) and data[pos : pos + 1] in (b" ", b"\t"):
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end + 1
            break
        records.append((name.lower(), value.strip()))
    else:
        raise StackError(f"{path}: not an smtp-sink dump (no Received: record)")
    message = data[pos:]
    # smtp-sink ends each dump with one empty line of its own.
    if message.endswith(b"\n"):
        message = message[:-1]
    mail_args = next((v for k, v in records if k == "x-mail-args"), "")
    rcpt_args = tuple(v for k, v in records if k == "x-rcpt-args")
    return SinkMessage(
        sender=_address(mail_args),
        recipients=tuple(_address(args) for args in rcpt_args),
        message=message,
        client_addr=next((v for k, v in records if k == "x-client-addr"), ""),
        helo=next((v for k, v in records if k == "x-helo-args"), None),
        mail_args=mail_args,
        rcpt_args=rcpt_args,
        path=path,
    )


class SmtpSink(ChildProcessPart):
    """Postfix's ``smtp-sink``: accepts any mail and dumps each message to a file.

    This is the "next hop" of :class:`Postfix`, so tests can see exactly what
    a milter did to a message after the MTA applied it.
    """

    name = "smtp-sink"
    binaries = ("smtp-sink",)
    package = "postfix"
    run_as = "nobody"

    port: int

    def __init__(self, state_dir: Path | str, port: int) -> None:
        super().__init__(state_dir)
        self.port = port

    @property
    def dump_dir(self) -> Path:
        """Where the dumps go (one file per message, in hourly folders)."""
        return self.state_dir / "dumps"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "smtp-sink.log"

    def start(self) -> None:
        if self.is_running():
            return
        self._prepare_state_dir()
        self._check_port_free(self.port)
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary("smtp-sink")]
        if is_root():
            # smtp-sink refuses to run as root; the dumps then belong to nobody.
            chown(self.dump_dir, "nobody", recursive=True)
            cmd += ["-u", "nobody"]
        # A template relative to its working directory: smtp-sink then never
        # walks the path from / again.  Every new pytest session resets its
        # base directory to 0700, and nobody could no longer reach an
        # absolute path (smtp-sink dies on the first failed open).
        cmd += ["-d", "%Y%m%d%H/%M.", f"127.0.0.1:{self.port}", "1000"]
        self._spawn(cmd, self.log_path, cwd=self.dump_dir)
        self._wait_ready(lambda: port_in_use(self.port))

    def stop(self) -> None:
        self._reap()
        wait_port_free(self.port, self.stop_timeout, self.name)

    def _open_files(self) -> set[str] | None:
        """Paths the sink holds open, or None when /proc cannot tell us."""
        pid = self.pid
        if pid is None:
            return set()
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            links = set()
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    links.add(os.readlink(fd))
        except OSError:
            return None
        return links

    def messages(self) -> list[Path]:
        """Dumps of completely received messages, oldest first.

        smtp-sink creates the file when DATA starts and fills it while the
        message arrives.  A dump counts as complete once the sink no longer
        holds it open; where /proc cannot tell, once its size stopped changing.
        """
        if not self.dump_dir.exists():
            return []
        files = [p for p in self.dump_dir.rglob("*") if p.is_file()]
        open_files = self._open_files()
        if open_files is None:
            sizes = {p: p.stat().st_size for p in files}
            time.sleep(0.2)
            done = [p for p in files if p.stat().st_size == sizes[p]]
        else:
            done = [p for p in files if str(p) not in open_files]

        def age(path: Path) -> tuple[int, str]:
            return path.stat().st_mtime_ns, str(path)

        return sorted(done, key=age)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least *count* complete dumps exist and return all of them."""
        found: list[Path] = []

        def enough() -> bool:
            nonlocal found
            found = self.messages()
            return len(found) >= count

        if not wait_until(enough, timeout, 0.05):
            raise StackTimeoutError(
                f"{self.name}: {len(found)} of {count} messages arrived within {timeout:g}s"
                f" in {self.dump_dir}"
            )
        return found

    def wait_for_text(self, needle: bytes, timeout: float = 30.0) -> Path:
        """Wait for a complete dump that contains *needle* and return its path."""
        hit: list[Path] = []

        def search() -> bool:
            for path in self.messages():
                if needle in path.read_bytes():
                    hit.append(path)
                    return True
            return False

        if not wait_until(search, timeout, 0.05):
            raise StackTimeoutError(
                f"{self.name}: no message containing {needle!r} within {timeout:g}s"
                f" ({len(self.messages())} messages in {self.dump_dir})"
            )
        return hit[0]

    def clear(self) -> None:
        """Delete every dump, so the next wait only sees new messages."""
        if not self.dump_dir.exists():
            return
        for child in self.dump_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
