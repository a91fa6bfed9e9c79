"""The worker process: the milter itself, started and driven by the supervisor.

``python -m miltermonkey_core.server.worker FD``: the configuration arrives
over the control socket FD, then the daemon serves; reloads, stops and
requests for its counters (``stats``, for ``/metrics`` and ``/readyz``)
come over the same socket.  A reload runs on a thread of its own, so the
counters keep answering while new brains are being built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from typing import Any

import attrs

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, setup_logging
from miltermonkey_core.server.control import recv_frame, send_frame, unpack_config
from miltermonkey_core.server.daemon import Daemon, install_stop_signals

log = logging.getLogger(f"{ROOT}.supervisor")


def snapshot(daemon: Daemon) -> dict[str, Any]:
    """The worker's counters and state, as the supervisor's ``stats`` request gets them."""
    data = daemon.metrics.snapshot()
    gen = daemon.generation()
    listener = daemon.listener
    data.update(
        pid=os.getpid(),
        generation=gen.number if gen is not None else None,
        stopping=daemon.stop_deadline is not None,
        in_flight=daemon.registry.in_flight(),
        sessions_open=len(daemon.registry),
        connections_open=listener.open_connections,
        max_connections=listener.max_connections,
        listener=attrs.asdict(listener.stats),
        cache=(dict(attrs.asdict(daemon.cache.stats), backend=type(daemon.cache).__name__)
               if daemon.cache is not None else None),
        brains=[{"name": slot.name, "use": slot.use, "on_error": slot.on_error,
                 "mode": "evaluate" if slot.evaluation else "enforce",
                 "breaker": slot.breaker.state if slot.breaker.enabled else "closed",
                 "breaker_opened": slot.breaker.opened}
                for slot in (gen.engine.chain.slots if gen is not None else ())],
    )
    return data


def _reload(daemon: Daemon, text: str, notify: Any) -> None:
    try:
        config = unpack_config(text)
    except Exception as e:
        notify({"event": "reload_failed", "error": f"bad configuration frame: {e}"})
        return
    ok, detail = daemon.reload(config)
    notify({"event": "reloaded", "detail": detail} if ok else
           {"event": "reload_failed", "error": detail})


def _control_loop(sock: socket.socket, daemon: Daemon, notify: Any) -> None:
    while True:
        try:
            msg = recv_frame(sock)
        except (OSError, ValueError):
            msg = None
        if msg is None:
            daemon.request_stop("the supervisor went away")
            return
        cmd = msg.get("cmd")
        if cmd == "stats":
            try:
                notify({"event": "stats", "id": msg.get("id"), "data": snapshot(daemon)})
            except Exception:
                log.exception("gathering the counters for the supervisor failed")
        elif cmd == "reload":
            threading.Thread(target=_reload, args=(daemon, str(msg.get("config", "")), notify),
                             name="mm-reload", daemon=True).start()
        elif cmd == "stop":
            daemon.request_stop("asked by the supervisor")


def worker_main(fd: int) -> int:
    """The milter process: configuration from the supervisor, then serve."""
    sock = socket.socket(fileno=fd)
    msg = recv_frame(sock)
    if msg is None or msg.get("cmd") != "start":
        print("miltermonkey worker: no configuration from the supervisor", file=sys.stderr)
        return 2
    config = unpack_config(str(msg["config"]))
    d = config.daemon
    setup_logging(target=d.log_target, debug_level=d.debug_level, debug_mode=d.debug_mode,
                  name=d.miltername, log_format=d.log_format)
    lock = threading.Lock()

    def notify(event: dict[str, Any]) -> None:
        with lock, contextlib.suppress(OSError):
            send_frame(sock, event)

    daemon = Daemon(config, notify=notify)
    install_stop_signals(daemon)
    try:
        daemon.start()
    except MonkeyError as e:
        log.error("%s", e)
        notify({"event": "start_failed", "error": str(e)})
        return 1
    except Exception as e:
        log.exception("the milter failed to start")
        notify({"event": "start_failed", "error": f"{type(e).__name__}: {e}"})
        return 1
    threading.Thread(target=_control_loop, args=(sock, daemon, notify), name="mm-control",
                     daemon=True).start()
    return daemon.serve()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0].isdigit():
        return worker_main(int(args[0]))
    print("usage: python -m miltermonkey_core.server.worker FD (started by "
          "'miltermonkey run')", file=sys.stderr)
    return 2


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Connection threads may still be inside brains: skip finalisation.
    os._exit(code)
