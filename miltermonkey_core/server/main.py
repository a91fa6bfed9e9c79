"""Starting the daemon: supervised (the default) or as one process."""

from __future__ import annotations

import os
import sys

from miltermonkey_core.config.schema import Config
from miltermonkey_core.server.control import pack_config
from miltermonkey_core.server.daemon import serve_single


def run(config: Config, supervise_worker: bool | None = None) -> int:
    """Start the monkey with ``config`` and serve until SIGTERM/SIGINT.

    By default a small supervisor process owns the signals (SIGHUP reloads)
    and runs the milter as its child; ``supervise_worker=False`` (or the
    environment variable ``MILTERMONKEY_NO_SUPERVISOR=1``) runs one process.
    """
    if supervise_worker is None:
        supervise_worker = os.environ.get("MILTERMONKEY_NO_SUPERVISOR", "") not in (
            "1", "yes", "true")
    if not supervise_worker:
        return serve_single(config)
    exec_supervisor(config)
    return 1  # not reached


def exec_supervisor(config: Config) -> None:
    """Become the supervisor: the same process, started afresh with only what it needs.

    Whatever this process imported to read and check the configuration (the
    CLI, the brains for the embedded default's detection) would stay in the
    supervisor for as long as the daemon runs; exec leaves it behind and keeps
    the pid (systemd's main process).  The configuration travels in an
    anonymous file.
    """
    fd = os.memfd_create("miltermonkey-config", 0)
    os.write(fd, pack_config(config).encode("ascii"))
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m",  # noqa: S606 - our own interpreter
                              "miltermonkey_core.server.supervisor", "--config-fd", str(fd)])
