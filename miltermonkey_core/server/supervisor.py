"""``miltermonkey run``: a small pure-Python supervisor around the libmilter process.

Why two processes: libmilter (``smfi_main``) blocks SIGHUP, SIGTERM and
SIGINT in every thread and waits for them in a thread of its own, where
SIGHUP and SIGTERM simply stop the listener; a Python signal handler never
runs while ``milter.main()`` does.  So reloading on SIGHUP cannot live in
the libmilter process.  The supervisor owns the signals and the pid file
and runs the milter as a child (the *worker*), talking to it over a
control socket:

* **SIGHUP**: the supervisor loads the configuration again and checks it
  (TOML or script, every brain importable, every brain's options valid,
  the milter key secret usable).  A bad configuration is refused with a log
  line and the running one stays.  A good one is sent to the worker, which
  builds the brains and switches new MTA connections to them; connections
  already open finish on the old brains (nothing is dropped).  If building
  fails in the worker (a brain that cannot start), the worker refuses too.
  The listening socket is never closed, so a TCP listener (which libmilter
  cannot hand from one process to another) survives every reload.
* **SIGTERM / SIGINT**: the worker stops accepting at once, lets messages
  in progress finish for up to ``shutdown_timeout`` seconds, removes its
  UNIX socket and exits; the supervisor removes the pid file.  A second
  SIGTERM/SIGINT kills the worker without waiting.
* **the worker dies** (a crash, the OOM killer): the supervisor starts a
  new one at once, then after 1 s, 2 s, ... up to 30 s while it keeps dying.

The control protocol is length-prefixed JSON frames.  The configuration
travels to the worker pickled inside a frame: the worker trusts its parent.
Nothing the worker sends back is ever unpickled, because the worker runs
with fewer privileges than the supervisor (``user``/``group``).

Upgrading brain *code* needs a restart (``systemctl restart``): Python
cannot unload modules, and a reload only re-reads the configuration.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from miltermonkey_core.config.endpoint import parse_connection
from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, setup_logging
from miltermonkey_core.server.control import pack_config, recv_frame, send_frame
from miltermonkey_core.server.pidfile import remove_pidfile, write_pidfile
from miltermonkey_core.server.preflight import load_fresh, problems_of
from miltermonkey_core.server.sockets import remove_unix_socket

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


# --- the supervisor ------------------------------------------------------------------------


class Worker:
    """The child process running the milter, and our end of its control socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.socket_ident: tuple[int, int] | None = None
        self.stopping = False
        self.error: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: dict[str, Any]) -> bool:
        try:
            send_frame(self.sock, obj)
        except OSError as e:
            log.warning("cannot reach worker %d: %s", self.pid, e)
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


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
        self._pending_config: Any = None

    # --- signals -------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                self.reload()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.stop(signal.Signals(sig).name)

    # --- the worker ----------------------------------------------------------------

    def spawn(self) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "miltermonkey_core.server.worker", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            child.close()
        w = Worker(proc, parent)
        w.send({"cmd": "start", "config": pack_config(self.config)})
        self.selector.register(parent, selectors.EVENT_READ, "worker")
        self.worker = w
        log.info("started worker pid %d", proc.pid)
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
        if event == "ready":
            w.ready_at = time.monotonic()
            ident = msg.get("socket")
            if isinstance(ident, list) and len(ident) == 2:
                w.socket_ident = (int(ident[0]), int(ident[1]))
                self.socket_ident = w.socket_ident
            log.info("worker pid %d is serving (configuration generation %s)", w.pid,
                     msg.get("generation"))
        elif event == "start_failed":
            w.error = str(msg.get("error", "unknown error"))
        elif event == "reloaded":
            self.config = self._pending_config or self.config
            self._pending_config = None
            self.reloads += 1
            log.info("reload done: worker pid %d now serves %s", w.pid, msg.get("detail"))
        elif event == "reload_failed":
            self._pending_config = None
            log.error("reload refused by worker pid %d (it keeps the running configuration): "
                      "%s", w.pid, msg.get("error"))
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
            log.info("worker pid %d exited (%s)", w.pid, _describe_exit(code))
            return
        if not served:
            log.error("worker pid %d failed to start (%s)%s", w.pid, _describe_exit(code),
                      f": {w.error}" if w.error else "")
        else:
            log.error("worker pid %d died unexpectedly (%s)", w.pid, _describe_exit(code))
        if served and w.ready_at is not None and time.monotonic() - w.ready_at >= STABLE_AFTER:
            self.backoff = 0.0
        delay = self.backoff
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self.backoff * 2))
        self.restart_at = time.monotonic() + delay
        log.warning("restarting the worker%s", f" in {delay:g} s" if delay else " now")

    def _wait_started(self, w: Worker, timeout: float) -> bool:
        """First start: wait for ready (True) or failure (False), signals honoured."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for key, _ in self.selector.select(0.2):
                if key.data == "wake":
                    _drain(self._wake_r)
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
        try:
            new = load_fresh(self.config)
            problems = [str(p) for p in problems_of(new)]
        except MonkeyError as e:
            problems = [str(e)]
        except Exception as e:  # a script config may raise anything
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            for p in problems:
                log.error("reload refused: %s", p)
            log.error("reload refused: the running configuration stays")
            return
        w = self.worker
        if w is None or w.ready_at is None:
            self.config = new  # the next worker starts with it
            log.info("configuration checked; no worker is serving: it applies at the next start")
            return
        self._pending_config = new
        w.send({"cmd": "reload", "config": pack_config(new)})

    def stop(self, why: str) -> None:
        w = self.worker
        if self.stopping:
            if w is not None and w.proc.poll() is None:
                log.warning("%s again: killing worker pid %d now", why, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            return
        self.stopping = True
        grace = float(self.config.daemon.shutdown_timeout) + 10.0
        self.kill_at = time.monotonic() + grace
        if w is None:
            log.info("%s: stopping", why)
            return
        log.info("%s: stopping worker pid %d (it finishes messages in progress)", why, w.pid)
        if not w.send({"cmd": "stop"}):
            with contextlib.suppress(ProcessLookupError):
                w.proc.terminate()

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> int:
        d = self.config.daemon
        if d.pidfile:
            write_pidfile(d.pidfile)
        self._install_signals()
        try:
            for attempt in range(BIND_ATTEMPTS):
                w = self.spawn()
                if self._wait_started(w, START_TIMEOUT):
                    break
                self._finish_worker(5.0)
                if self.stopping:
                    return self.exit_code
                msg = w.error or ("the worker exited before it was ready "
                                  f"({_describe_exit(w.proc.returncode)})")
                if "cannot open" in msg and attempt + 1 < BIND_ATTEMPTS:
                    # a previous instance may still be letting go of the port
                    log.warning("%s; trying again in 1 s", msg)
                    time.sleep(1.0)
                    continue
                print(f"miltermonkey: {msg}", file=sys.stderr)
                self.exit_code = 1
                return self.exit_code
            while True:
                timeout = 1.0
                if self.restart_at is not None:
                    timeout = max(0.0, min(timeout, self.restart_at - time.monotonic()))
                for key, _ in self.selector.select(timeout):
                    if key.data == "wake":
                        _drain(self._wake_r)
                    elif key.data == "worker" and self.worker is not None:
                        self._read_worker(self.worker)
                self._handle_signals()
                self._reap()
                if self.stopping:
                    if self.worker is None:
                        break
                    if self.kill_at is not None and time.monotonic() >= self.kill_at:
                        log.error("worker pid %d did not stop in time; killing it",
                                  self.worker.pid)
                        self._finish_worker(0.0)
                        break
                    continue
                if self.restart_at is not None and time.monotonic() >= self.restart_at:
                    self.restart_at = None
                    self.restarts += 1
                    self.spawn()
        finally:
            self._finish_worker(5.0)
            if self.socket.family == "unix":
                remove_unix_socket(self.socket.unix_path, self.socket_ident)
            remove_pidfile(d.pidfile)
            signal.set_wakeup_fd(-1)
        log.info("supervisor stopped")
        return self.exit_code

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


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def supervise(config: Any) -> int:
    """``miltermonkey run``: supervise a milter worker until SIGTERM/SIGINT."""
    d = config.daemon
    setup_logging(target=d.log_target, debug_level=d.debug_level, debug_mode=d.debug_mode,
                  name=d.miltername)
    try:
        return Supervisor(config).run()
    except MonkeyError as e:
        log.error("%s", e)
        print(f"miltermonkey: {e}", file=sys.stderr)
        return 1


