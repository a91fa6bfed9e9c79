"""The milter process: socket, connections, configuration generations, sweeping, draining.

Threads: one per MTA connection speaks the milter protocol
(:mod:`miltermonkey_core.milter.connection`); at end of message it walks the
brain chain, handing blocking brains to the worker pool (:mod:`.eom`).  A
worker retires after ``jobsperthread`` jobs and a new one takes its place.

Lifecycle: the process binds its socket, drops root (``user``/``group``),
builds the brains and serves.  A reload builds a new *generation* (engine
and negotiation plan) for new MTA connections while open ones finish on
theirs.  A stop closes the listener at once, lets messages in progress
finish for up to ``shutdown_timeout`` seconds, closes the remaining
connections, removes the UNIX socket and exits.
:mod:`miltermonkey_core.server.supervisor` runs this process as its child
and drives reloads and stops through a control socket.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from miltermonkey_core.config.endpoint import Endpoint
from miltermonkey_core.config.endpoint import parse_connection as parse_endpoint
from miltermonkey_core.config.schema import Config, DaemonConfig
from miltermonkey_core.engine.build import build_engine, make_cache
from miltermonkey_core.engine.cache import ScanCache
from miltermonkey_core.engine.session import Decision, Engine, Session
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, setup_logging
from miltermonkey_core.milter.connection import MilterConnection, Timeouts
from miltermonkey_core.milter.generation import Generation, new_generation
from miltermonkey_core.plugins import installed_brains, load_brain_class
from miltermonkey_core.server.eom import run_eom
from miltermonkey_core.server.listener import Listener, connection_cap, raise_open_file_limit
from miltermonkey_core.server.metrics import WorkerMetrics
from miltermonkey_core.server.pidfile import remove_pidfile, write_pidfile
from miltermonkey_core.server.pool import WorkerPool
from miltermonkey_core.server.privileges import check_writable, drop_privileges, resolve
from miltermonkey_core.server.registry import SessionRegistry
from miltermonkey_core.server.sockets import remove_unix_socket

log = logging.getLogger(f"{ROOT}.daemon")

#: Daemon options a reload cannot change in a running process (they shape the
#: socket, the process's identity or its thread pool): a reload keeps the old
#: values, logs which ones differ, and they apply at the next restart.
RESTART_ONLY = ("connection", "socket_mode", "socket_group", "user", "group", "pidfile",
                "log_target", "debug_mode", "miltername", "threads", "jobsperthread",
                "max_connections", "log_format", "metrics")


def parse_connection(spec: str) -> Endpoint:
    """The socket to listen on; a bad spelling is a MonkeyError naming the option."""
    try:
        return parse_endpoint(spec)
    except ValueError as e:
        raise MonkeyError(f"connection {spec!r}: {e}") from None


def timeouts_of(d: DaemonConfig) -> Timeouts:
    return Timeouts(negotiate=float(d.negotiate_timeout), idle=float(d.milter_timeout),
                    partial=float(d.command_timeout))


def preload(config: Config) -> None:
    """Import everything building ``config`` needs, while every file is still readable.

    After the switch to ``user`` the Python installation or a brain's
    package may not be readable any more (an interpreter under /root, a
    0750 site-packages); modules already imported need no file.
    """
    installed_brains()
    for entry in config.brains:
        load_brain_class(entry.use)


def _cache_options(config: Config) -> tuple[object, ...]:
    d = config.daemon
    return (d.cache, d.cache_max_entries, d.cache_max_bytes, d.cache_secret_file,
            d.miltersecretfile if d.milter_key else None, d.key_id)


def restart_only_changes(old: DaemonConfig, new: DaemonConfig) -> list[str]:
    return [k for k in RESTART_ONLY if getattr(old, k, None) != getattr(new, k, None)]


Notify = Callable[[dict[str, Any]], None]


class Daemon:
    """One milter process: bind, drop privileges, build the brains, serve, drain."""

    def __init__(self, config: Config, *, notify: Notify | None = None,
                 write_pid: bool = False) -> None:
        self.config = config
        d = config.daemon
        self.socket = parse_connection(d.connection)
        self.use_noreply = {"always": True, "never": False}.get(d.noreply,
                                                                self.socket.family == "unix")
        self.pool = WorkerPool(d.threads, d.jobsperthread)
        self.registry = SessionRegistry(d.cid_timeout)
        self.metrics = WorkerMetrics()
        self.open_files = raise_open_file_limit()
        self.listener = Listener(
            self.socket, self, timeouts_of(d),
            max_connections=connection_cap(d.max_connections, self.open_files, d.threads),
            socket_mode=int(d.socket_mode, 8), socket_group=d.socket_group)
        self.notify: Notify = notify or (lambda event: None)
        self.write_pid = write_pid
        self.stop_deadline: float | None = None
        self._generation: Generation | None = None
        #: The scan cache, shared by every generation (a reload keeps its entries).
        self.cache: ScanCache | None = None
        self.cache_config: tuple[object, ...] | None = None
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()

    @property
    def socket_ident(self) -> tuple[int, int] | None:
        return self.listener.socket_ident

    @property
    def engine(self) -> Engine:
        gen = self._generation
        if gen is None:
            raise RuntimeError("no configuration is active")
        return gen.engine

    # --- what a connection asks of its server --------------------------------------------

    def generation(self) -> Generation | None:
        return self._generation

    def run_eom(self, session: Session, allowed: frozenset[str], progress: Callable[[], None],
                gen: Generation) -> Decision:
        try:
            decision = run_eom(self.pool, session, allowed, progress, gen,
                               lambda: self.stop_deadline)
        except Exception:
            self.metrics.message_failed()
            raise
        self.metrics.message_done(session, decision)
        return decision

    def session_opened(self, session: Session) -> None:
        self.registry.add(session)
        self.metrics.session_opened()

    def session_closed(self, session: Session) -> None:
        self.registry.remove(session)

    def negotiated(self, conn: MilterConnection) -> None:
        self.listener.negotiated(conn)

    # --- configuration generations ------------------------------------------------------

    def build_generation(self, config: Config) -> Generation:
        """Build ``config``; the scan cache carries over unless its options changed."""
        if self.cache_config != _cache_options(config):
            self.cache = make_cache(config)
            self.cache_config = _cache_options(config)
        return new_generation(config, build_engine(config, cache=self.cache), self.use_noreply)

    def activate(self, gen: Generation) -> None:
        old, self._generation = self._generation, gen
        if old is not None:
            old.retire()

    def reload(self, config: Config) -> tuple[bool, str]:
        """Build ``config`` and make it the one new connections get; the old keeps
        serving its sessions.  A configuration that fails to build is refused."""
        with self._reload_lock:
            old = self._generation
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
            self.listener.timeouts = timeouts_of(d)
            logging.getLogger(ROOT).setLevel(logging.DEBUG if d.debug_level >= 50
                                             else logging.INFO)
            self.activate(gen)
            log.info("reloaded: configuration generation %d with brains: %s; %d open "
                     "session(s) finish on generation %d", gen.number,
                     ", ".join(gen.engine.chain.names) or "none", old.sessions, old.number)
            return True, f"generation {gen.number}"

    # --- lifecycle -----------------------------------------------------------------------

    def request_stop(self, why: str = "asked to stop") -> None:
        """Stop accepting connections now; messages in progress get shutdown_timeout."""
        if self._stop.is_set():
            return
        gen = self._generation
        timeout = float((gen.daemon if gen else self.config.daemon).shutdown_timeout)
        self.stop_deadline = time.monotonic() + timeout
        self._stop.set()
        log.info("stopping (%s): no new connections; up to %g s for messages in progress",
                 why, timeout)
        self.listener.stop_accepting()

    def _janitor(self) -> None:
        while not self._stop.wait(max(1.0, min(60.0, self.registry.cid_timeout / 4))):
            try:
                self.registry.sweep()
            except Exception:
                log.exception("sweeping idle sessions failed")

    def _remove_socket(self) -> None:
        if self.socket.family == "unix":
            remove_unix_socket(self.socket.unix_path, self.socket_ident)

    def start(self) -> None:
        """Bind, drop privileges, build the first generation.  Raises on any failure."""
        d = self.config.daemon
        resolve(d.user, d.group)  # an unknown user or group fails before anything is bound
        self.listener.bind()
        try:
            if self.write_pid and d.pidfile:
                write_pidfile(d.pidfile)
            preload(self.config)
            if (d.user or d.group) and os.geteuid() == 0:
                # Build once as root and throw it away: whatever building the
                # brains imports lazily (codecs, brain modules) is loaded while
                # every file is still readable.
                build_engine(self.config, cache=None).close()
            drop_privileges(d.user, d.group)
            if d.user and (warning := check_writable(d.tmpdir, "tmpdir")):
                log.warning("%s", warning)
            self.activate(self.build_generation(self.config))
        except BaseException:
            self.listener.stop_accepting()
            self._remove_socket()
            if self.write_pid:
                remove_pidfile(d.pidfile)
            raise
        if self.socket.family != "unix" and self.use_noreply:
            log.warning("noreply = \"always\" over TCP: steps the MTA sends without waiting "
                        "for an answer may stall on Nagle's algorithm and its delayed ACK "
                        "(about 40 ms a message); use a UNIX socket or noreply = \"auto\"")

    def serve(self) -> int:
        """Serve until stopped (SIGTERM, or :meth:`request_stop`), then drain."""
        d = self.config.daemon
        if self._generation is None:
            self.start()
        gen = self._generation
        assert gen is not None
        threading.Thread(target=self._janitor, name="mm-janitor", daemon=True).start()
        self.listener.start()
        log.info("%s listening on %s with brains: %s (threads=%d, jobsperthread=%d, "
                 "max_connections=%d, pid %d)", d.miltername, self.socket.spec,
                 ", ".join(gen.engine.chain.names) or "none", d.threads, d.jobsperthread,
                 self.listener.max_connections, os.getpid())
        self.notify({"event": "ready", "pid": os.getpid(), "socket": self.socket_ident,
                     "generation": gen.number})
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.request_stop("stopping")
            self._remove_socket()
            abandoned = self._drain()
            self.listener.close_all()
            self.pool.shutdown(0.5)
            if self.cache is not None:
                self.cache.close()
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


def install_stop_signals(daemon: Daemon, *, reload: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT drain and stop; SIGHUP reloads when ``reload`` is given, else stops."""

    def stop(signum: int, frame: Any) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    def hup(signum: int, frame: Any) -> None:
        if reload is None:
            stop(signum, frame)
        else:
            threading.Thread(target=reload, name="mm-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)


def serve_single(config: Config) -> int:
    """One process, no supervisor (``run --no-supervisor``): SIGHUP stops it; there is
    no reload in this mode."""
    d = config.daemon
    setup_logging(target=d.log_target, debug_level=d.debug_level, debug_mode=d.debug_mode,
                  name=d.miltername, log_format=d.log_format)
    if d.metrics:
        log.warning("metrics %s: the supervisor serves /metrics, /healthz and /readyz; they "
                    "are off without it (--no-supervisor)", d.metrics)
    try:
        daemon = Daemon(config, write_pid=True)
        install_stop_signals(daemon)
        daemon.start()
        return daemon.serve()
    except MonkeyError as e:
        log.error("%s", e)
        print(f"miltermonkey: {e}", file=sys.stderr)
        return 1
