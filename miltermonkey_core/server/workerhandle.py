"""The supervisor's handle on its worker: the child process and the control socket to it.

Kept apart from :mod:`.supervisor` so the supervisor reads as policy (signals,
reloads, restarts, draining) and this as mechanism (start a child, send it a
frame, describe how it ended).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from miltermonkey_core.logs import ROOT
from miltermonkey_core.server.control import send_frame

log = logging.getLogger(f"{ROOT}.supervisor")


class Worker:
    """The child process running the milter, and our end of its control socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._send_lock = threading.Lock()
        self.ready_at: float | None = None
        self.socket_ident: tuple[int, int] | None = None
        self.stopping = False
        self.error: str | None = None

    @classmethod
    def start(cls, packed_config: str) -> Worker:
        """Start ``python -m miltermonkey_core.server.worker`` and send it the configuration."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "miltermonkey_core.server.worker", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            child.close()
        w = cls(proc, parent)
        w.send({"cmd": "start", "config": packed_config})
        return w

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: dict[str, Any]) -> bool:
        """One frame; from the main loop or the HTTP threads (hence the lock)."""
        try:
            with self._send_lock:
                send_frame(self.sock, obj)
        except OSError as e:
            log.warning("cannot reach worker %d: %s", self.pid, e)
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def drain_socket(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
