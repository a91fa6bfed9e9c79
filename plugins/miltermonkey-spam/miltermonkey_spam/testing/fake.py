"""A loopback spamd that misbehaves on demand: hangs, hangs up, answers garbage.

A real spamd will not do those things when a test needs it to, yet they are
what a client's timeouts and fail-over exist for.  It can also stand in
front of a real spamd and pass every request through, so that a test counts
what was asked (``connections``) and still gets SpamAssassin's answers.
"""

from __future__ import annotations

import socket
import threading

from miltermonkey_core.testing.fakeserver import ConnectionHandler, FakeServer

__all__ = ["FakeSpamd"]


class FakeSpamd(FakeServer):
    """A TCP spamd stand-in whose every connection is handled by ``handler(conn)``.

    The class methods build the usual handlers; ``address`` is in the
    brain's ``HOST:PORT`` form.
    """

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def read_request(conn: socket.socket) -> bytes:
        """Read one SPAMC request (head and ``Content-length`` bytes of body) and return it."""
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                return data
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            piece = conn.recv(65536)
            if not piece:
                break
            rest += piece
        return head + b"\r\n\r\n" + rest

    @classmethod
    def answering(cls, reply: bytes) -> ConnectionHandler:
        """Read the request, then send *reply* as it is."""
        def handler(conn: socket.socket) -> None:
            cls.read_request(conn)
            conn.sendall(reply)

        return handler

    @classmethod
    def forwarding(cls, address: tuple[str, int], timeout: float = 60.0) -> ConnectionHandler:
        """Pass each request to the spamd at *address* and its answer back, unchanged."""
        def handler(conn: socket.socket) -> None:
            request = cls.read_request(conn)
            with socket.create_connection(address, timeout=timeout) as upstream:
                upstream.sendall(request)
                upstream.shutdown(socket.SHUT_WR)
                while data := upstream.recv(65536):
                    conn.sendall(data)

        return handler

    @classmethod
    def hanging(cls, seconds: float = 30.0) -> ConnectionHandler:
        """Read the request, then say nothing for *seconds*."""
        done = threading.Event()

        def handler(conn: socket.socket) -> None:
            cls.read_request(conn)
            done.wait(seconds)

        return handler

    @staticmethod
    def hanging_up(conn: socket.socket) -> None:
        """Close the connection at once, before reading anything."""
        conn.close()
