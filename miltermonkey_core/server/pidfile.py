"""The pid file: written so service managers find the daemon, never clobbering a live one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from miltermonkey_core.errors import MonkeyError


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
