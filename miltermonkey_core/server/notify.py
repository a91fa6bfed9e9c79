"""systemd's readiness protocol (``Type=notify``), written directly: one datagram per state.

The protocol (sd_notify(3)) is a single ``AF_UNIX`` datagram of
newline-separated ``KEY=value`` lines sent to the socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  No
library is needed for that, and the supervisor must not depend on
libsystemd being installed.  Without ``$NOTIFY_SOCKET`` (not under systemd,
or ``Type=simple``) every call does nothing.

The supervisor sends:

* ``READY=1`` once the first worker serves, and again when a reload ends;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a SIGHUP reload starts
  (systemd 253 and later match the two to know when the reload is over);
* ``STOPPING=1`` when SIGTERM arrives (before the drain period);
* ``STATUS=`` lines that ``systemctl status`` shows, with each of the above;
* ``ERRNO=`` with the last status when it gives up on a worker that cannot start.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.supervisor")


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names (abstract names as bytes), or None."""
    if not value or value[0] not in "/@":
        return None
    if value[0] == "@":
        return b"\0" + value[1:].encode()
    return value


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends state changes to systemd; a no-op when ``$NOTIFY_SOCKET`` is not set."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.address = notify_address(socket_path if socket_path is not None
                                      else os.environ.get("NOTIFY_SOCKET"))
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """One datagram of ``KEY=value`` lines; keys are written upper-case."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self.address)
                s.sendall(payload)
        except OSError as e:
            if not self._warned:  # once: a dead notify socket must not fill the log
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"),
                            e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def reloading(self, status: str = "reloading the configuration") -> bool:
        return self.send(reloading=1, monotonic_usec=monotonic_usec(), status=status)

    def stopping(self, status: str) -> bool:
        return self.send(stopping=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def failed(self, status: str, errno: int = 0) -> bool:
        return self.send(status=status, errno=errno) if errno else self.send(status=status)
