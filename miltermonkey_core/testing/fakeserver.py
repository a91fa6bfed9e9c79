"""Loopback peers that misbehave on purpose, for the failure paths of network clients.

A real engine will not hang, hang up or answer garbage on demand, yet those
are the cases a client's timeouts, fail-over and error reporting exist for.
:class:`FakeServer` runs a handler per connection; the engine fakes in the
brain packages (``FakeClamd``, ``FakeSpamd``) add the protocol's request
reader and canned answers on top.  :func:`blackhole` accepts but never
answers; :func:`unix_relay` puts a real UNIX socket in front of a TCP server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

__all__ = ["ConnectionHandler", "FakeServer", "blackhole", "unix_relay"]

#: What a fake does with one accepted connection; the server closes it afterwards.
ConnectionHandler = Callable[[socket.socket], None]


class FakeServer:
    """A TCP server on 127.0.0.1 that answers every connection with ``handler(conn)``.

    Each connection gets its own thread, so a handler that hangs holds only
    its own client.  ``connections`` counts what was accepted, which is how a
    test sees that a client retried, failed over or stayed away.
    """

    def __init__(self, handler: ConnectionHandler) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        # accept() wakes up regularly so close() can end the thread.
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        """Stop accepting; handlers still running finish on their own."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """``HOST:PORT`` that accepts connections (kernel backlog) but never reads or answers."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def unix_relay(path: Path, target: tuple[str, int]) -> Iterator[str]:
    """A UNIX socket at *path* that relays each connection to a TCP server.

    Engines in the test stack may listen on TCP only; this gives a client a
    real AF_UNIX peer that still ends at the real engine.  Yields ``unix:PATH``.
    """
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            up = socket.create_connection(target)
            t1 = threading.Thread(target=pipe, args=(conn, up), daemon=True)
            t2 = threading.Thread(target=pipe, args=(up, conn), daemon=True)
            t1.start()
            t2.start()

            def closer(
                a: socket.socket = conn,
                b: socket.socket = up,
                x: threading.Thread = t1,
                y: threading.Thread = t2,
            ) -> None:
                x.join()
                y.join()
                a.close()
                b.close()

            threading.Thread(target=closer, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix:{path}"
    finally:
        stop.set()
        thread.join(2)
        server.close()
