"""A small clamd client: INSTREAM over TCP or a UNIX socket, with failover.

Why our own: the PyPI ``clamd`` package is unmaintained (last release 2014),
hides size-limit replies and has no timeouts per scan or failover; what we
need is a hundred lines of socket code we can test against a real clamd.

Protocol (clamd(8)): commands are sent ``z``-prefixed and NUL-terminated
(``zINSTREAM\\0``); INSTREAM data follows as chunks, each preceded by its
length as a 4-byte big-endian integer, and a zero-length chunk ends it.
clamd answers one NUL-terminated line: ``stream: OK``, ``stream: NAME FOUND``,
``... ERROR``, or ``INSTREAM size limit exceeded. ERROR`` when the stream
passed its ``StreamMaxLength`` (after which it stops reading and closes).
With ``AlertExceedsMax yes`` a message clamd stopped looking into comes back
as ``stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND`` (or MaxFiles,
MaxScanSize...): that is :attr:`Status.LIMITS`, not a virus and not clean.

Connections: one fresh connection per scan.  A loopback connect costs tens
of microseconds against milliseconds for the scan itself (see the README's
measurements), while IDSESSION would add request ids, idle-timeout races
(clamd closes idle sessions after ``IdleTimeout``) and per-thread state; so
the simple form wins.

Failover (the clamav-milter connection pool, made lazy): addresses are tried
round-robin.  One that cannot be reached, hangs up or times out is marked
dead for ``cooldown`` seconds and skipped; once the cool-down is over, the
next scan first sends it a ``PING`` and uses it again only on ``PONG``.  No
background thread: health is checked when a scan needs it, which costs
nothing while everything works.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import attrs

from miltermonkey_av.errors import (
    EngineProtocolError,
    EngineReportedError,
    EngineUnavailable,
    ScanError,
    ScanTimeout,
)
from miltermonkey_av.result import ScanResult, Status, classify_found

#: clamd's default TCP port.
DEFAULT_PORT = 3310
#: Bytes per INSTREAM chunk.  clamd accepts any size up to StreamMaxLength;
#: 64 KiB matches the MTA's body chunks and keeps memory flat.
CHUNK_SIZE = 65536
#: A clamd reply is one short line; anything longer is not clamd.
MAX_REPLY = 65536

_FOUND = re.compile(r"^(?:\d+: )?(?:stream|[^:]*): (?P<name>.+) FOUND$")
_OK = re.compile(r"^(?:\d+: )?(?:stream|[^:]*): OK$")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?$")


@attrs.frozen
class ClamdAddress:
    """Where a clamd listens: a UNIX socket path or a TCP host and port."""

    family: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, spec: str) -> ClamdAddress:
        """Read ``unix:/path``, ``/path``, ``tcp:host:port``, ``host:port`` or ``[v6]:port``.

        These are clamav-milter's ``ClamdSocket`` forms plus the bare ones
        people type.  libmilter's ``inet:port@host`` is refused with a hint,
        because there the number comes first and a silent misreading would
        send every scan to the wrong port.
        """
        s = spec.strip()
        if not s:
            raise ValueError("empty clamd address")
        lower = s.lower()
        for prefix in ("unix:", "local:"):
            if lower.startswith(prefix):
                path = s[len(prefix):]
                if not path.startswith("/"):
                    raise ValueError(f"clamd address {spec!r}: a UNIX socket path must be "
                                     "absolute (unix:/run/clamav/clamd.ctl)")
                return cls("unix", path=path)
        if s.startswith("/"):
            return cls("unix", path=s)
        if lower.startswith("inet:") and "@" in s:
            raise ValueError(f"clamd address {spec!r} looks like libmilter's inet:PORT@HOST; "
                             "write tcp:HOST:PORT")
        for prefix in ("tcp:", "inet:"):
            if lower.startswith(prefix):
                s = s[len(prefix):]
                break
        m = _HOST_PORT.match(s)
        if not m:
            raise ValueError(f"clamd address {spec!r}: expected unix:/path, tcp:host:port "
                             "or host:port")
        host = m.group("v6") or m.group("host")
        port = int(m.group("port")) if m.group("port") else DEFAULT_PORT
        if not 0 < port < 65536:
            raise ValueError(f"clamd address {spec!r}: port {port} out of range")
        return cls("tcp", host=host, port=port)

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_reply(text: str) -> tuple[Status, str]:
    """Classify one clamd reply line: ``(status, virus name or "")``.

    Raises :class:`EngineReportedError` for a clamd ``ERROR`` about this
    message and :class:`EngineProtocolError` for anything unknown: a reply
    this client cannot read is never taken for "clean".
    """
    text = text.strip()
    if "size limit exceeded" in text:
        return Status.TOO_LARGE, ""
    if _OK.match(text):
        return Status.CLEAN, ""
    m = _FOUND.match(text)
    if m:
        name = m.group("name").strip()
        return classify_found((name,))[0], name
    if text.endswith("ERROR"):
        raise EngineReportedError(f"clamd reported: {text}")
    raise EngineProtocolError(f"unexpected clamd reply: {text[:200]!r}")


def rechunk(pieces: Iterable[bytes], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Re-cut a byte stream into chunks of exactly ``size`` bytes (the last one shorter).

    The message arrives as one header block and 64 KiB body pieces; a fixed
    chunk size keeps each INSTREAM frame bounded whatever the source gives.
    """
    buf = bytearray()
    for piece in pieces:
        if not piece:
            continue
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


