"""The daemon: socket, worker pool, idle-state sweeping, pid file and shutdown.

Threads: libmilter runs one thread per MTA connection for the protocol.  The
brain chain at end of message runs on a separate pool of ``threads`` worker
threads, which is the seed's cap on messages processed at once; a connection
thread waits for its message's result and keeps the MTA patient with
SMFIR_PROGRESS.  A worker retires after ``jobsperthread`` messages and a new
one takes its place, so what brains keep per thread (``threading.local``
engine connections, caches) is rebuilt regularly: the Python meaning of the
seed's "sent home" threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import milter

from miltermonkey_core.adapter import MilterAdapter, set_nodelay_on_listeners, wait_with_progress
from miltermonkey_core.dispatch import policy_verdict
from miltermonkey_core.engine import Decision, Engine, EngineSettings, Session
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, queue_id, setup_logging
from miltermonkey_core.monkey import Monkey

log = logging.getLogger(f"{ROOT}.daemon")


# --- the end-of-message worker pool ----------------------------------------------------


class Job:
    __slots__ = ("error", "event", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


class WorkerPool:
    """``size`` threads; each retires after ``jobs_per_thread`` jobs and is replaced."""

    def __init__(self, size: int, jobs_per_thread: int, name: str = "mm-worker") -> None:
        self.size = max(1, size)
        self.jobs_per_thread = max(1, jobs_per_thread)
        self.name = name
        self._q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._serial = 0
        self.retired = 0
        self.running = True
        self._threads: set[threading.Thread] = set()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._serial += 1
            t = threading.Thread(target=self._work, name=f"{self.name}-{self._serial}",
                                 daemon=True)
            self._threads.add(t)
        t.start()

    def _work(self) -> None:
        done = 0
        me = threading.current_thread()
        while True:
            job = self._q.get()
            if job is None:
                break
            try:
                job.result = job.fn()
            except BaseException as e:
                job.error = e
            finally:
                job.event.set()
            done += 1
            if done >= self.jobs_per_thread and self.running:
                with self._lock:
                    self.retired += 1
                self._spawn()
                break
        with self._lock:
            self._threads.discard(me)

    def submit(self, fn: Callable[[], Any]) -> Job:
        job = Job(fn)
        self._q.put(job)
        return job

    def shutdown(self, timeout: float = 5.0) -> None:
        self.running = False
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._q.put(None)
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))

    @property
    def alive(self) -> int:
        with self._lock:
            return len(self._threads)


# --- sessions and cid_timeout -------------------------------------------------------------


class SessionRegistry:
    """Live sessions, so per-message state idle longer than cid_timeout can be swept."""

    def __init__(self, cid_timeout: float) -> None:
        self.cid_timeout = cid_timeout
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self.swept = 0

    def add(self, s: Session) -> None:
        with self._lock:
            self._sessions[id(s)] = s

    def remove(self, s: Session) -> None:
        with self._lock:
            self._sessions.pop(id(s), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def sweep(self, now: float | None = None) -> int:
        """Free sessions idle past cid_timeout; libmilter's own timeout closes the socket."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if now - s.last_activity > self.cid_timeout]
            for s in stale:
                self._sessions.pop(id(s), None)
        for s in stale:
            with queue_id(s.qid):
                log.warning("freeing state of session %s idle for %.0f s (cid_timeout %d)",
                            s.connection.id, now - s.last_activity, self.cid_timeout)
            try:
                s.close()
            except Exception:
                log.exception("error freeing session %s", s.connection.id)
        self.swept += len(stale)
        return len(stale)


# --- sockets --------------------------------------------------------------------------------


@attrs.frozen
class SocketSpec:
    family: str  # inet | inet6 | unix
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def libmilter(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}@{self.host}"


def parse_connection(spec: str) -> SocketSpec:
    """Parse libmilter (``inet:PORT@HOST``) or Postfix (``inet:HOST:PORT``) syntax."""
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind in ("unix", "local"):
        return SocketSpec("unix", path=rest)
    if kind not in ("inet", "inet6"):
        raise MonkeyError(f"connection {spec!r}: use inet:PORT@HOST, inet6:PORT@HOST "
                          "or unix:/path")
    if "@" in rest:
        port, _, host = rest.partition("@")
    elif rest.count(":") == 1 and kind == "inet":
        host, _, port = rest.partition(":")
    else:
        port, host = rest, ("127.0.0.1" if kind == "inet" else "::1")
    try:
        p = int(port)
    except ValueError:
        raise MonkeyError(f"connection {spec!r}: port {port!r} is not a number") from None
    return SocketSpec(kind, host=host or "127.0.0.1", port=p)


