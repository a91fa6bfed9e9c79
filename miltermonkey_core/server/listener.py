"""The listening socket: MTA connections accepted within bounds, each on its own thread.

A milter host is a server on a network, and its clients are not always
MTAs.  So what one connection can hold is bounded (the stage timeouts of
:class:`~miltermonkey_core.milter.connection.Timeouts`) and so is what all
of them together can hold:

* **a connection cap** (``max_connections``, by default sized from the
  open-file limit, which the daemon raises to its hard limit at start): a
  connection over the cap is closed at once, with a rate-limited warning,
  instead of taking a thread and a file descriptor the real MTAs need;
* **a cap on connections that have not negotiated yet**: an MTA negotiates
  within milliseconds of connecting, so when too many connections sit
  before negotiation (idle sockets, a length prefix and nothing more), the
  oldest is closed to make room: a flood of stalled clients cannot lock
  the MTAs out even below the connection cap.  A connection whose whole
  OPTNEG is already waiting to be read is an MTA whose thread has not run
  yet, not a stalled client: it is passed over;
* **running out of file descriptors** is logged (rate-limited), never silent:
  a reserved descriptor is given up to accept and close the waiting
  connection, so the listener neither spins nor starves.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import queue
import resource
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable

import attrs

from miltermonkey_core.config.endpoint import Endpoint
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT
from miltermonkey_core.milter.connection import ConnectionHost, MilterConnection, Timeouts
from miltermonkey_core.server.sockets import (
    prepare_unix_socket,
    secure_unix_socket,
    socket_identity,
)

log = logging.getLogger(f"{ROOT}.listener")

#: Descriptors kept free for everything but MTA connections (logs, temp files,
#: engine sockets per worker thread, the control socket).
FD_RESERVE_BASE = 64
FD_RESERVE_PER_THREAD = 4
#: The automatic connection cap never goes above this (one thread each).
MAX_AUTO_CONNECTIONS = 4096
#: Connection threads kept waiting for the next connection when theirs ends:
#: starting a thread costs more than a whole message on the trivial brain.
MAX_IDLE_THREADS = 64
#: Length prefix, command byte and the three words of an MTA's OPTNEG.
OPTNEG_BYTES = 4 + 1 + 12
#: Unnegotiated connections looked at, oldest first, for one to close.
EVICTION_SCAN = 16


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft)


def connection_cap(configured: int, open_files: int, threads: int) -> int:
    """``max_connections``, or when 0 what the open-file limit leaves for MTAs."""
    if configured > 0:
        return configured
    spare = open_files - FD_RESERVE_BASE - FD_RESERVE_PER_THREAD * threads
    return max(8, min(MAX_AUTO_CONNECTIONS, spare))


class RateLimitedLog:
    """A warning written at most once per ``interval`` seconds, with a count of the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            msg += f" (and {suppressed} more like it in the last {self.interval:g} s)"
        self.logger.log(level, msg, *args)


@attrs.define
class ListenerStats:
    """What the listener did, for logs, status and metrics."""

    accepted: int = 0
    refused_over_cap: int = 0
    evicted_unnegotiated: int = 0
    out_of_files: int = 0