class ClamdClient:
    """Talks to one clamd.  Thread-safe: every call uses its own connection."""

    def __init__(self, address: ClamdAddress | str, connect_timeout: float = 5.0,
                 timeout: float = 60.0) -> None:
        self.address = address if isinstance(address, ClamdAddress) else ClamdAddress.parse(
            address)
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ClamdClient({str(self.address)!r})"

    # --- plumbing ------------------------------------------------------------------------

    def _connect(self, deadline: float) -> socket.socket:
        limit = min(self.connect_timeout, max(0.001, deadline - time.monotonic()))
        a = self.address
        try:
            if a.family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(limit)
                    sock.connect(a.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((a.host, a.port), timeout=limit)
                # INSTREAM is write, write, ..., read: without NODELAY the last
                # small frame can wait for a delayed ACK (40 ms on Linux).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError as e:
            raise EngineUnavailable(f"clamd {a}: connect timed out after {limit:g} s") from e
        except OSError as e:
            raise EngineUnavailable(f"clamd {a}: cannot connect: {e.strerror or e}") from e
        return sock

    def _settimeout(self, sock: socket.socket, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ScanTimeout(f"clamd {self.address}: no answer within {self.timeout:g} s")
        sock.settimeout(left)

    def _read_reply(self, sock: socket.socket, deadline: float) -> str:
        reply = bytearray()
        while b"\0" not in reply:
            self._settimeout(sock, deadline)
            try:
                data = sock.recv(4096)
            except TimeoutError as e:
                raise ScanTimeout(
                    f"clamd {self.address}: no answer within {self.timeout:g} s") from e
            except OSError as e:
                raise EngineProtocolError(
                    f"clamd {self.address}: connection lost while reading the reply: "
                    f"{e.strerror or e}") from e
            if not data:
                break
            reply += data
            if len(reply) > MAX_REPLY:
                raise EngineProtocolError(f"clamd {self.address}: reply too long")
        if not reply:
            raise EngineProtocolError(f"clamd {self.address}: closed the connection "
                                      "without a reply")
        return reply.split(b"\0", 1)[0].decode("utf-8", "replace").strip()

    def open_instream(self, deadline: float) -> socket.socket:
        """A connection that has sent ``zINSTREAM``, for a caller that frames the data itself
        (the brain's body stream, :mod:`miltermonkey_av.stream`)."""
        sock = self._connect(deadline)
        try:
            self._settimeout(sock, deadline)
            sock.sendall(b"zINSTREAM\0")
        except TimeoutError as e:
            sock.close()
            raise ScanTimeout(f"clamd {self.address}: INSTREAM not accepted") from e
        except OSError as e:
            sock.close()
            raise EngineProtocolError(f"clamd {self.address}: INSTREAM: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            raise
        return sock

    def read_reply(self, sock: socket.socket, deadline: float) -> str:
        """clamd's one NUL-terminated reply line on ``sock``, read until ``deadline``."""
        return self._read_reply(sock, deadline)

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    # --- commands ------------------------------------------------------------------------

    def command(self, name: str, timeout: float | None = None) -> str:
        """Send one simple command (``PING``, ``VERSION``) and return the reply line."""
        deadline = self._deadline(timeout)
        with self._connect(deadline) as sock:
            try:
                self._settimeout(sock, deadline)
                sock.sendall(b"z" + name.encode("ascii") + b"\0")
            except TimeoutError as e:
                raise ScanTimeout(f"clamd {self.address}: {name} timed out") from e
            except OSError as e:
                raise EngineProtocolError(f"clamd {self.address}: {name}: {e}") from e
            return self._read_reply(sock, deadline)

    def ping(self, timeout: float | None = None) -> bool:
        """True if clamd answers ``PONG``; never raises."""
        try:
            return self.command("PING", timeout) == "PONG"
        except ScanError:
            return False

    def version(self, timeout: float | None = None) -> str:
        return self.command("VERSION", timeout)

    def instream(self, pieces: Iterable[bytes], timeout: float | None = None,
                 deadline: float | None = None) -> ScanResult:
        """Scan a byte stream; ``deadline`` (monotonic) bounds the whole call.

        Returns CLEAN, INFECTED or TOO_LARGE; raises :class:`ScanError`
        subclasses for everything else.
        """
        t0 = time.monotonic()
        if deadline is None:
            deadline = self._deadline(timeout)
        with self._connect(deadline) as sock:
            early: str | None = None
            try:
                self._settimeout(sock, deadline)
                sock.sendall(b"zINSTREAM\0")
                for chunk in rechunk(pieces):
                    self._settimeout(sock, deadline)
                    sock.sendall(len(chunk).to_bytes(4, "big") + chunk)
                    # clamd answers early (size limit, error) and then closes;
                    # read that answer now, before a reset can destroy it.
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:
                        early = self._read_reply(sock, deadline)
                        break
                else:
                    self._settimeout(sock, deadline)
                    sock.sendall(b"\0\0\0\0")
            except TimeoutError as e:
                raise ScanTimeout(
                    f"clamd {self.address}: stream not accepted within {self.timeout:g} s"
                ) from e
            except OSError as e:
                # clamd stopped reading; its reply may still be in our buffer.
                try:
                    early = self._read_reply(sock, min(deadline, time.monotonic() + 1.0))
                except ScanError:
                    raise EngineProtocolError(
                        f"clamd {self.address}: connection lost while sending: "
                        f"{e.strerror or e}") from e
            text = early if early is not None else self._read_reply(sock, deadline)
        status, name = parse_reply(text)
        return ScanResult(status, (name,) if name else (), f"clamd {self.address}",
                          time.monotonic() - t0, text)


@attrs.define
class _Slot:
    client: ClamdClient
    #: monotonic time until which this address is skipped; 0 = healthy.
    dead_until: float = 0.0
    #: Set while dead: the next use must PING first.
    suspect: bool = False
    last_error: str = ""


class ClamdPool:
    """Several clamd addresses with round-robin, failover and cool-down.

    Thread-safe; ``clock`` is injectable so tests can move time.
    """

    def __init__(
        self,
        addresses: Sequence[ClamdAddress | str],
        *,
        connect_timeout: float = 5.0,
        timeout: float = 60.0,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("no clamd address given")
        self.slots = [_Slot(ClamdClient(a, connect_timeout, timeout)) for a in addresses]
        self.timeout = timeout
        self.cooldown = cooldown
        self.clock = clock
        self.on_event = on_event or (lambda level, msg: None)
        self._lock = threading.Lock()
        self._next = 0

    @property
    def addresses(self) -> list[str]:
        return [str(s.client.address) for s in self.slots]

    def healthy(self) -> list[str]:
        """Addresses not in cool-down right now."""
        now = self.clock()
        return [str(s.client.address) for s in self.slots if s.dead_until <= now]

    @property
    def clients(self) -> list[ClamdClient]:
        return [s.client for s in self.slots]

    def healthy_clients(self) -> list[ClamdClient]:
        """Addresses neither in cool-down nor waiting for a PING, in configured order."""
        now = self.clock()
        return [s.client for s in self.slots if s.dead_until <= now and not s.suspect]

    def next_healthy(self) -> ClamdClient | None:
        """The next healthy address in the round-robin, or None when none is."""
        now = self.clock()
        return next((s.client for s in self._order() if s.dead_until <= now and not s.suspect),
                    None)

    def mark_failed(self, client: ClamdClient, why: str) -> None:
        """A failure seen outside :meth:`scan` (a body stream): the address cools down."""
        for slot in self.slots:
            if slot.client is client:
                self._mark_dead(slot, why)

    def _order(self) -> list[_Slot]:
        """Round-robin start; addresses in cool-down go last (a last resort, probed first)."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.slots)
        rotated = self.slots[start:] + self.slots[:start]
        now = self.clock()
        return ([s for s in rotated if s.dead_until <= now]
                + [s for s in rotated if s.dead_until > now])

    def _mark_dead(self, slot: _Slot, why: str) -> None:
        with self._lock:
            was_alive = not slot.suspect
            slot.dead_until = self.clock() + self.cooldown
            slot.suspect = True
            slot.last_error = why
        if was_alive:
            self.on_event("warning", f"{why}; skipping clamd {slot.client.address} "
                                     f"for {self.cooldown:g} s")

    def _mark_alive(self, slot: _Slot) -> None:
        with self._lock:
            was_dead = slot.suspect
            slot.dead_until = 0.0
            slot.suspect = False
        if was_dead:
            self.on_event("info", f"clamd {slot.client.address} answers PING again")

    def scan(self, stream: Callable[[], Iterable[bytes]],
             timeout: float | None = None) -> ScanResult:
        """Scan what ``stream()`` yields (called again for each attempt) on the first
        clamd that can; raise :class:`EngineUnavailable` if none could."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        errors: list[str] = []
        for slot in self._order():
            if time.monotonic() >= deadline:
                raise ScanTimeout("scan time budget spent trying clamd addresses: "
                                  + "; ".join(errors))
            if slot.suspect:
                left = deadline - time.monotonic()
                if not slot.client.ping(min(slot.client.connect_timeout, left)):
                    self._mark_dead(slot, f"clamd {slot.client.address} does not answer PING")
                    errors.append(f"{slot.client.address}: no PONG")
                    continue
                self._mark_alive(slot)
            try:
                return slot.client.instream(stream(), deadline=deadline)
            except ScanTimeout as e:
                self._mark_dead(slot, str(e))
                raise
            except EngineReportedError as e:
                # It answered: alive, but could not scan this one; another may.
                errors.append(str(e))
                continue
            except ScanError as e:
                self._mark_dead(slot, str(e))
                errors.append(str(e))
                continue
        raise EngineUnavailable("no clamd could scan the message: " + "; ".join(errors))
