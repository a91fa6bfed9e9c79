"""Sample messages and small socket fakes shared by the spam brain's tests.

Named ``spam_samples`` (not ``samples``) because test directories are not
packages: two plugins' ``samples.py`` would collide in ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from miltermonkey_core.testing.stack import GTUBE

__all__ = ["GTUBE", "FakeSpamd", "blackhole", "ham", "spam", "unix_relay"]


def spam(subject: str = "buy now", extra_headers: str = "", body: bytes = b"") -> bytes:
    """A message carrying GTUBE: Debian's shipped rules score it 1000."""
    return (f"From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{zlib.crc32(subject.encode()):08x}.gtube@example.com>\r\n{extra_headers}"
            "\r\n").encode() + b"Hello,\r\n" + GTUBE + b"\r\n" + body


def ham(subject: str = "lunch", extra_headers: str = "", body: bytes = b"") -> bytes:
    """A plain, short personal message: scores well below 5."""
    return (f"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{zlib.crc32(subject.encode()):08x}.ham@example.com>\r\n{extra_headers}"
            "\r\n").encode() + (body or b"Shall we have lunch tomorrow at noon?\r\n\r\nBob\r\n")


class FakeSpamd:
    """A loopback server that answers every connection with ``handler(conn)``.

    For the failure modes a real spamd will not produce on demand: hanging,
    hanging up, temporary errors, garbage.  Counts connections.
    """

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> FakeSpamd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- handlers ---------------------------------------------------------------------

    @staticmethod
    def read_request(conn: socket.socket) -> bytes:
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
    def answering(cls, reply: bytes) -> Callable[[socket.socket], None]:
        def handler(conn: socket.socket) -> None:
            cls.read_request(conn)
            conn.sendall(reply)

        return handler

    @classmethod
    def hanging(cls, seconds: float = 30.0) -> Callable[[socket.socket], None]:
        done = threading.Event()

        def handler(conn: socket.socket) -> None:
            cls.read_request(conn)
            done.wait(seconds)

        return handler

    @staticmethod
    def hanging_up(conn: socket.socket) -> None:
        conn.close()


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An address that accepts connections (kernel backlog) but never reads or answers."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def unix_relay(path: Path, target: tuple[str, int]) -> Iterator[str]:
    """A UNIX socket that relays each connection to a TCP spamd.

    The stack's spamd listens on TCP only; this gives the client a real
    AF_UNIX peer that still ends at a real spamd.
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

            def closer(a: socket.socket = conn, b: socket.socket = up,
                       x: threading.Thread = t1, y: threading.Thread = t2) -> None:
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
