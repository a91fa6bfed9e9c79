"""How fast is INSTREAM, and does a persistent clamd connection (IDSESSION) pay?

Starts a private clamd with the test signature database (the same
``miltermonkey_av.testing.Clamd`` the tests use) and measures, for
2 KB / 50 KB / 1 MB messages (a text part plus a base64 attachment, so
clamd's MIME decoder does real work):

* ``fresh``: the shipped client, one new connection per scan (TCP and UNIX);
* ``session``: one IDSESSION connection reused for every scan (a prototype
  written here only to compare; ``zIDSESSION``, then ``zINSTREAM`` per scan,
  framed by the test client's ``write_instream``, replies prefixed with a
  request id);
* ``PING`` alone, fresh versus on a session: the pure cost of connecting;
* ``pool x8``: eight threads scanning through one ClamdPool.

Run: ``python bench/bench_instream.py [seconds-per-case]`` (as root, like
the tests, so clamd can drop to its own user).
"""

from __future__ import annotations

import base64
import functools
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from miltermonkey_av.clamd import ClamdClient, ClamdPool, parse_reply
from miltermonkey_av.testing import Clamd, signature_files, write_instream

from miltermonkey_core.testing.process import free_port


def message(size: int) -> bytes:
    data = random.Random(size).randbytes(size * 3 // 4)
    b64 = base64.encodebytes(data)
    head = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
            b"--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=a.bin\r\n\r\n")
    return head + b64.replace(b"\n", b"\r\n") + b"--XX--\r\n"


class Session:
    """A minimal IDSESSION client, for comparison only."""

    def __init__(self, address: tuple[str, int] | str) -> None:
        fam = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.connect(address)
        if fam == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"zIDSESSION\0")
        self.buf = b""

    def _reply(self) -> str:
        while b"\0" not in self.buf:
            self.buf += self.sock.recv(4096)
        line, _, self.buf = self.buf.partition(b"\0")
        return line.decode()

    def ping(self) -> str:
        self.sock.sendall(b"zPING\0")
        return self._reply()

    def instream(self, data: bytes) -> str:
        write_instream(self.sock, data)
        return self._reply()

    def close(self) -> None:
        self.sock.sendall(b"zEND\0")
        self.sock.close()


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(operations per second, mean milliseconds)."""
    fn()  # warm up
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    dt = time.perf_counter() - t0
    return n / dt, dt / n * 1000


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    # Clamd grants its user traversal of the state directory itself.
    d = Path(tempfile.mkdtemp(prefix="mmav-bench-")) / "clamd"
    c = Clamd(d, free_port(), db_files=signature_files())
    c.start()
    try:
        tcp = ClamdClient(f"tcp:127.0.0.1:{c.tcp_port}")
        unix = ClamdClient(f"unix:{c.unix_socket}")
        print(f"{c.instream(b'x')!r} from {tcp.version()}")
        rows = []
        ps = Session(("127.0.0.1", c.tcp_port))
        rows.append(("PING", "tcp fresh", *rate(lambda: tcp.command("PING"), seconds)))
        rows.append(("PING", "tcp session", *rate(ps.ping, seconds)))
        rows.append(("PING", "unix fresh", *rate(lambda: unix.command("PING"), seconds)))
        for size in (2_000, 50_000, 1_000_000):
            data = message(size)
            assert parse_reply(ps.instream(data).split(": ", 1)[1])[0].value == "clean"
            label = f"{len(data) // 1000} KB"
            rows.append((label, "tcp fresh",
                         *rate(functools.partial(tcp.instream, [data]), seconds)))
            rows.append((label, "tcp session",
                         *rate(functools.partial(ps.instream, data), seconds)))
            rows.append((label, "unix fresh",
                         *rate(functools.partial(unix.instream, [data]), seconds)))
            pool = ClamdPool([f"unix:{c.unix_socket}"])
            with ThreadPoolExecutor(8) as ex:
                def batch(d: bytes = data, p: ClamdPool = pool) -> None:
                    list(ex.map(lambda _: p.scan(lambda: [d]), range(8)))
                per_s, ms = rate(batch, seconds)
                rows.append((label, "pool x8 threads", per_s * 8, ms / 8))
        ps.close()
        print(f"{'case':8} {'how':16} {'per second':>11} {'mean ms':>9}")
        for what, how, per_s, ms in rows:
            print(f"{what:8} {how:16} {per_s:11.0f} {ms:9.3f}")
    finally:
        c.stop()


if __name__ == "__main__":
    main()
