"""Starting the daemon: supervised (the default) or as one process."""

from __future__ import annotations

import os

from miltermonkey_core.config.schema import Config
from miltermonkey_core.server.daemon import serve_single
from miltermonkey_core.server.supervisor import supervise


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
    return supervise(config)