class Listener:
    """Binds the milter socket and runs accepted connections until stopped."""

    def __init__(self, endpoint: Endpoint, host: ConnectionHost, timeouts: Timeouts, *,
                 max_connections: int, max_unnegotiated: int | None = None,
                 socket_mode: int = 0o660, socket_group: str | None = None,
                 backlog: int = 128) -> None:
        self.endpoint = endpoint
        self.host = host
        self.timeouts = timeouts
        self.max_connections = max(1, max_connections)
        self.max_unnegotiated = max_unnegotiated if max_unnegotiated is not None else max(
            8, min(256, self.max_connections // 8))
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.backlog = backlog
        self.stats = ListenerStats()
        self.socket_ident: tuple[int, int] | None = None
        self._sock: socket.socket | None = None
        self._reserve: int | None = None
        self._conns: set[MilterConnection] = set()
        self._unnegotiated: collections.OrderedDict[MilterConnection, None] = (
            collections.OrderedDict())
        self._lock = threading.Lock()
        self._handoff: queue.SimpleQueue[MilterConnection | None] = queue.SimpleQueue()
        self._idle_threads = 0
        self._thread_serial = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._warn = RateLimitedLog(log)
        self._warn_files = RateLimitedLog(log)

    # --- binding ------------------------------------------------------------------------

    def bind(self) -> None:
        """Open the socket; raises MonkeyError naming the problem (port in use, say)."""
        ep = self.endpoint
        try:
            if ep.family == "unix":
                self._sock = self._bind_unix(ep.unix_path)
            else:
                self._sock = self._bind_inet(ep)
        except OSError as e:
            raise MonkeyError(f"cannot open {ep.spec}: {e.strerror or e}"
                              + (" (is the port in use?)" if e.errno == errno.EADDRINUSE
                                 else "")) from e
        self._reserve = os.open(os.devnull, os.O_RDONLY)

    def _bind_inet(self, ep: Endpoint) -> socket.socket:
        family = socket.AF_INET6 if ep.family == "inet6" else socket.AF_INET
        host = ep.host or ("::" if family == socket.AF_INET6 else "0.0.0.0")  # noqa: S104 - the seed's inet:PORT listens on every interface
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Linux copies TCP_NODELAY to every accepted connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, ep.port or 0))
            sock.listen(self.backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        prepare_unix_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~self.socket_mode)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        self.socket_ident = socket_identity(path)
        try:
            secure_unix_socket(path, self.socket_mode, self.socket_group)
            sock.listen(self.backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    # --- serving ------------------------------------------------------------------------

    def start(self) -> None:
        """Accept on a thread of its own until :meth:`stop`."""
        self._thread = threading.Thread(target=self._accept_loop, name="mm-listener",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        sock.settimeout(0.5)
        tcp = self.endpoint.family != "unix"
        while not self._stopping.is_set():
            try:
                client, address = sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._out_of_files(sock, e)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    continue
                log.error("accepting a connection failed: %s", e)
                time.sleep(0.1)
                continue
            self._admit(client, address, tcp)

    def _out_of_files(self, sock: socket.socket, error: OSError) -> None:
        """No descriptor for the waiting connection: free the reserved one, accept and close."""
        self.stats.out_of_files += 1
        self._warn_files(logging.ERROR, "out of file descriptors (%s) with %d connection(s) "
                         "open; refusing new connections until some close (raise the open-file "
                         "limit or lower max_connections)", error.strerror, len(self._conns))
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        with contextlib.suppress(OSError):
            client, _ = sock.accept()
            client.close()
        with contextlib.suppress(OSError):
            self._reserve = os.open(os.devnull, os.O_RDONLY)
        time.sleep(0.05)

    def _admit(self, client: socket.socket, address: object, tcp: bool) -> None:
        self.stats.accepted += 1
        peer = _peer(address)
        with self._lock:
            over = len(self._conns) >= self.max_connections
            evict = None
            if not over and len(self._unnegotiated) >= self.max_unnegotiated:
                evict = self._stalled()
                del self._unnegotiated[evict]
        if over:
            self.stats.refused_over_cap += 1
            self._warn(logging.WARNING, "connection from %s refused: %d connections open, the "
                       "cap (max_connections) is %d", peer, len(self._conns),
                       self.max_connections)
            with contextlib.suppress(OSError):
                client.close()
            return
        if evict is not None:
            self.stats.evicted_unnegotiated += 1
            self._warn(logging.WARNING, "%d connections have not negotiated; closing the "
                       "oldest (%s, connected %.1f s ago) to make room", self.max_unnegotiated,
                       evict.peer, time.monotonic() - evict.started)
            evict.abort_connection()
        client.setblocking(True)
        conn = MilterConnection(client, peer, self.host, self.timeouts, tcp=tcp)
        with self._lock:
            self._conns.add(conn)
            self._unnegotiated[conn] = None
        with self._lock:
            if self._idle_threads:
                self._idle_threads -= 1
                self._handoff.put(conn)
                return
            self._thread_serial += 1
            name = f"mm-conn-{self._thread_serial}"
        try:
            threading.Thread(target=self._handle, args=(conn,), name=name, daemon=True).start()
        except RuntimeError as e:  # can't start new thread
            self._forget(conn)
            conn.close()
            self._warn(logging.ERROR, "cannot start a thread for %s: %s", peer, e)

    def _stalled(self) -> MilterConnection:
        """The oldest unnegotiated connection with no OPTNEG waiting (under the lock)."""
        for conn in itertools.islice(self._unnegotiated, EVICTION_SCAN):
            if _waiting_bytes(conn.sock) < OPTNEG_BYTES:
                return conn
        return next(iter(self._unnegotiated))

    def _handle(self, first: MilterConnection) -> None:
        """Serve connections one after the other, waiting idle between them."""
        conn: MilterConnection | None = first
        while conn is not None:
            try:
                conn.serve()
            finally:
                self._forget(conn)
            with self._lock:
                if self._stopping.is_set() or self._idle_threads >= MAX_IDLE_THREADS:
                    return
                self._idle_threads += 1
            conn = self._handoff.get()

    def _forget(self, conn: MilterConnection) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._unnegotiated.pop(conn, None)

    def negotiated(self, conn: MilterConnection) -> None:
        with self._lock:
            self._unnegotiated.pop(conn, None)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections carry on."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        if self._reserve is not None:
            with contextlib.suppress(OSError):
                os.close(self._reserve)
            self._reserve = None
        with self._lock:
            idle, self._idle_threads = self._idle_threads, 0
        for _ in range(idle):
            self._handoff.put(None)

    def close_all(self, keep: Callable[[MilterConnection], bool] | None = None) -> int:
        """Close every open connection (but those ``keep`` spares); return how many."""
        with self._lock:
            doomed = [c for c in self._conns if keep is None or not keep(c)]
        for conn in doomed:
            conn.abort_connection()
        return len(doomed)


def _waiting_bytes(sock: socket.socket) -> int:
    """Bytes received and not read yet (FIONREAD: never blocks, never consumes)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unix" if not address else str(address)