def prepare_unix_socket(path: str) -> None:
    """Remove a stale socket file, but never steal one a live milter still serves."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        p.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(p.lstat().st_mode):
        raise MonkeyError(f"{path} exists and is not a socket; refusing to remove it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
    except OSError:
        log.info("removing stale socket %s", path)
        p.unlink()
    else:
        raise MonkeyError(f"another process is listening on {path}; stop it first")
    finally:
        s.close()


def secure_unix_socket(path: str, mode: int, group: str | None) -> None:
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise MonkeyError(f"socket_group {group!r} does not exist") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)


# --- pid file -------------------------------------------------------------------------------


def write_pidfile(path: str) -> None:
    """Write our pid, refusing to clobber the pid file of a live monkey."""
    p = Path(path)
    if p.exists():
        try:
            old = int(p.read_text().split()[0])
            os.kill(old, 0)
        except (ValueError, IndexError, ProcessLookupError):
            p.unlink()
        except PermissionError:
            raise MonkeyError(f"pid file {path} belongs to a running process") from None
        else:
            if old != os.getpid():
                raise MonkeyError(f"pid file {path}: MilterMonkey already runs as pid {old}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pidfile(path: str | None) -> None:
    if not path:
        return
    with contextlib.suppress(OSError, ValueError):
        if int(Path(path).read_text().split()[0]) == os.getpid():
            os.unlink(path)


# --- the daemon -------------------------------------------------------------------------------


class Daemon:
    """Build everything from a config, then serve until stopped."""

    def __init__(self, config: Any) -> None:
        from miltermonkey_core.plugins import build_chain

        self.config = config
        d = config.daemon
        self.socket = parse_connection(d.connection)
        self.monkey = Monkey.from_config(d, config)
        key = None
        if d.milter_key:
            from miltermonkey_core.milterkey import KeyService

            key = KeyService.from_config(config)
        chain = build_chain(config, self.monkey)
        self.engine = Engine(
            chain,
            self.monkey,
            EngineSettings(spool_threshold=d.spool_threshold, tmpdir=d.tmpdir,
                           max_message_size=d.max_message_size),
            key=key,
        )
        self.pool = WorkerPool(d.threads, d.jobsperthread)
        self.registry = SessionRegistry(d.cid_timeout)
        use_nr = {"always": True, "never": False}.get(d.noreply, self.socket.family == "unix")
        self.adapter = MilterAdapter(self.engine, use_noreply=use_nr, run_eom=self.run_eom,
                                     registry=self.registry)
        self._stop = threading.Event()

    # --- end of message on the pool ----------------------------------------------------

    def run_eom(self, session: Session, allowed: frozenset[str], ctx: Any) -> Decision:
        """Run the chain on a worker; keep the MTA waiting with progress; bound the time."""
        d = self.config.daemon
        current: list[str] = ["core"]
        qid = session.qid

        def work() -> Decision:
            with queue_id(qid):
                return session.eom(allowed, on_brain=current.append)

        job = self.pool.submit(work)
        deadline = time.monotonic() + d.eom_timeout
        if ctx is None:
            finished = job.wait(d.eom_timeout)
        else:
            finished = wait_with_progress(job.wait, ctx, d.progress_interval, deadline)
        if not finished:
            brain = current[-1]
            slot = next((s for s in self.engine.chain.slots if s.name == brain), None)
            policy = slot.on_error if slot else d.on_error
            log.error("%s: brain %s still running after eom_timeout %.0f s; policy %s",
                      session.qid, brain, d.eom_timeout, policy)
            from miltermonkey_core.context import MilterContext

            v = policy_verdict(policy if policy in ("tempfail", "reject") else "tempfail",
                               brain, "timeout")
            return Decision(v, MilterContext(session.ensure_message(), allowed), [])
        if job.error is not None:
            log.error("%s: internal error at end of message: %r", session.qid, job.error)
            v = policy_verdict("tempfail", "core", "internal error")
            return Decision(v, MilterContext(session.ensure_message(), allowed), [])
        result: Decision = job.result
        return result

    # --- lifecycle -----------------------------------------------------------------------

    def _janitor(self) -> None:
        interval = max(1.0, min(60.0, self.registry.cid_timeout / 4))
        while not self._stop.wait(interval):
            self.registry.sweep()

    def serve(self) -> int:
        d = self.config.daemon
        sock = self.socket
        self.adapter.install(d.miltername, sock.libmilter, d.milter_timeout)
        old_umask = None
        if sock.family == "unix":
            prepare_unix_socket(sock.path)
            old_umask = os.umask(0o777 & ~int(d.socket_mode, 8))
        try:
            milter.opensocket(True)
        except milter.error as e:
            raise MonkeyError(f"cannot open {d.connection}: {e} (is the port in use?)") from e
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if sock.family == "unix":
            secure_unix_socket(sock.path, int(d.socket_mode, 8), d.socket_group)
        else:
            set_nodelay_on_listeners()
        if d.pidfile:
            write_pidfile(d.pidfile)
        janitor = threading.Thread(target=self._janitor, name="mm-janitor", daemon=True)
        janitor.start()
        log.info("%s listening on %s with brains: %s (threads=%d, jobsperthread=%d)",
                 d.miltername, sock.libmilter, ", ".join(self.engine.chain.names) or "none",
                 d.threads, d.jobsperthread)
        try:
            milter.main()
        finally:
            self._stop.set()
            self.pool.shutdown()
            self.engine.chain.close()
            remove_pidfile(d.pidfile)
            if sock.family == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(sock.path)
            log.info("%s stopped", d.miltername)
        return 0


def run(config: Any) -> int:
    """Start the monkey with ``config`` and serve until SIGTERM/SIGINT (libmilter's)."""
    d = config.daemon
    setup_logging(target=d.log_target, debug_level=d.debug_level, debug_mode=d.debug_mode,
                  name=d.miltername)
    try:
        daemon = Daemon(config)
        # libmilter handles SIGTERM/SIGINT/SIGHUP in its own thread; Python must not.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        return daemon.serve()
    except MonkeyError as e:
        log.error("%s", e)
        print(f"miltermonkey: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"miltermonkey: {d.connection}: address in use", file=sys.stderr)
            return 1
        raise
