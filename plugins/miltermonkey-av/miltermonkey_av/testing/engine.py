"""A real clamd as a part of the test stack, on a loopback port and a private UNIX socket.

It follows the rules of :mod:`miltermonkey_core.testing.part`: everything
under its own state directory, stopped by its own pid, its port free again
after ``stop()``, and a :class:`~miltermonkey_core.testing.process.StackError`
with the tail of its log when it cannot start.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from miltermonkey_av.testing.client import ClamdSocket, clamd_command, instream
from miltermonkey_av.testing.samples import EICAR_DATABASE
from miltermonkey_core.testing.part import ChildProcessPart
from miltermonkey_core.testing.process import (
    StackError,
    binary,
    chown,
    is_root,
    tail,
    wait_port_free,
)

__all__ = ["Clamd"]


class Clamd(ChildProcessPart):
    """A private clamd with a tiny signature database written by this class.

    There is no freshclam here (no network), and clamd refuses to start with
    an empty database, so the default database is one body signature for
    EICAR (:data:`~miltermonkey_av.testing.samples.EICAR_DATABASE`), which
    matches in plain bodies and (clamd decodes MIME) in base64 attachments;
    *db_files* adds to it or replaces its files, e.g.
    :func:`~miltermonkey_av.testing.samples.signature_files` for every
    sample.  It answers on TCP and on a UNIX socket, since milters use both.

    Its limits are Debian's (``MaxRecursion 16``, ``MaxFiles 10000``) with
    ``AlertExceedsMax yes``, the configuration the brain's README
    recommends; ``alert_exceeds_max=False`` gives clamd as Debian ships it,
    which answers ``OK`` for what it stopped looking into.
    """

    name = "clamd"
    binaries = ("clamd",)
    package = "clamav-daemon"
    run_as = "clamav"

    tcp_port: int
    db_files: dict[str, str]

    def __init__(
        self, state_dir: Path | str, tcp_port: int, db_files: Mapping[str, str] | None = None,
        *, alert_exceeds_max: bool = True,
    ) -> None:
        super().__init__(state_dir)
        self.tcp_port = tcp_port
        self.db_files = dict(EICAR_DATABASE)
        self.db_files.update(db_files or {})
        self.alert_exceeds_max = alert_exceeds_max

    @property
    def tcp_address(self) -> tuple[str, int]:
        """(host, port) for TCP clients."""
        return ("127.0.0.1", self.tcp_port)

    @property
    def unix_socket(self) -> Path:
        """The LocalSocket path."""
        return self.state_dir / "clamd.ctl"

    @property
    def config_path(self) -> Path:
        """The generated clamd.conf (``clamdscan -c`` accepts it too)."""
        return self.state_dir / "clamd.conf"

    @property
    def db_dir(self) -> Path:
        """DatabaseDirectory."""
        return self.state_dir / "db"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "clamd.log"

    def _write_config(self) -> None:
        self._prepare_state_dir()
        if self.db_dir.exists():
            shutil.rmtree(self.db_dir)
        self.db_dir.mkdir()
        for filename, content in self.db_files.items():
            (self.db_dir / filename).write_text(content, encoding="utf-8")
        settings = {
            "DatabaseDirectory": self.db_dir,
            "LocalSocket": self.unix_socket,
            # Milters under test may run as any user; the directory is private anyway.
            "LocalSocketMode": "666",
            "FixStaleSocket": "yes",
            "TCPSocket": self.tcp_port,
            "TCPAddr": "127.0.0.1",
            "PidFile": self.state_dir / "clamd.pid",
            "LogFile": self.log_path,
            "LogTime": "yes",
            "LogClean": "no",
            "Foreground": "yes",
            "ScanMail": "yes",
            "ScanArchive": "yes",
            "ScanHTML": "yes",
            "Bytecode": "no",
            "SelfCheck": "0",
            "ConcurrentDatabaseReload": "no",
            "MaxThreads": "8",
            # The limits, as the av brain's README recommends: with AlertExceedsMax
            # what clamd stops looking into is Heuristics.Limits.Exceeded.*, never OK.
            "StreamMaxLength": "25M",
            "MaxFileSize": "25M",
            "MaxScanSize": "100M",
            "MaxRecursion": "16",
            "MaxFiles": "10000",
            "MaxScanTime": "120000",
            "AlertExceedsMax": "yes" if self.alert_exceeds_max else "no",
            "ReadTimeout": "60",
            "CommandReadTimeout": "10",
            "ExtendedDetectionInfo": "no",
        }
        if is_root():
            settings["User"] = "clamav"
        text = "".join(f"{key} {value}\n" for key, value in settings.items())
        self.config_path.write_text(text, encoding="utf-8")
        # clamd drops to 'clamav' before it reads the database and creates
        # its socket and log, so the whole directory must be its own.
        chown(self.state_dir, "clamav", "clamav", recursive=True)

    def start(self) -> None:
        if self.is_running():
            return
        self._check_port_free(self.tcp_port)
        self._write_config()
        for stale in (self.unix_socket, self.state_dir / "clamd.pid"):
            stale.unlink(missing_ok=True)
        self._spawn([binary("clamd"), "-c", str(self.config_path)], self.state_dir / "clamd.out")
        self._wait_ready(lambda: self.ping() and self.unix_socket.exists())

    def _error(self, message: str, log: Path | None = None) -> StackError:
        # Errors before LogFile is open (a bad config line) only reach stdout.
        error = super()._error(message, log)
        out = self.state_dir / "clamd.out"
        return StackError(f"{error}\n--- last lines of {out} ---\n{tail(out, 10)}")

    def stop(self) -> None:
        self._reap()
        wait_port_free(self.tcp_port, self.stop_timeout, self.name)

    def kill(self) -> None:
        """SIGKILL clamd, the way an engine dies under a running milter."""
        self._reap(signal.SIGKILL)
        wait_port_free(self.tcp_port, self.stop_timeout, self.name)

    def ping(self) -> bool:
        """True when clamd answers PING with PONG over TCP."""
        try:
            return clamd_command(self.tcp_address, "PING", timeout=2.0) == "PONG"
        except OSError:
            return False

    def instream(self, data: bytes, via: Literal["tcp", "unix"] = "tcp") -> str:
        """Scan *data* with INSTREAM and return clamd's reply.

        e.g. ``"stream: OK"`` or ``"stream: MilterMonkey.Test.EICAR.UNOFFICIAL FOUND"``.
        """
        address: ClamdSocket = self.tcp_address if via == "tcp" else self.unix_socket
        return instream(address, data)
