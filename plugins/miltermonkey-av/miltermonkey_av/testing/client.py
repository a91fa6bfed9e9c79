"""The one small clamd client for tests and benchmarks: a command or an INSTREAM scan.

Why not the brain's own :class:`miltermonkey_av.clamd.ClamdClient`: tests of
the clamd part, of the engine alone and of the brain must not depend on the
code they check.  This client does only what clamd(8) describes, with no
fail-over or result parsing: it returns clamd's reply text as sent (without
the NUL), e.g. ``"stream: OK"`` or ``"stream: MilterMonkey.Test.EICAR.UNOFFICIAL FOUND"``.

The INSTREAM framing (``zINSTREAM\\0``, then chunks each preceded by its
length as a 4-byte big-endian integer, then a zero length) is
:func:`write_instream`, so that a benchmark's session prototype sends
exactly the same bytes.
"""

from __future__ import annotations

import os
import socket

__all__ = ["ClamdSocket", "clamd_command", "instream", "read_reply", "write_instream"]

#: ``("127.0.0.1", port)`` for TCP, or the path of clamd's UNIX socket.
ClamdSocket = tuple[str, int] | str | os.PathLike[str]

CHUNK_SIZE = 64 * 1024


def _connect(address: ClamdSocket, timeout: float) -> socket.socket:
    if isinstance(address, tuple):
        sock = socket.create_connection(address, timeout=timeout)
        # The command, the chunks and the terminator are separate writes:
        # with Nagle each would wait for the ACK of the one before.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(address))
    except BaseException:
        sock.close()
        raise
    return sock


def write_instream(sock: socket.socket, data: bytes, chunk_size: int = CHUNK_SIZE) -> None:
    """Send ``zINSTREAM`` and *data* framed as clamd reads it."""
    sock.sendall(b"zINSTREAM\0")
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        piece = view[start : start + chunk_size]
        sock.sendall(len(piece).to_bytes(4, "big") + piece)
    sock.sendall(b"\0\0\0\0")


def read_reply(sock: socket.socket) -> str:
    """Read one NUL-terminated reply (or what came before clamd hung up)."""
    reply = b""
    while not reply.endswith(b"\0"):
        data = sock.recv(4096)
        if not data:
            break
        reply += data
    return reply.rstrip(b"\0").decode("utf-8", errors="replace")


def clamd_command(address: ClamdSocket, command: str, timeout: float = 10.0) -> str:
    """Send one command without data (``PING``, ``VERSION``, ``RELOAD``) and return the reply."""
    with _connect(address, timeout) as sock:
        sock.sendall(b"z" + command.encode("ascii") + b"\0")
        return read_reply(sock)


def instream(
    address: ClamdSocket, data: bytes, timeout: float = 30.0, chunk_size: int = CHUNK_SIZE
) -> str:
    """Scan *data* with INSTREAM on a fresh connection and return clamd's reply."""
    with _connect(address, timeout) as sock:
        write_instream(sock, data, chunk_size)
        return read_reply(sock)
