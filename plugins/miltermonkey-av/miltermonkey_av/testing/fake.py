"""A loopback clamd that misbehaves on demand: hangs, hangs up, answers garbage.

A real clamd will not do those things when a test needs it to, yet they are
what a client's timeouts and fail-over exist for.
"""

from __future__ import annotations

import socket

from miltermonkey_core.testing.fakeserver import FakeServer

__all__ = ["FakeClamd", "read_instream"]


def read_instream(conn: socket.socket) -> bytes:
    """Read one ``zINSTREAM`` request the way clamd does; return the data it carried.

    Stops early, with what arrived, when the client hangs up.
    """
    conn.settimeout(5)
    buf = b""

    def need(count: int) -> bool:
        nonlocal buf
        while len(buf) < count:
            data = conn.recv(65536)
            if not data:
                return False
            buf += data
        return True

    if not need(len(b"zINSTREAM\0")):
        return b""
    buf = buf[len(b"zINSTREAM\0") :]
    payload = bytearray()
    while need(4):
        size = int.from_bytes(buf[:4], "big")
        if size == 0 or not need(4 + size):
            break
        payload += buf[4 : 4 + size]
        buf = buf[4 + size :]
    return bytes(payload)


class FakeClamd(FakeServer):
    """A TCP clamd stand-in whose every connection is handled by ``handler(conn)``.

    A handler usually starts with :func:`read_instream`, then does the
    misbehaviour under test.  ``address`` is in the brain's ``tcp:`` form.
    """

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"
