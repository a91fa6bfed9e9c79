"""``miltermonkey run``: a small pure-Python supervisor around the milter process.

Why two processes: brain code may crash or wedge the process it runs in,
and a reload must never take the listening socket or the health endpoint
down with it.  The supervisor owns the signals, the pid file, systemd's
notifications and the ``metrics`` HTTP endpoint, and runs the milter as a
child (the *worker*), talking to it over a control socket:

* **SIGHUP**: the supervisor loads the configuration again and checks it
  (TOML or script, every brain importable, every brain's options valid,
  the milter key secret usable).  A bad configuration is refused with a log
  line and the running one stays.  A good one is sent to the worker, which
  builds the brains and switches new MTA connections to them; connections
  already open finish on the old brains (nothing is dropped).  If building
  fails in the worker (a brain that cannot start), the worker refuses too.
  The listening socket is never closed, so a TCP listener survives every
  reload.  systemd hears ``RELOADING=1`` then ``READY=1``.
* **SIGTERM / SIGINT**: ``/readyz`` turns not-ready at once and systemd
  hears ``STOPPING=1``; for ``drain_period`` seconds the worker keeps
  serving, so a load balancer checking ``/readyz`` stops sending new
  sessions; then the worker stops accepting, lets messages in progress
  finish for up to ``shutdown_timeout`` seconds, removes its UNIX socket
  and exits; the supervisor removes the pid file.  A second SIGTERM/SIGINT
  during the drain period cuts it short; one after that kills the worker
  without waiting.
* **the worker dies** (a crash, the OOM killer): the supervisor starts a
  new one at once, then after 1 s, 2 s, ... up to 30 s while it keeps dying.
  A worker that exits before it is ready ``restart_attempts`` times in a
  row (a brain package uninstalled, say) makes the supervisor give up and
  exit 1 with the reason, so systemd and the admin see the failure instead
  of a process that serves nothing; ``restart_attempts = 0`` keeps trying.

The control protocol is length-prefixed JSON frames.  The configuration
travels to the worker pickled inside a frame: the worker trusts its parent.
Nothing the worker sends back is ever unpickled, because the worker runs
with fewer privileges than the supervisor (``user``/``group``).  The
worker's counters reach ``/metrics`` the same way: at each scrape the
supervisor asks (``stats``) and the worker answers with JSON (see
:mod:`.metrics` for why the counters live in the worker).

The supervisor removes the UNIX socket on the way out only when a worker
reported binding it (its device and inode): a second ``miltermonkey run``
on the socket of a running daemon fails, and leaves that socket alone.

Upgrading brain *code* needs a restart (``systemctl restart``): Python
cannot unload modules, and a reload only re-reads the configuration.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import attrs

from miltermonkey_core.config.endpoint import parse_connection
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, setup_logging
from miltermonkey_core.server.childcheck import check_in_child
from miltermonkey_core.server.control import pack_config, recv_frame, unpack_config
from miltermonkey_core.server.health import SupervisorFacts, not_ready_reasons
from miltermonkey_core.server.notify import Notifier
from miltermonkey_core.server.pidfile import remove_pidfile, write_pidfile
from miltermonkey_core.server.sockets import remove_unix_socket
from miltermonkey_core.server.workerhandle import Worker, describe_exit, drain_socket

log = logging.getLogger(f"{ROOT}.supervisor")

#: Seconds a new worker may take to bind and build its brains.
START_TIMEOUT = 120.0
#: Restart back-off after the worker died: first delay and ceiling, seconds.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: A worker that served this long resets the back-off.
STABLE_AFTER = 60.0
#: First start: how often to try when the socket is still held by a predecessor.
BIND_ATTEMPTS = 5
#: Seconds a scrape or a readiness check waits for the worker's counters.
STATS_TIMEOUT = 2.0
#: /healthz fails when the supervisor's loop has not turned for this long.
LIVENESS_STALL = 15.0


# --- the supervisor ------------------------------------------------------------------------


class Supervisor:
    """Signals, pid file, the worker's life and restarts; see the module doc."""

    def __init__(self, config: Any) -> None:
        self.config = config
        d = config.daemon
        self.socket = parse_connection(d.connection)
        self.worker: Worker | None = None
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signals: list[int] = []
        self.stopping = False
        self.kill_at: float | None = None
        self.restart_at: float | None = None
        self.backoff = 0.0  # the first restart is at once
        self.restarts = 0
        self.reloads = 0
        self.exit_code = 0
        self.socket_ident: tuple[int, int] | None = None
        #: Configurations sent to the worker, oldest first; it answers each in order.
        self._pending_configs: collections.deque[Any] = collections.deque()
        self.facts = SupervisorFacts(started=time.time())
        self.notifier = Notifier()
        self.http: Any = None  # the HealthServer, when metrics is set
        self.failed_starts = 0  # in a row; reset when a worker is ready
        self.drain_until: float | None = None
        self.tick = time.monotonic()
        self._stats_lock = threading.Lock()
        self._stats_serial = 0
        self._stats_waiting: dict[int, list[Any]] = {}

    # --- signals -------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    def _handle_signals(self) -> None:
        """The signals that arrived before this turn of the loop; SIGHUPs count once.

        A reload's check takes a moment (a child process); signals arriving
        meanwhile wait for the next turn, so the worker's answers are read in
        between and a stream of SIGHUPs cannot starve the loop.
        """
        arrived, self._signals = self._signals, []
        if signal.SIGHUP in arrived:
            self.reload()
        for sig in arrived:
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.stop(signal.Signals(sig).name)

    # --- the worker ----------------------------------------------------------------

    def spawn(self) -> Worker:
        w = Worker.start(pack_config(self.config))
        self.selector.register(w.sock, selectors.EVENT_READ, "worker")
        self.worker = w
        log.info("started worker pid %d", w.pid)
        return w

    def _forget_worker(self) -> None:
        w = self.worker
        if w is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(w.sock)
        w.close()
        self.worker = None

    def _on_message(self, w: Worker, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "stats":
            with self._stats_lock:
                waiting = self._stats_waiting.get(msg.get("id", -1))
            if waiting is not None and isinstance(msg.get("data"), dict):
                waiting[1] = msg["data"]
                waiting[0].set()
        elif event == "ready":
            w.ready_at = time.monotonic()
            self.failed_starts = 0
            ident = msg.get("socket")
            if isinstance(ident, list) and len(ident) == 2:
                w.socket_ident = (int(ident[0]), int(ident[1]))
                self.socket_ident = w.socket_ident
            log.info("worker pid %d is serving (configuration generation %s)", w.pid,
                     msg.get("generation"))
            self.notifier.status(f"serving: worker pid {w.pid}, configuration generation "
                                 f"{msg.get('generation')}")
        elif event == "start_failed":
            w.error = str(msg.get("error", "unknown error"))
        elif event == "reloaded":
            if self._pending_configs:
                self.config = self._pending_configs.popleft()
            self.reloads += 1
            self._reload_done(True)
            log.info("reload done: worker pid %d now serves %s", w.pid, msg.get("detail"))
            self.notifier.ready(f"serving: reloaded, {msg.get('detail')}")
        elif event == "reload_failed":
            if self._pending_configs:
                self._pending_configs.popleft()
            self._reload_done(False)
            log.error("reload refused by worker pid %d (it keeps the running configuration): "
                      "%s", w.pid, msg.get("error"))
            self.notifier.ready("serving: reload refused, the running configuration stays")
        elif event == "stopped":
            n = msg.get("abandoned", 0)
            if n:
                log.warning("worker pid %d stopped with %s message(s) unfinished", w.pid, n)

    def _read_worker(self, w: Worker) -> None:
        try:
            msg = recv_frame(w.sock)
        except (OSError, ValueError) as e:
            log.warning("worker pid %d: bad control message: %s", w.pid, e)
            msg = None
        if msg is None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(w.sock)
            return
        self._on_message(w, msg)

    def _reap(self) -> None:
        w = self.worker
        if w is None or w.proc.poll() is None:
            return
        code = w.proc.returncode
        served = w.ready_at is not None
        self._forget_worker()
        if self.stopping:
            log.info("worker pid %d exited (%s)", w.pid, describe_exit(code))
            return
        if not served:
            self.facts.start_failures += 1
            self.failed_starts += 1
            why = f"worker pid {w.pid} failed to start ({describe_exit(code)})" + (
                f": {w.error}" if w.error else "")
            log.error("%s", why)
            limit = int(self.config.daemon.restart_attempts)
            if limit and self.failed_starts >= limit:
                self._give_up(f"{why}; {self.failed_starts} failed starts in a row "
                              f"(restart_attempts = {limit}): giving up")
                return
        else:
            log.error("worker pid %d died unexpectedly (%s)", w.pid, describe_exit(code))
        if served and w.ready_at is not None and time.monotonic() - w.ready_at >= STABLE_AFTER:
            self.backoff = 0.0
        delay = self.backoff
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self.backoff * 2))
        self.restart_at = time.monotonic() + delay
        log.warning("restarting the worker%s", f" in {delay:g} s" if delay else " now")

    def _give_up(self, why: str) -> None:
        """Stop for good with exit status 1: systemd (Restart=, alerts) and the admin see it."""
        log.error("%s", why)
        print(f"miltermonkey: {why}", file=sys.stderr)
        self.notifier.failed(why)
        self.exit_code = 1
        self.stopping = True
        self.restart_at = None

    def _wait_started(self, w: Worker, timeout: float) -> bool:
        """First start: wait for ready (True) or failure (False), signals honoured."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for key, _ in self.selector.select(0.2):
                if key.data == "wake":
                    drain_socket(self._wake_r)
                elif key.data == "worker":
                    self._read_worker(w)
            if w.ready_at is not None:
                return True
            if self._signals and any(s in (signal.SIGTERM, signal.SIGINT)
                                     for s in self._signals):
                self._signals.clear()
                self.stopping = True
                w.send({"cmd": "stop"})
                return False
            if w.proc.poll() is not None:
                with contextlib.suppress(OSError):  # what it said before it went
                    w.sock.settimeout(0.2)
                    while (msg := recv_frame(w.sock)) is not None:
                        self._on_message(w, msg)
                return w.ready_at is not None
        log.error("worker pid %d did not start within %g s", w.pid, timeout)
        return False

    # --- commands ----------------------------------------------------------------------

    def reload(self) -> None:
        if self.stopping:
            return
        log.info("SIGHUP: reloading the configuration")
        self.notifier.reloading()
        checked, problems = check_in_child(self.config)
        if problems or checked is None:
            for p in problems:
                log.error("reload refused: %s", p)
            log.error("reload refused: the running configuration stays")
            self._reload_done(False)
            self.notifier.ready("serving: reload refused, the running configuration stays")
            return
        new = checked
        if new.daemon.metrics != self.config.daemon.metrics:
            log.warning("reload: metrics changed; the endpoint stays on %s until a restart",
                        self.config.daemon.metrics)
            new = attrs.evolve(new, daemon=attrs.evolve(new.daemon,
                                                        metrics=self.config.daemon.metrics))
        w = self.worker
        if w is None or w.ready_at is None:
            self.config = new  # the next worker starts with it
            self._reload_done(True)
            log.info("configuration checked; no worker is serving: it applies at the next start")
            self.notifier.ready("configuration checked; it applies when a worker starts")
            return
        self._pending_configs.append(new)
        w.send({"cmd": "reload", "config": pack_config(new)})

    def _reload_done(self, ok: bool) -> None:
        self.facts.last_reload = time.time()
        self.facts.last_reload_ok = ok
        if ok:
            self.facts.reloads_ok += 1
        else:
            self.facts.reloads_refused += 1

    def stop(self, why: str) -> None:
        w = self.worker
        if self.stopping:
            if self.drain_until is not None:
                log.warning("%s again: cutting the drain period short", why)
                self._end_drain(why)
            elif w is not None and w.proc.poll() is None:
                log.warning("%s again: killing worker pid %d now", why, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            return
        self.stopping = True
        self.restart_at = None
        d = self.config.daemon
        drain = float(d.drain_period)
        self.notifier.stopping(f"stopping ({why})")
        if w is None:
            log.info("%s: stopping", why)
            self.kill_at = time.monotonic() + float(d.shutdown_timeout) + 10.0
            return
        if drain > 0 and w.ready_at is not None:
            self.drain_until = time.monotonic() + drain
            self.kill_at = self.drain_until + float(d.shutdown_timeout) + 10.0
            log.info("%s: /readyz now reports not ready; worker pid %d keeps serving for the "
                     "drain period (%g s), then finishes messages in progress", why, w.pid,
                     drain)
            return
        self._stop_worker(why)

    def _end_drain(self, why: str) -> None:
        self.drain_until = None
        self.kill_at = time.monotonic() + float(self.config.daemon.shutdown_timeout) + 10.0
        self._stop_worker(why)

    def _stop_worker(self, why: str) -> None:
        w = self.worker
        if w is None:
            return
        log.info("%s: stopping worker pid %d (it finishes messages in progress)", why, w.pid)
        if not w.send({"cmd": "stop"}):
            with contextlib.suppress(ProcessLookupError):
                w.proc.terminate()

    # --- what /metrics, /healthz and /readyz read (from the HTTP threads) ----------------

    def worker_stats(self, timeout: float = STATS_TIMEOUT) -> Mapping[str, Any] | None:
        """The serving worker's counters, asked over the control socket; None if it is
        not serving or does not answer within ``timeout``."""
        w = self.worker
        if w is None or w.ready_at is None or w.proc.poll() is not None:
            return None
        with self._stats_lock:
            self._stats_serial += 1
            serial = self._stats_serial
            waiting: list[Any] = [threading.Event(), None]
            self._stats_waiting[serial] = waiting
        try:
            if not w.send({"cmd": "stats", "id": serial}):
                return None
            waiting[0].wait(timeout)
            data: Mapping[str, Any] | None = waiting[1]
            return data
        finally:
            with self._stats_lock:
                self._stats_waiting.pop(serial, None)

    def current_facts(self) -> SupervisorFacts:
        w = self.worker
        f = self.facts
        serving = w is not None and w.ready_at is not None and w.proc.poll() is None
        return attrs.evolve(f, worker_pid=w.pid if w is not None else None,
                            worker_serving=serving,
                            worker_started=w.started_wall if serving and w else None,
                            restarts=self.restarts, stopping=self.stopping,
                            draining=self.drain_until is not None)

    def readiness(self) -> list[str]:
        facts = self.current_facts()
        stats = self.worker_stats() if facts.worker_serving and not facts.stopping else None
        return not_ready_reasons(facts, stats)

    def live(self) -> bool:
        return time.monotonic() - self.tick < LIVENESS_STALL

    def _start_http(self) -> None:
        spec = self.config.daemon.metrics
        if not spec:
            return
        # Only with an endpoint configured: prometheus_client and http.server
        # would cost every supervisor about 11 MiB.
        from prometheus_client.process_collector import ProcessCollector  # noqa: PLC0415 - memory
        from prometheus_client.registry import CollectorRegistry  # noqa: PLC0415 - memory

        from miltermonkey_core.server.exposition import MonkeyCollector  # noqa: PLC0415 - memory
        from miltermonkey_core.server.httpd import HealthServer  # noqa: PLC0415 - memory

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MonkeyCollector(self.current_facts, self.worker_stats))
        ProcessCollector(namespace="miltermonkey_worker", registry=registry,
                         pid=lambda: self.worker.pid if self.worker is not None else "-")
        self.http = HealthServer(spec, registry, readiness=self.readiness, live=self.live,
                                 draining=lambda: self.stopping)
        self.http.start()

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> int:
        d = self.config.daemon
        if d.pidfile:
            write_pidfile(d.pidfile)
        try:
            self._start_http()
            self._install_signals()
            if not self._first_start():
                return self.exit_code
            w = self.worker
            self.notifier.ready(f"serving: worker pid {w.pid if w else '?'}")
            self._loop()
        finally:
            self._finish_worker(5.0)
            if self.socket.family == "unix" and self.socket_ident is not None:
                # only a socket a worker of ours bound: never another daemon's
                remove_unix_socket(self.socket.unix_path, self.socket_ident)
            remove_pidfile(d.pidfile)
            signal.set_wakeup_fd(-1)
            if self.http is not None:
                self.http.close()
        log.info("supervisor stopped")
        return self.exit_code

    def _first_start(self) -> bool:
        """Start the first worker; False (with ``exit_code`` set) when it never served."""
        for attempt in range(BIND_ATTEMPTS):
            w = self.spawn()
            if self._wait_started(w, START_TIMEOUT):
                return True
            self._finish_worker(5.0)
            if self.stopping:
                return False
            self.facts.start_failures += 1
            msg = w.error or ("the worker exited before it was ready "
                              f"({describe_exit(w.proc.returncode)})")
            if "cannot open" in msg and attempt + 1 < BIND_ATTEMPTS:
                # a previous instance may still be letting go of the port
                log.warning("%s; trying again in 1 s", msg)
                time.sleep(1.0)
                continue
            print(f"miltermonkey: {msg}", file=sys.stderr)
            self.notifier.failed(msg)
            self.exit_code = 1
            return False
        return False

    def _loop(self) -> None:
        while True:
            self.tick = now = time.monotonic()
            timeout = 1.0
            for at in (self.restart_at, self.drain_until):
                if at is not None:
                    timeout = max(0.0, min(timeout, at - now))
            for key, _ in self.selector.select(timeout):
                if key.data == "wake":
                    drain_socket(self._wake_r)
                elif key.data == "worker" and self.worker is not None:
                    self._read_worker(self.worker)
            self._handle_signals()
            self._reap()
            if self.stopping:
                if self.worker is None:
                    return
                if self.drain_until is not None and time.monotonic() >= self.drain_until:
                    self._end_drain("drain period over")
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    log.error("worker pid %d did not stop in time; killing it",
                              self.worker.pid)
                    self._finish_worker(0.0)
                    return
                continue
            if self.restart_at is not None and time.monotonic() >= self.restart_at:
                self.restart_at = None
                self.restarts += 1
                self.spawn()

    def _finish_worker(self, wait: float) -> None:
        w = self.worker
        if w is None:
            return
        try:
            w.proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(5)
        self._forget_worker()


def supervise(config: Any) -> int:
    """``miltermonkey run``: supervise a milter worker until SIGTERM/SIGINT."""
    d = config.daemon
    setup_logging(target=d.log_target, debug_level=d.debug_level, debug_mode=d.debug_mode,
                  name=d.miltername, log_format=d.log_format)
    try:
        return Supervisor(config).run()
    except MonkeyError as e:
        log.error("%s", e)
        print(f"miltermonkey: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m miltermonkey_core.server.supervisor --config-fd FD``.

    How ``miltermonkey run`` becomes the supervisor (:func:`~.main.exec_supervisor`).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--config-fd" or not args[1].isdigit():
        print("usage: python -m miltermonkey_core.server.supervisor --config-fd FD "
              "(started by 'miltermonkey run')", file=sys.stderr)
        return 2
    with os.fdopen(int(args[1]), "rb") as f:
        config = unpack_config(f.read().decode("ascii"))
    return supervise(config)


if __name__ == "__main__":
    sys.exit(main())
