"""A real spamd as a part of the test stack, on a loopback port.

It follows the rules of :mod:`miltermonkey_core.testing.part`: everything
under its own state directory, stopped by its own pid (and its workers with
it), its port free again after ``stop()``, and a
:class:`~miltermonkey_core.testing.process.StackError` with the tail of its
log when it cannot start.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from miltermonkey_core.testing.part import StackPart
from miltermonkey_core.testing.process import (
    binary,
    chown,
    is_root,
    kill_group,
    pid_runs,
    process_group,
    read_pidfile,
    run_command,
    send_signal,
    terminate,
    wait_port_free,
    wait_until,
)
from miltermonkey_spam.testing.client import spamc_request

__all__ = ["Spamd"]


class Spamd(StackPart):
    """A private spamd with Debian's shipped rules and no network tests.

    ``-L`` keeps SpamAssassin from DNS and URI blocklist lookups, which would
    time out on an offline machine; GTUBE still scores 1000.
    """

    name = "spamd"
    binaries = ("spamd",)
    package = "spamd"
    run_as = "debian-spamd"

    port: int
    max_children: int

    def __init__(self, state_dir: Path | str, port: int, max_children: int = 5) -> None:
        super().__init__(state_dir)
        self.port = port
        self.max_children = max_children

    @property
    def pid_file(self) -> Path:
        """spamd's pid file (``-r``); it holds the parent of the workers."""
        return self.state_dir / "spamd.pid"

    @property
    def home_dir(self) -> Path:
        """The helper home directory (``-H``)."""
        return self.state_dir / "home"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "spamd.log"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for spamc clients."""
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int | None:
        """The parent spamd's pid while it runs."""
        pid = read_pidfile(self.pid_file)
        return pid if pid is not None and pid_runs(pid, "spamd") else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        if self.is_running():
            return
        self._prepare_state_dir()
        self._check_port_free(self.port)
        self.home_dir.mkdir(exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        cmd = [
            binary("spamd"),
            "-d",
            "-r", str(self.pid_file),
            "-i", "127.0.0.1",
            "-p", str(self.port),
            "-A", "127.0.0.1",
            "-x",
            "-L",
            "-H", str(self.home_dir),
            # a Bayes database of its own: with -x, every spamd would share
            # /var/lib/spamassassin's, its locks and what it learned
            "--cf", f"bayes_path {self.home_dir}/bayes",
            "--max-children", str(self.max_children),
            "--min-children", str(min(2, self.max_children)),
            "-s", str(self.log_path),
        ]  # fmt: skip
        if is_root():
            cmd[2:2] = ["-u", self.run_as or "debian-spamd", "-g", self.run_as or "debian-spamd"]
            chown(self.state_dir, "debian-spamd", "debian-spamd", recursive=True)
        out = self.state_dir / "spamd.out"
        # -d: the command returns once the daemon has forked; it does not
        # mean the rules are compiled and the socket accepts.
        status, output = run_command(cmd, timeout=self.start_timeout)
        out.write_text(output, encoding="utf-8")
        if status != 0:
            raise self._error(f"spamd -d exited with status {status}:\n{output.strip()}")
        deadline = time.monotonic() + self.start_timeout
        while not self.ping():
            if self.pid is None and not wait_until(lambda: self.pid is not None, 1.0):
                raise self._error("spamd exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise self._error(f"no PONG after {self.start_timeout:g}s")
            time.sleep(0.05)
        self._track()

    def _kill(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is not None:
            if sig == signal.SIGKILL:
                # Killing only the parent would leave the workers serving.
                pgid = process_group(pid)
                send_signal(pid, sig)
                if pgid == pid:
                    kill_group(pgid, sig)
            terminate(pid, self.stop_timeout, group=True)
        self.pid_file.unlink(missing_ok=True)
        self._untrack()
        wait_port_free(self.port, self.stop_timeout, self.name)

    def stop(self) -> None:
        self._kill(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL spamd and its workers, the way an engine dies under a running milter."""
        self._kill(signal.SIGKILL)

    def ping(self) -> bool:
        """True when spamd answers a SPAMC PING with PONG."""
        try:
            reply = spamc_request(self.address, "PING", timeout=2.0)
        except OSError:
            return False
        return reply.startswith(b"SPAMD/1.5 0 PONG")
