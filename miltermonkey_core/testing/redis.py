"""A real Redis as a part of the test stack, for the shared scan cache.

Started in the foreground as our own child (``--daemonize no``), on a
loopback port, with no persistence: a test that stops and starts it sees an
empty cache again, which is exactly the outage a fleet must survive.  A
second Redis (another port) stands in for one an attacker can write to.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from miltermonkey_core.testing.part import ChildProcessPart
from miltermonkey_core.testing.process import binary, wait_port_free, wait_until

__all__ = ["Redis"]


class Redis(ChildProcessPart):
    """A private ``redis-server`` on ``host:port`` (loopback unless a fleet gives its bridge)."""

    name = "redis"
    binaries = ("redis-server",)
    package = "redis-server"

    def __init__(self, state_dir: Path | str, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(state_dir)
        self.port = port
        self.host = host

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "redis.log"

    def ping(self) -> bool:
        """True when the server answers PING (the raw protocol: no client needed)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        if self.is_running():
            return
        self._prepare_state_dir()
        self._check_port_free(self.port)
        self._spawn([binary("redis-server"), "--port", str(self.port), "--bind", self.host,
                     "--save", "", "--appendonly", "no", "--daemonize", "no",
                     "--dir", str(self.state_dir),
                     # Off the loopback Redis refuses clients without a password unless
                     # told otherwise; a fleet test's bridge is private to the test.
                     "--protected-mode", "yes" if self.host == "127.0.0.1" else "no"],
                    self.log_path, cwd=self.state_dir)
        if not wait_until(lambda: self.ping() or not self.is_running(), self.start_timeout):
            self.stop()
            raise self._error("did not answer PING in time")
        if not self.is_running():
            raise self._error("exited at start")

    def stop(self) -> None:
        self._reap()
        wait_port_free(self.port, self.stop_timeout, self.name)
        self._untrack()

    def restart(self, pause: float = 0.0) -> None:
        """Stop, wait ``pause`` seconds, start again: an outage, and a wiped cache."""
        self.stop()
        time.sleep(pause)
        self.start()
