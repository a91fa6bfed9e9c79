"""The milter process: socket, worker pool, configuration generations, sweeping, draining.

Threads: libmilter runs one thread per MTA connection for the protocol.  At
end of message that thread walks the brain chain, handing each brain's
``eom_process`` to a pool of ``threads`` worker threads (the seed's cap on
how much judging happens at once) and waiting for it, with SMFIR_PROGRESS
heartbeats every ``progress_interval`` seconds, for at most the brain's
``timeout`` and the message's ``eom_timeout`` in total.  A brain that
overruns cannot be killed (Python threads cannot be): its worker is written
off as stuck, a fresh worker takes its place (up to 4 x ``threads`` stuck
ones, so a hung engine cannot starve the pool nor grow it without bound)
and the brain's policy applies; its circuit breaker soon stops calling it.
A worker retires after ``jobsperthread`` jobs and a new one takes its
place, so what brains keep per thread (``threading.local`` engine
connections, caches) is rebuilt regularly: the Python meaning of the seed's
"sent home" threads.

Lifecycle: the process binds its socket, drops root (``user``/``group``),
builds the brains and serves.  A reload builds a new *generation* (engine
and negotiation plan) for new MTA connections while open ones finish on
theirs.  A stop closes the listener at once (libmilter), lets messages in
progress finish for up to ``shutdown_timeout`` seconds, removes the UNIX
socket and exits.  :mod:`miltermonkey_core.supervisor` runs this process as
its child and drives reloads and stops through a control socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import milter

from miltermonkey_core.config.endpoint import Endpoint
from miltermonkey_core.config.endpoint import parse_connection as parse_endpoint
from miltermonkey_core.engine.build import build_engine
from miltermonkey_core.engine.chain import BrainSlot, BrainTimeout
from miltermonkey_core.engine.session import Decision, Engine, Session
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, queue_id, setup_logging
from miltermonkey_core.milter.adapter import (
    Generation,
    MilterAdapter,
    set_nodelay_on_listeners,
)
from miltermonkey_core.plugins import installed_brains, load_brain_class
from miltermonkey_core.server.pidfile import remove_pidfile, write_pidfile
from miltermonkey_core.server.pool import Job, WorkerPool
from miltermonkey_core.server.privileges import check_writable, drop_privileges, resolve
from miltermonkey_core.server.registry import SessionRegistry
from miltermonkey_core.server.sockets import (
    prepare_unix_socket,
    remove_unix_socket,
    secure_unix_socket,
    socket_identity,
)

log = logging.getLogger(f"{ROOT}.daemon")

#: Seconds to wait for messages in progress at shutdown when the config says nothing.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

#: Daemon options a reload cannot change in a running process (they shape the
#: socket, the process's identity or libmilter's global state): a reload keeps
#: the old values, logs which ones differ, and they apply at the next restart.
RESTART_ONLY = ("connection", "socket_mode", "socket_group", "user", "group", "pidfile",
                "log_target", "debug_mode", "milter_timeout", "miltername", "threads",
                "jobsperthread")


def shutdown_timeout(daemon_config: Any) -> float:
    return float(getattr(daemon_config, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT))


# --- building a configuration -----------------------------------------------------------------


def parse_connection(spec: str) -> Endpoint:
    """The socket to listen on; a bad spelling is a MonkeyError naming the option."""
    try:
        return parse_endpoint(spec)
    except ValueError as e:
        raise MonkeyError(f"connection {spec!r}: {e}") from None


def preload(config: Any) -> None:
    """Import everything building ``config`` needs, while every file is still readable.

    After the switch to ``user`` the Python installation or a brain's
    package may not be readable any more (an interpreter under /root, a
    0750 site-packages); modules already imported need no file.
    """
    installed_brains()
    for entry in config.brains:
        load_brain_class(entry.use)


def _warm_up(config: Any) -> None:
    build_engine(config).close()


#: The signals libmilter takes for itself (SIGHUP and SIGTERM stop the listener,
#: SIGINT aborts); see :func:`block_stop_signals`.
STOP_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


def block_stop_signals() -> None:
    """Block the signals libmilter waits for, before any thread exists.

    libmilter blocks them in ``smfi_main`` and waits for them in a thread of
    its own, but only threads created *after* that inherit the mask: a
    worker thread started earlier would let SIGTERM through to its default
    action, killing the process with no drain.  Blocked here, every thread
    inherits the mask and libmilter's ``sigwait`` gets the signal.
    """
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def restart_only_changes(old: Any, new: Any) -> list[str]:
    return [k for k in RESTART_ONLY if getattr(old, k, None) != getattr(new, k, None)]


# --- the daemon -------------------------------------------------------------------------------


Notify = Callable[[dict[str, Any]], None]


class Daemon:
    """One milter process: bind, drop privileges, build the brains, serve, drain."""

    def __init__(self, config: Any, *, notify: Notify | None = None,
                 write_pid: bool = False) -> None:
        block_stop_signals()
        self.config = config
        d = config.daemon
        self.socket = parse_connection(d.connection)
        self.use_noreply = {"always": True, "never": False}.get(d.noreply,
                                                                self.socket.family == "unix")
        self.pool = WorkerPool(d.threads, d.jobsperthread)
        self.registry = SessionRegistry(d.cid_timeout)
        self.adapter = MilterAdapter(run_eom=self.run_eom, registry=self.registry)
        self.notify: Notify = notify or (lambda event: None)
        self.write_pid = write_pid
        self.socket_ident: tuple[int, int] | None = None
        self.stop_deadline: float | None = None
        self._stop = threading.Event()
        self._in_main = False
        self._reload_lock = threading.Lock()

    @property
    def generation(self) -> Generation | None:
        return self.adapter.generation

    @property
    def engine(self) -> Engine:
        return self.adapter.engine

    # --- configuration generations ------------------------------------------------------

    def build_generation(self, config: Any) -> Generation:
        return self.adapter.new_generation(config, build_engine(config), self.use_noreply)

    def reload(self, config: Any) -> tuple[bool, str]:
        """Build ``config`` and make it the one new connections get; the old keeps
        serving its sessions.  A configuration that fails to build is refused."""
        with self._reload_lock:
            old = self.adapter.generation
            if old is None:
                return False, "not serving yet"
            changed = restart_only_changes(old.config.daemon, config.daemon)
            if changed:
                keep = {k: getattr(old.config.daemon, k) for k in changed}
                log.warning("reload: %s changed; kept as they are until a restart",
                            ", ".join(changed))
                config = attrs.evolve(config, daemon=attrs.evolve(config.daemon, **keep))
            try:
                gen = self.build_generation(config)
            except Exception as e:
                log.error("reload refused, configuration generation %d keeps running: %s",
                          old.number, e, exc_info=not isinstance(e, MonkeyError))
                return False, str(e)
            self.config = config
            d = config.daemon
            self.registry.cid_timeout = d.cid_timeout
            logging.getLogger(ROOT).setLevel(logging.DEBUG if d.debug_level >= 50
                                             else logging.INFO)
            self.adapter.activate(gen)
            log.info("reloaded: configuration generation %d with brains: %s; %d open "
                     "session(s) finish on generation %d", gen.number,
                     ", ".join(gen.engine.chain.names) or "none", old.sessions, old.number)
            return True, f"generation {gen.number}"

    # --- end of message on the pool ----------------------------------------------------

    def run_eom(self, session: Session, allowed: frozenset[str], ctx: Any,
                gen: Generation) -> Decision:
        """Walk the chain: each brain on a worker, bounded in time, the MTA kept waiting."""
        d = gen.daemon
        start = time.monotonic()
        deadline = start + float(d.eom_timeout)
        if not gen.engine.chain.blocking:
            # every brain is pure computation and runs here: no pool, no progress
            return session.eom(allowed, deadline=deadline)
        interval = float(d.progress_interval)
        last_progress = [start]
        qid = session.qid

        def heartbeat() -> None:
            now = time.monotonic()
            if ctx is None or interval <= 0 or now - last_progress[0] < interval:
                return
            last_progress[0] = now
            with contextlib.suppress(Exception):
                ctx.progress()

        def invoke(slot: BrainSlot, call: Callable[[], None], timeout: float) -> None:
            if not slot.brain.blocking:
                # pure computation: a pool round trip would cost more than the call
                call()
                return

            def work() -> None:
                with queue_id(qid):
                    call()

            job = self.pool.submit(work)
            reason = "eom"
            while True:
                now = time.monotonic()
                limit, reason = deadline, "eom"
                stop = self.stop_deadline
                if stop is not None:
                    margin = min(1.0, shutdown_timeout(d) / 4)
                    if stop - margin < limit:
                        limit, reason = stop - margin, "shutdown"
                started = job.started
                if started is not None and timeout > 0 and started + timeout < limit:
                    limit, reason = started + timeout, "brain"
                left = limit - now
                if left <= 0:
                    break
                step = left
                if ctx is not None and interval > 0:
                    step = min(left, max(0.01, last_progress[0] + interval - now))
                if job.wait(step):
                    break
                heartbeat()
            if job.done or not self.pool.abandon(job):
                _reraise(job)
                return
            started = job.started
            if started is None:
                why = ("the daemon is shutting down" if reason == "shutdown" else
                       f"no worker was free for it within eom_timeout ({d.eom_timeout:g} s)")
                raise BrainTimeout(why, counts=False)
            ran = time.monotonic() - started
            if reason == "shutdown":
                why = f"the daemon is shutting down (ran {ran:.1f} s)"
            elif reason == "brain":
                why = f"still running after its timeout of {timeout:g} s"
            else:
                why = f"eom_timeout of {d.eom_timeout:g} s spent (ran {ran:.1f} s)"
            raise BrainTimeout(why)

        try:
            return session.eom(allowed, invoke=invoke, deadline=deadline)
        finally:
            heartbeat()

    # --- lifecycle -----------------------------------------------------------------------

    def request_stop(self, why: str = "asked to stop") -> None:
        """Stop accepting connections now; messages in progress get shutdown_timeout."""
        if self._stop.is_set():
            return
        gen = self.adapter.generation
        timeout = shutdown_timeout(gen.daemon if gen else self.config.daemon)
        self.stop_deadline = time.monotonic() + timeout
        self._stop.set()
        log.info("stopping (%s): no new connections; up to %g s for messages in progress",
                 why, timeout)
        if self._in_main:
            # libmilter's listener holds its lock inside a 5 s select(); a
            # connection of our own wakes it so the listener closes at once.
            threading.Thread(target=self._poke_listener, name="mm-poke", daemon=True).start()
            with contextlib.suppress(Exception):
                milter.stop()

    def _poke_listener(self) -> None:
        time.sleep(0.05)
        sock = self.socket
        try:
            if sock.family == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target: Any = sock.path
            else:
                fam = socket.AF_INET6 if sock.family == "inet6" else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                host = sock.host or ("::1" if fam == socket.AF_INET6 else "127.0.0.1")
                target = (host, sock.port)
        except OSError:
            return
        with s, contextlib.suppress(OSError):
            s.settimeout(1.0)
            s.connect(target)

    def _janitor(self) -> None:
        while not self._stop.wait(max(1.0, min(60.0, self.registry.cid_timeout / 4))):
            try:
                self.registry.sweep()
            except Exception:
                log.exception("sweeping idle sessions failed")

    def _open(self) -> None:
        d = self.config.daemon
        sock = self.socket
        self.adapter.install(d.miltername, sock.spec, d.milter_timeout)
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
            self.socket_ident = socket_identity(sock.path)
        else:
            set_nodelay_on_listeners()
            if self.use_noreply:
                log.warning("noreply = \"always\" over TCP: steps the MTA sends without "
                            "waiting for an answer stall on Nagle's algorithm and its "
                            "delayed ACK (about 40 ms a message); use a UNIX socket or "
                            "noreply = \"auto\"")

    def _remove_socket(self) -> None:
        if self.socket.family == "unix":
            remove_unix_socket(self.socket.path, self.socket_ident)

    def start(self) -> None:
        """Bind, drop privileges, build the first generation.  Raises on any failure."""
        d = self.config.daemon
        resolve(d.user, d.group)  # an unknown user or group fails before anything is bound
        self._open()
        try:
            if self.write_pid and d.pidfile:
                write_pidfile(d.pidfile)
            preload(self.config)
            if (d.user or d.group) and os.geteuid() == 0:
                # Build once as root and throw it away: whatever building the
                # brains imports lazily (codecs, brain modules) is loaded while
                # every file is still readable.
                _warm_up(self.config)
            drop_privileges(d.user, d.group)
            if d.user and (warning := check_writable(d.tmpdir, "tmpdir")):
                log.warning("%s", warning)
            self.adapter.activate(self.build_generation(self.config))
        except BaseException:
            self._remove_socket()
            if self.write_pid:
                remove_pidfile(d.pidfile)
            raise

    def serve(self) -> int:
        """Serve until stopped (SIGTERM to this process, or :meth:`request_stop`), then drain."""
        d = self.config.daemon
        if self.adapter.generation is None:
            self.start()
        janitor = threading.Thread(target=self._janitor, name="mm-janitor", daemon=True)
        janitor.start()
        gen = self.adapter.generation
        assert gen is not None
        log.info("%s listening on %s with brains: %s (threads=%d, jobsperthread=%d, pid %d)",
                 d.miltername, self.socket.spec, ", ".join(gen.engine.chain.names) or "none",
                 d.threads, d.jobsperthread, os.getpid())
        self.notify({"event": "ready", "pid": os.getpid(), "socket": self.socket_ident,
                     "generation": gen.number})
        try:
            if not self._stop.is_set():
                self._in_main = True
                milter.main()
        finally:
            self._in_main = False
            self.request_stop("listener closed")
            self._remove_socket()
            abandoned = self._drain()
            self._stop.set()
            self.pool.shutdown(0.5)
            if self.write_pid:
                remove_pidfile(d.pidfile)
            log.info("%s stopped%s", d.miltername,
                     f"; {abandoned} message(s) still in progress were dropped (the MTA "
                     "applies its default action)" if abandoned else "")
            self.notify({"event": "stopped", "abandoned": abandoned})
        return 0

    def _drain(self) -> int:
        """Wait for messages in progress, up to the stop deadline; return how many were left."""
        deadline = self.stop_deadline or time.monotonic()
        last_log = 0.0
        while True:
            n = self.registry.in_flight()
            now = time.monotonic()
            if n == 0 or now >= deadline:
                return n
            if now - last_log >= 5:
                last_log = now
                log.info("waiting for %d message(s) in progress (%.0f s left)", n, deadline - now)
            time.sleep(0.05)


def _reraise(job: Job) -> None:
    err = job.error
    if err is None:
        return
    if isinstance(err, Exception):
        raise err
    raise RuntimeError(f"brain raised {type(err).__name__}: {err}") from err


def serve_single(config: Any) -> int:
    """One process, no supervisor (``run --no-supervisor``): SIGHUP stops it, as
    libmilter handles that signal itself; there is no reload in this mode."""
    d = config.daemon
    setup_logging(target=d.log_target, debug_level=d.debug_level, debug_mode=d.debug_mode,
                  name=d.miltername)
    try:
        daemon = Daemon(config, write_pid=True)
        daemon.start()
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
