"""The one small SPAMC client for tests and benchmarks: one request, the raw reply.

Why not the brain's own :class:`miltermonkey_spam.spamc.SpamcClient`: tests
of the spamd part, of the engine alone and of the brain must not depend on
the code they check.  This client does only what the SPAMC/1.5 protocol
needs (a request line, ``Content-length``, the message; spamd answers and
closes) and leaves the reading of the reply to the caller, except for
:func:`check`, which returns the ``Spam:`` header of a CHECK.
"""

from __future__ import annotations

import socket

__all__ = ["SpamdTestError", "check", "spamc_request"]


class SpamdTestError(RuntimeError):
    """spamd did not answer a request with ``EX_OK`` and the expected headers."""


def spamc_request(
    address: tuple[str, int], command: str, message: bytes | None = None, timeout: float = 60.0
) -> bytes:
    """Send one SPAMC/1.5 request (``CHECK``, ``HEADERS``, ``PING`` ...); return the whole reply."""
    request = f"{command} SPAMC/1.5\r\n".encode("ascii")
    if message is not None:
        request += b"Content-length: %d\r\n" % len(message)
    request += b"\r\n" + (message or b"")
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        parts: list[bytes] = []
        while data := sock.recv(65536):
            parts.append(data)
    return b"".join(parts)


def check(address: tuple[str, int], message: bytes, timeout: float = 60.0) -> str:
    """One CHECK; returns the ``Spam:`` header's value, e.g. ``False ; 1.3 / 5.0``."""
    reply = spamc_request(address, "CHECK", message, timeout)
    head, _, _ = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if b" 0 EX_OK" not in lines[0]:
        raise SpamdTestError(f"spamd: {lines[0]!r}")
    for line in lines[1:]:
        if line.lower().startswith(b"spam:"):
            return line[5:].strip().decode()
    raise SpamdTestError(f"spamd: no Spam: header in {head!r}")
