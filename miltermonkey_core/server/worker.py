"""The worker process: the milter itself, started and driven by the supervisor.

``python -m miltermonkey_core.server.worker FD``: the configuration arrives
over the control socket FD, then the daemon serves; reloads and stops come
over the same socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from typing import Any

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT, setup_logging
from miltermonkey_core.server.control import recv_frame, send_frame, unpack_config
from miltermonkey_core.server.daemon import Daemon, install_stop_signals

log = logging.getLogger(f"{ROOT}.supervisor")


def _control_loop(sock: socket.socket, daemon: Any, notify: Any) -> None:
    while True:
        try:
            msg = recv_frame(sock)
        except (OSError, ValueError):
            msg = None
        if msg is None:
            daemon.request_stop("the supervisor went away")
            return
        cmd = msg.get("cmd")
        if cmd == "reload":
            try:
                config = unpack_config(str(msg["config"]))
            except Exception as e:
                notify({"event": "reload_failed", "error": f"bad configuration frame: {e}"})
                continue
            ok, detail = daemon.reload(config)
            notify({"event": "reloaded", "detail": detail} if ok else
                   {"event": "reload_failed", "error": detail})
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
                  name=d.miltername)
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
