"""Load generators: a lean threaded SMTP client and the engines' own protocols.

One message is one transaction on its own connection (connect, EHLO, MAIL,
RCPT, DATA, QUIT), as smtp-source does by default and as an MTA delivering
to another would.  The latency of a message is measured from ``connect()``
to the reply to the final dot: what a sending MTA waits for, milter work
included.  :func:`smtp_session` sends many messages one after another in a
single session instead (MAIL right after the previous message's reply, as
an MTA reusing a cached connection does), timing each from its MAIL to the
reply to its final dot: the milter's cost per message with no connection
set-up around it, and any stall the MTA's writes to the milter meet.

The client is a few syscalls per message over a raw socket (no smtplib), so
it costs little CPU; the benchmark measures that cost and compares it with
Postfix's ``smtp-source`` on the no-milter ceiling.

The "engines alone" baseline asks spamd for a SPAMC/1.5 ``CHECK`` and clamd
for a ``zINSTREAM`` scan through the brains' test clients
(:mod:`miltermonkey_spam.testing` and :mod:`miltermonkey_av.testing`): the
same work a milter asks of them, without any milter or MTA around it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence

import attrs
from miltermonkey_av.testing import instream
from miltermonkey_spam.testing import check

#: spamc's default -s: larger messages are not sent to spamd (the milters use it too).
SPAMC_MAX_SIZE = 500 * 1024


@attrs.define
class Outcome:
    """One request: when it started and ended (perf_counter seconds) and how it went."""

    start: float
    end: float
    ok: bool
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@attrs.define
class LoadResult:
    outcomes: list[Outcome]
    started: float
    finished: float
    #: CPU seconds the load threads used (the client's own cost).
    client_cpu: float

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` (0-100) in seconds, nearest-rank."""
        lat = sorted(o.seconds for o in self.outcomes)
        if not lat:
            return float("nan")
        rank = max(1, min(len(lat), int(-(-q * len(lat) // 100))))
        return lat[rank - 1]


def run_concurrent(count: int, concurrency: int, work: Callable[[int], Outcome]) -> LoadResult:
    """Call ``work(i)`` for i in range(count) from ``concurrency`` threads."""
    next_index = iter(range(count))
    lock = threading.Lock()
    outcomes: list[Outcome | None] = [None] * count
    thread_cpu: list[float] = []

    def worker() -> None:
        cpu0 = time.thread_time()
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    outcomes[i] = work(i)
                except Exception as e:  # a bug in a client must show, not hang the run
                    now = time.perf_counter()
                    outcomes[i] = Outcome(now, now, False, f"client error: {e!r}")
        finally:
            with lock:
                thread_cpu.append(time.thread_time() - cpu0)

    threads = [threading.Thread(target=worker, name=f"load-{n}", daemon=True)
               for n in range(max(1, min(concurrency, count)))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    done = [o for o in outcomes if o is not None]
    # only the load threads' own CPU: the benchmark's samplers run in this process too
    return LoadResult(done, t0, t1, sum(thread_cpu))


# --- SMTP ---------------------------------------------------------------------------------


class SmtpError(Exception):
    def __init__(self, stage: str, reply: bytes) -> None:
        super().__init__(f"{stage}: {reply.decode('utf-8', 'replace').strip()}")
        self.stage = stage
        self.reply = reply


class _Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def reply(self, stage: str) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply; return its code and text."""
        while True:
            # a complete reply ends with a line "NNN text\r\n" (space, not dash, after the code)
            start = 0
            while True:
                end = self.buf.find(b"\r\n", start)
                if end < 0:
                    break
                if end - start >= 3 and self.buf[start + 3 : start + 4] != b"-":
                    text = self.buf[: end + 2]
                    self.buf = self.buf[end + 2 :]
                    try:
                        return int(text[start : start + 3]), text
                    except ValueError:
                        raise SmtpError(stage, text) from None
                start = end + 2
            data = self.sock.recv(65536)
            if not data:
                raise SmtpError(stage, b"connection closed: " + self.buf)
            self.buf += data

    def command(self, stage: str, line: bytes, want: int) -> None:
        self.sock.sendall(line)
        code, text = self.reply(stage)
        if code // 100 != want:
            raise SmtpError(stage, text)


def _open(host: str, port: int, helo: str, timeout: float) -> tuple[socket.socket, _Conn]:
    """Connect, read the banner, say EHLO."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(sock)
        code, text = c.reply("banner")
        if code != 220:
            raise SmtpError("banner", text)
        c.command("ehlo", b"EHLO " + helo.encode() + b"\r\n", 2)
    except BaseException:
        sock.close()
        raise
    return sock, c


def _transaction(c: _Conn, wire: bytes, sender: str, recipient: str) -> tuple[bool, str]:
    """MAIL, RCPT, DATA and the message; (accepted, the refusal if not)."""
    c.command("mail", b"MAIL FROM:<" + sender.encode() + b">\r\n", 2)
    c.command("rcpt", b"RCPT TO:<" + recipient.encode() + b">\r\n", 2)
    c.command("data", b"DATA\r\n", 3)
    c.sock.sendall(wire)
    code, text = c.reply("end of data")
    ok = code // 100 == 2
    return ok, "" if ok else f"end of data: {text.decode().strip()}"


def smtp_send(host: str, port: int, wire: bytes, sender: str, recipient: str,
              helo: str = "client.bench.test", timeout: float = 300.0) -> Outcome:
    """Send one message (already in wire form, see messages.wire_form) in its own session."""
    t0 = time.perf_counter()
    try:
        sock, c = _open(host, port, helo, timeout)
        with sock:
            ok, detail = _transaction(c, wire, sender, recipient)
            t1 = time.perf_counter()
            with contextlib.suppress(OSError, SmtpError):
                c.command("quit", b"QUIT\r\n", 2)
            return Outcome(t0, t1, ok, detail)
    except SmtpError as e:
        return Outcome(t0, time.perf_counter(), False, str(e))
    except OSError as e:
        return Outcome(t0, time.perf_counter(), False, f"socket: {e}")


def smtp_session(host: str, port: int, wires: Sequence[bytes], sender: str, recipient: str,
                 helo: str = "client.bench.test", timeout: float = 300.0) -> LoadResult:
    """Send every message in one SMTP session; one outcome per message, MAIL to final reply.

    A refused command ends that message's transaction with RSET and the
    session goes on; a broken connection fails the messages not yet sent.
    """
    cpu0 = time.thread_time()
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    try:
        sock, c = _open(host, port, helo, timeout)
    except (SmtpError, OSError) as e:
        now = time.perf_counter()
        return LoadResult([Outcome(now, now, False, f"session: {e}") for _ in wires], started,
                          now, time.thread_time() - cpu0)
    with sock:
        for wire in wires:
            t0 = time.perf_counter()
            try:
                ok, detail = _transaction(c, wire, sender, recipient)
                outcomes.append(Outcome(t0, time.perf_counter(), ok, detail))
            except SmtpError as e:
                outcomes.append(Outcome(t0, time.perf_counter(), False, str(e)))
                try:
                    c.command("rset", b"RSET\r\n", 2)
                except (SmtpError, OSError):
                    break
            except OSError as e:
                outcomes.append(Outcome(t0, time.perf_counter(), False, f"socket: {e}"))
                break
        finished = time.perf_counter()
        with contextlib.suppress(OSError, SmtpError):
            c.command("quit", b"QUIT\r\n", 2)
    now = time.perf_counter()
    outcomes += [Outcome(now, now, False, "session ended before this message")
                 for _ in wires[len(outcomes):]]
    return LoadResult(outcomes, started, finished, time.thread_time() - cpu0)


def smtp_load(port: int, wires: Sequence[bytes], concurrency: int, sender: str,
              recipient: str, host: str = "127.0.0.1",
              recipients: Sequence[str] | None = None) -> LoadResult:
    """Every message in its own session; ``recipients[i]``, if given, is message i's RCPT."""
    if recipients is not None and len(recipients) != len(wires):
        raise ValueError("one recipient per message")
    return run_concurrent(len(wires), concurrency, lambda i: smtp_send(
        host, port, wires[i], sender, recipients[i] if recipients is not None else recipient))


# --- clamd (zINSTREAM) -------------------------------------------------------------------


def clamd_instream(address: tuple[str, int], data: bytes, timeout: float = 120.0,
                   chunk: int = 256 * 1024) -> str:
    """One INSTREAM scan; returns clamd's reply, e.g. ``stream: OK``."""
    text = instream(address, data, timeout, chunk)
    if not text.endswith((" OK", " FOUND")):
        raise RuntimeError(f"clamd: {text}")
    return text


def engine_work(kind: str, clamd: tuple[str, int] | None, spamd: tuple[str, int] | None,
                messages: Sequence[bytes]) -> Callable[[int], Outcome]:
    """A ``work(i)`` for run_concurrent: clamd, spamd or both (clamd then spamd) per message.

    Like spamc (and so spamass-milter, MIMEDefang's filter here and the spam
    brain), spamd is not asked about messages over :data:`SPAMC_MAX_SIZE`.
    """

    def work(i: int) -> Outcome:
        msg = messages[i]
        t0 = time.perf_counter()
        try:
            detail = []
            if kind in ("clamd", "both") and clamd is not None:
                detail.append(clamd_instream(clamd, msg))
            if kind in ("spamd", "both") and spamd is not None:
                if len(msg) <= SPAMC_MAX_SIZE:
                    detail.append(check(spamd, msg, timeout=120.0))
                else:
                    detail.append("spamd skipped (over 500 KiB)")
            return Outcome(t0, time.perf_counter(), True, "; ".join(detail))
        except (OSError, RuntimeError) as e:
            return Outcome(t0, time.perf_counter(), False, str(e))

    return work
