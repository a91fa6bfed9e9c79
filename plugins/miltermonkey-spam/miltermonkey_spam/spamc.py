"""A small SPAMC/1.5 client for spamd: blocking sockets, bounded timeouts, failover.

Why our own: spamass-milter forks a ``spamc`` process per message, which costs
a fork and exec for every mail; aiospamc is asyncio-only, while brains run on
the daemon's worker threads and want plain blocking calls with hard time
bounds.  The protocol is small enough to own and test against a real spamd.

The protocol (SpamAssassin's ``spamd/PROTOCOL``)::

    CHECK SPAMC/1.5\\r\\n               <- command; also SYMBOLS, REPORT, HEADERS, PING
    Content-length: 1234\\r\\n          <- exact byte count of the message
    User: alice\\r\\n                   <- optional: whose preferences to use
    \\r\\n
    <the message>

    SPAMD/1.1 0 EX_OK\\r\\n             <- a sysexits code; 0 is success
    Content-length: 68\\r\\n            <- SYMBOLS/REPORT/HEADERS only
    Spam: True ; 1000.0 / 5.0\\r\\n     <- verdict ; score / required
    \\r\\n
    GTUBE,NO_RECEIVED,NO_RELAYS        <- SYMBOLS: rule names; REPORT: report text;
                                          HEADERS: the header block SpamAssassin wrote

**No keep-alive.**  spamd answers exactly one request per connection and then
closes it; SPAMC has no way to ask for another.  Every scan therefore pays one
connect (plus, over TCP, a handshake).  On loopback that is tens of
microseconds against the 50-100 ms spamd spends scoring even a small message,
so a connection pool would buy nothing even if the protocol allowed one; the
package README has the measurements.

**Streaming.**  The message is taken as a callable returning an iterable of
byte chunks plus its exact length, so a large spooled body goes from its
temporary file to the socket 64 KiB at a time and is never copied whole.
Messages up to 64 KiB are sent in one write together with the request
header: two small writes would meet Nagle's algorithm and spamd's delayed
ACK and stall for 40 ms (``TCP_NODELAY`` is set as well).

**Failover.**  Several spamd addresses can be given.  A server that refuses
the connection, cannot be reached, hangs up before answering or answers with
a temporary error (EX_TEMPFAIL, EX_UNAVAILABLE, EX_OSERR, EX_IOERR) is put in
a cool-down for ``cooldown`` seconds and the next one is tried at once.  A
server that accepted the message but does not answer within ``timeout`` is
also put in cool-down, but the message is *not* sent again elsewhere: a scan
that timed out once would most likely time out again and double the wait.
When every server is cooling down, the one whose cool-down ends first is
tried anyway (one probe per request), so recovery is noticed at once while
an outage costs at most one connect timeout per message.

Time bounds: a request takes at most ``connect_timeout`` per server tried
plus ``timeout`` for sending the message and reading the answer.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Literal

import attrs

__all__ = [
    "COMMANDS",
    "DEFAULT_PORT",
    "Payload",
    "PayloadLengthError",
    "ServerStatus",
    "SpamResult",
    "SpamcClient",
    "SpamdAddress",
    "SpamdError",
    "SpamdProtocolError",
    "SpamdReplyError",
    "SpamdTimeout",
    "SpamdUnavailable",
    "parse_header_block",
    "parse_response",
    "parse_spam_header",
]

#: spamd's default TCP port (``spamd -p``).
DEFAULT_PORT: Final = 783
PROTOCOL: Final = "SPAMC/1.5"
#: Commands this client sends.  PROCESS and TELL are left out on purpose: a
#: milter must not take a rewritten message back, and learning is not its job.
COMMANDS: Final = ("CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "HEADERS", "PING")
#: Messages up to this size go out in a single write with the request header.
ONE_WRITE_LIMIT: Final = 65536
#: Chunk size when the message is given as bytes but is larger than that.
CHUNK_SIZE: Final = 65536
DEFAULT_MAX_RESPONSE: Final = 4 * 1024 * 1024

#: sysexits(3) codes spamd answers with (``SPAMD/1.1 <code> <name>``).
EX_OK: Final = 0
EX_UNAVAILABLE: Final = 69
EX_OSERR: Final = 71
EX_IOERR: Final = 74
EX_TEMPFAIL: Final = 75
#: Codes that say "this server cannot do it now", so another may: fail over.
RETRY_ELSEWHERE: Final = frozenset({EX_UNAVAILABLE, EX_OSERR, EX_IOERR, EX_TEMPFAIL})

#: The message to scan: its bytes, or a callable returning its chunks afresh
#: (called again when the request is sent to a second server).
Payload = bytes | Callable[[], Iterable[bytes]]

_STATUS = re.compile(r"^SPAMD/(?P<version>\d+(?:\.\d+)?)\s+(?P<code>\d+)\s*(?P<text>.*)$")
_SPAM = re.compile(
    r"^\s*(?P<verdict>True|False|Yes|No)\s*;\s*(?P<score>-?\d+(?:\.\d+)?)\s*/\s*"
    r"(?P<required>-?\d+(?:\.\d+)?)\s*$",
    re.IGNORECASE,
)
_TOKEN = re.compile(r"^[A-Za-z0-9._@+=/-]+$")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class SpamdError(Exception):
    """spamd gave no usable answer; the brain turns this into its engine-error policy."""


class SpamdUnavailable(SpamdError):
    """No configured spamd could be reached (or each said it cannot serve now)."""

    def __init__(self, message: str, errors: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        #: ``(server, what went wrong)`` for every server tried, in order.
        self.errors = tuple(errors)


class SpamdTimeout(SpamdError):
    """A spamd took the message but did not answer in time."""


class SpamdProtocolError(SpamdError):
    """The answer was not SPAMC/SPAMD as we know it (or was cut short)."""


class SpamdReplyError(SpamdError):
    """spamd answered with a non-zero sysexits code, e.g. ``76 Bad header line``."""

    def __init__(self, code: int, text: str, server: str = "") -> None:
        super().__init__(f"spamd {server} answered {code} {text}".replace("  ", " "))
        self.code = code
        self.text = text
        self.server = server


class PayloadLengthError(ValueError):
    """The message source produced a different number of bytes than announced.

    A programming error, not an engine failure: spamd would wait for the
    missing bytes or read the rest as garbage, so nothing more is sent.
    """


class _FailOver(Exception):
    """Internal: this server cannot serve the request; try the next one."""


# --------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------


@attrs.frozen
class SpamdAddress:
    """Where a spamd listens: TCP ``host:port`` or a UNIX socket path.

    Accepted spellings: ``127.0.0.1``, ``127.0.0.1:783``, ``spamd.example:783``,
    ``[::1]:783``, ``::1``, ``unix:/run/spamd.sock``, ``/run/spamd.sock`` and
    libmilter's ``inet:783@127.0.0.1``.  The port defaults to 783.
    """

    family: Literal["tcp", "unix"]
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""

    @classmethod
    def parse(cls, spec: str | SpamdAddress) -> SpamdAddress:
        if isinstance(spec, SpamdAddress):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a spamd address must be a string, got {spec!r}")
        s = spec.strip()
        if not s:
            raise ValueError("empty spamd address")
        low = s.lower()
        for prefix in ("unix:", "local:"):
            if low.startswith(prefix):
                return cls._unix(s[len(prefix):], spec)
        if s.startswith("/"):
            return cls._unix(s, spec)
        for prefix in ("inet:", "inet6:", "tcp:"):
            if low.startswith(prefix):
                s = s[len(prefix):]
                if "@" in s:  # libmilter style PORT@HOST
                    port_text, _, host = s.partition("@")
                    return cls._tcp(host, port_text, spec)
                break
        if s.startswith("["):
            host, sep, rest = s[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad spamd address {spec!r}: use [IPv6]:PORT")
            return cls._tcp(host, rest[1:] or None, spec)
        if s.count(":") == 1:
            host, _, port_text = s.partition(":")
            return cls._tcp(host, port_text, spec)
        return cls._tcp(s, None, spec)  # a host name, IPv4 or bare IPv6 address

    @classmethod
    def _unix(cls, path: str, spec: str) -> SpamdAddress:
        if not path.startswith("/"):
            raise ValueError(f"bad spamd address {spec!r}: a UNIX socket path must be absolute")
        return cls("unix", path=path)

    @classmethod
    def _tcp(cls, host: str, port_text: str | None, spec: str) -> SpamdAddress:
        host = host.strip()
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"bad spamd address {spec!r}: no usable host name")
        port = DEFAULT_PORT
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"bad spamd address {spec!r}: port must be 1-65535")
            port = int(port_text)
        return cls("tcp", host=host, port=port)

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# --------------------------------------------------------------------------------------
# Results and parsing
# --------------------------------------------------------------------------------------


@attrs.frozen
class SpamResult:
    """What spamd said about one message.

    ``score_text``/``required_text`` keep spamd's own formatting (``-0.0``,
    ``1000.0``) so headers show exactly what SpamAssassin computed.
    """

    command: str
    is_spam: bool
    score: float
    required: float
    score_text: str
    required_text: str
    #: Rule names (SYMBOLS), in spamd's order.
    symbols: tuple[str, ...] = ()
    #: The header block SpamAssassin wrote (HEADERS), as ``(name, value)``;
    #: folded values keep their line breaks as ``"\\n"`` plus the indent.
    headers: tuple[tuple[str, str], ...] = ()
    #: The report text (REPORT, REPORT_IFSPAM).
    report: str = ""
    #: Which server answered, e.g. ``127.0.0.1:783``.
    server: str = ""
    #: The whole request: connect, send, scan, read.
    seconds: float = 0.0
    #: Of that, the connect alone (the price of SPAMC's one-request connections).
    connect_seconds: float = 0.0
    protocol: str = ""

    def header(self, name: str) -> str | None:
        """The first header of that name SpamAssassin wrote (HEADERS), or None."""
        low = name.lower()
        for n, v in self.headers:
            if n.lower() == low:
                return v
        return None


def parse_spam_header(value: str) -> tuple[bool, float, float, str, str]:
    """``True ; 15.3 / 5.0`` -> ``(True, 15.3, 5.0, "15.3", "5.0")``.

    spamd 3.x and 4.x write True/False; protocol 1.0 servers wrote Yes/No.
    """
    m = _SPAM.match(value)
    if m is None:
        raise SpamdProtocolError(f"cannot read spamd's Spam header {value[:120]!r}")
    verdict = m["verdict"].lower() in ("true", "yes")
    return verdict, float(m["score"]), float(m["required"]), m["score"], m["required"]


def parse_header_block(text: str) -> tuple[tuple[str, str], ...]:
    """Split an RFC 5322 header block into ``(name, value)`` pairs.

    Folded lines stay folded (``"\\n"`` plus the continuation's indent), the
    way MTAs hand header values to milters, so a value can be written back
    with its original line breaks.
    """
    out: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            if out:
                break  # end of the header block
            continue
        if line[0] in " \t":
            if out:
                name, value = out[-1]
                out[-1] = (name, f"{value}\n{line}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            continue  # not a header line (e.g. an mbox From_ line)
        out.append((name, value.lstrip(" \t")))
    return tuple(out)


@attrs.frozen
class _Reply:
    protocol: str
    code: int
    text: str
    headers: Mapping[str, str]
    body: bytes


def parse_response(raw: bytes) -> _Reply:
    """Parse a complete spamd answer (status line, headers, body)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    m = _STATUS.match(lines[0].strip())
    if m is None:
        shown = lines[0][:120] if lines[0] else "nothing"
        raise SpamdProtocolError(f"not a spamd answer: {shown!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise SpamdProtocolError(f"bad header line in spamd's answer: {line[:120]!r}")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise SpamdProtocolError(
                f"bad Content-length {headers['content-length']!r}") from None
        if len(body) < n:
            raise SpamdProtocolError(f"answer cut short: {len(body)} of {n} bytes")
        body = body[:n]
    return _Reply(m["version"], int(m["code"]), m["text"].strip(), headers, body)


def _complete(buf: bytes | bytearray) -> bool:
    """Whether a Content-length answer is fully read (else read until spamd closes)."""
    end = buf.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end, sep = buf.find(b"\n\n"), 2
        if end < 0:
            return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", bytes(buf[:end]))
    return m is not None and len(buf) - end - sep >= int(m.group(1))


# --------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------


@attrs.define
class _Server:
    address: SpamdAddress
    down_until: float = 0.0
    failures: int = 0
    last_error: str = ""


@attrs.frozen
class ServerStatus:
    """One server's health as the client sees it (for logs and health checks)."""

    server: str
    up: bool
    failures: int
    last_error: str
    retry_in: float


class SpamcClient:
    """Talks SPAMC/1.5 to one or more spamd servers; safe to share between threads.

    :param servers: addresses (see :class:`SpamdAddress`), in preference order.
    :param connect_timeout: seconds to wait for a connection to one server.
    :param timeout: seconds for sending the message and reading the answer.
    :param cooldown: seconds a failed server is skipped.
    :param balance: ``failover`` uses the first healthy server; ``round_robin``
        spreads requests over all healthy ones.
    :param user: default ``User:`` header (whose SpamAssassin preferences).
    :param max_response: answers larger than this are refused (memory bound).
    """

    def __init__(
        self,
        servers: Sequence[str | SpamdAddress] = (f"127.0.0.1:{DEFAULT_PORT}",),
        *,
        connect_timeout: float = 2.0,
        timeout: float = 60.0,
        cooldown: float = 30.0,
        balance: Literal["failover", "round_robin"] = "failover",
        user: str | None = None,
        max_response: int = DEFAULT_MAX_RESPONSE,
        logger: logging.Logger | None = None,
    ) -> None:
        if not servers:
            raise ValueError("at least one spamd address is needed")
        if connect_timeout <= 0 or timeout <= 0 or cooldown < 0:
            raise ValueError("timeouts must be positive and the cool-down not negative")
        if balance not in ("failover", "round_robin"):
            raise ValueError(f"balance must be failover or round_robin, not {balance!r}")
        self._servers = [_Server(SpamdAddress.parse(s)) for s in servers]
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.cooldown = cooldown
        self.balance = balance
        self.user = check_user(user) if user is not None else None
        self.max_response = max_response
        self.log = logger or logging.getLogger("miltermonkey.spam.spamc")
        self._lock = threading.Lock()
        self._next = 0

    @property
    def servers(self) -> tuple[SpamdAddress, ...]:
        return tuple(s.address for s in self._servers)

    def status(self) -> list[ServerStatus]:
        now = time.monotonic()
        with self._lock:
            return [ServerStatus(str(s.address), s.down_until <= now, s.failures, s.last_error,
                                 max(0.0, s.down_until - now)) for s in self._servers]

    # --- commands -------------------------------------------------------------------

    def ping(self) -> SpamResult:
        """PING the first server that answers; raises :class:`SpamdUnavailable` if none."""
        return self.request("PING", None)

    def check(self, message: Payload, length: int | None = None,
              user: str | None = None) -> SpamResult:
        """Score only (``Spam:`` header): the cheapest answer."""
        return self.request("CHECK", message, length, user)

    def symbols(self, message: Payload, length: int | None = None,
                user: str | None = None) -> SpamResult:
        """Score plus the names of the rules that hit."""
        return self.request("SYMBOLS", message, length, user)

    def report(self, message: Payload, length: int | None = None,
               user: str | None = None) -> SpamResult:
        """Score plus SpamAssassin's human-readable report."""
        return self.request("REPORT", message, length, user)

    def headers(self, message: Payload, length: int | None = None,
                user: str | None = None) -> SpamResult:
        """Score plus the header block SpamAssassin would write (X-Spam-Status ...)."""
        return self.request("HEADERS", message, length, user)

    def request(
        self,
        command: str,
        message: Payload | None,
        length: int | None = None,
        user: str | None = None,
    ) -> SpamResult:
        """Send one command, failing over between servers as described above.

        ``message`` is bytes or a callable returning the chunks (then
        ``length`` is required and must be exact).  ``None`` only for PING.
        """
        command = command.upper()
        if command not in COMMANDS:
            raise ValueError(f"unsupported SPAMC command {command!r}")
        if (message is None) != (command == "PING"):
            raise ValueError("PING takes no message; every other command needs one")
        factory: Callable[[], Iterable[bytes]] | None = None
        if isinstance(message, bytes | bytearray | memoryview):
            data = bytes(message)
            length = len(data) if length is None else length
            factory = lambda: _chunked(data)  # noqa: E731
        elif message is not None:
            if length is None:
                raise ValueError("length is required when the message is given as chunks")
            factory = message
        if length is not None and length < 0:
            raise ValueError("length must not be negative")
        who = check_user(user) if user is not None else self.user
        errors: list[tuple[str, str]] = []
        for server in self._order():
            name = str(server.address)
            try:
                result = self._attempt(server.address, command, factory, length, who)
            except _FailOver as e:
                self._down(server, str(e))
                errors.append((name, str(e)))
                continue
            except SpamdTimeout as e:
                self._down(server, str(e))
                raise
            self._up(server)
            return result
        detail = "; ".join(f"{s}: {e}" for s, e in errors) or "no server to try"
        raise SpamdUnavailable(f"no spamd answered ({detail})", errors)

    # --- server health ----------------------------------------------------------------

    def _order(self) -> list[_Server]:
        now = time.monotonic()
        with self._lock:
            healthy = [s for s in self._servers if s.down_until <= now]
            cooling = sorted((s for s in self._servers if s.down_until > now),
                             key=lambda s: s.down_until)
            if self.balance == "round_robin" and healthy:
                k = self._next % len(healthy)
                self._next += 1
                healthy = healthy[k:] + healthy[:k]
        return healthy + cooling[:1]

    def _down(self, server: _Server, why: str) -> None:
        with self._lock:
            was_up = server.down_until <= time.monotonic() and server.failures == 0
            server.failures += 1
            server.last_error = why
            server.down_until = time.monotonic() + self.cooldown
        if was_up:
            self.log.warning("spamd %s is down (%s); not used for %g s",
                             server.address, why, self.cooldown)

    def _up(self, server: _Server) -> None:
        with self._lock:
            was_down = server.failures > 0
            server.failures = 0
            server.down_until = 0.0
            server.last_error = ""
        if was_down:
            self.log.warning("spamd %s answers again", server.address)

    # --- one request to one server ------------------------------------------------------

    def _connect(self, address: SpamdAddress, deadline: float) -> socket.socket:
        limit = max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
        try:
            if address.family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(limit)
                    sock.connect(address.path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            sock = socket.create_connection((address.host, address.port), timeout=limit)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            raise _FailOver(f"connect timed out after {limit:g} s") from None
        except OSError as e:
            raise _FailOver(f"cannot connect: {e.strerror or e}") from None

    def _attempt(
        self,
        address: SpamdAddress,
        command: str,
        factory: Callable[[], Iterable[bytes]] | None,
        length: int | None,
        user: str | None,
    ) -> SpamResult:
        t0 = time.monotonic()
        deadline = t0 + self.connect_timeout + self.timeout
        sock = self._connect(address, deadline)
        t_conn = time.monotonic() - t0
        deadline = time.monotonic() + self.timeout
        try:
            head = f"{command} {PROTOCOL}\r\n"
            if length is not None:
                head += f"Content-length: {length}\r\n"
            if user:
                head += f"User: {user}\r\n"
            raw_head = (head + "\r\n").encode("ascii")
            try:
                self._send(sock, raw_head, factory, length, deadline)
            except TimeoutError:
                raise SpamdTimeout(
                    f"spamd {address} did not take the message within {self.timeout:g} s"
                ) from None
            except OSError as e:
                # spamd may have refused early (a reply is waiting) or died.
                early = self._read_quietly(sock, min(deadline, time.monotonic() + 1.0))
                if early:
                    return self._result(address, command, early, t0, t_conn)
                raise _FailOver(f"connection lost while sending: {e.strerror or e}") from None
            try:
                raw = self._read(sock, deadline)
            except TimeoutError:
                raise SpamdTimeout(
                    f"spamd {address} did not answer within {self.timeout:g} s") from None
            except OSError as e:
                raise _FailOver(f"connection lost while reading: {e.strerror or e}") from None
            if not raw:
                raise _FailOver("closed the connection without answering")
            return self._result(address, command, raw, t0, t_conn)
        finally:
            sock.close()

    @staticmethod
    def _send(
        sock: socket.socket,
        head: bytes,
        factory: Callable[[], Iterable[bytes]] | None,
        length: int | None,
        deadline: float,
    ) -> None:
        def arm() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)

        if factory is None or length is None:
            arm()
            sock.sendall(head)
        elif length <= ONE_WRITE_LIMIT:
            data = b"".join(factory())
            if len(data) != length:
                raise PayloadLengthError(
                    f"message source gave {len(data)} bytes, {length} announced")
            arm()
            sock.sendall(head + data)
        else:
            arm()
            sock.sendall(head)
            sent = 0
            for chunk in factory():
                sent += len(chunk)
                if sent > length:
                    raise PayloadLengthError(
                        f"message source gave more than the {length} bytes announced")
                arm()
                sock.sendall(chunk)
            if sent != length:
                raise PayloadLengthError(f"message source gave {sent} bytes, {length} announced")
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)  # tells spamd nothing more is coming

    def _read(self, sock: socket.socket, deadline: float) -> bytes:
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                return bytes(buf)
            buf += data
            if len(buf) > self.max_response:
                raise SpamdProtocolError(
                    f"answer larger than {self.max_response} bytes; not spamd?")
            if _complete(buf):
                return bytes(buf)

    def _read_quietly(self, sock: socket.socket, deadline: float) -> bytes:
        try:
            return self._read(sock, deadline)
        except (OSError, SpamdError):
            return b""

    def _result(
        self, address: SpamdAddress, command: str, raw: bytes, t0: float, t_conn: float,
    ) -> SpamResult:
        try:
            reply = parse_response(raw)
        except SpamdProtocolError as e:
            raise SpamdProtocolError(f"spamd {address}: {e}") from None
        if reply.code != EX_OK:
            if reply.code in RETRY_ELSEWHERE:
                raise _FailOver(f"answered {reply.code} {reply.text}")
            raise SpamdReplyError(reply.code, reply.text, str(address))
        seconds = time.monotonic() - t0
        if command == "PING":
            if not reply.text.upper().startswith("PONG"):
                raise SpamdProtocolError(f"spamd {address}: PING answered {reply.text!r}")
            return SpamResult("PING", False, 0.0, 0.0, "", "", server=str(address),
                              seconds=seconds, connect_seconds=t_conn, protocol=reply.protocol)
        spam = reply.headers.get("spam")
        if spam is None:
            raise SpamdProtocolError(f"spamd {address}: no Spam header in the answer")
        is_spam, score, required, score_text, required_text = parse_spam_header(spam)
        body = reply.body.decode("utf-8", "surrogateescape")
        symbols: tuple[str, ...] = ()
        headers: tuple[tuple[str, str], ...] = ()
        report = ""
        if command == "SYMBOLS":
            symbols = tuple(s.strip() for s in body.replace("\n", ",").split(",") if s.strip())
        elif command == "HEADERS":
            headers = parse_header_block(body)
        elif command in ("REPORT", "REPORT_IFSPAM"):
            report = body
        return SpamResult(command, is_spam, score, required, score_text, required_text,
                          symbols=symbols, headers=headers, report=report, server=str(address),
                          seconds=seconds, connect_seconds=t_conn, protocol=reply.protocol)


def check_user(user: str) -> str:
    """A ``User:`` value must be one token: it is written into the request header."""
    if not isinstance(user, str) or not _TOKEN.match(user):
        raise ValueError(f"spamd user {user!r} must be one word of letters, digits and ._@+=/-")
    return user


def _chunked(data: bytes) -> Iterable[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK_SIZE):
        yield bytes(view[i : i + CHUNK_SIZE])
