"""The pid file: written so service managers find the daemon, never clobbering a live one.

Whatever is at the pid file's path is judged before it is touched: a
symbolic link is never followed (dangling or not: it could point anywhere
root can write), a directory or a device is not a pid file, and every
refusal is a one-line message with the path, not a traceback.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from miltermonkey_core.errors import MonkeyError


def _existing(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MonkeyError(f"pid file {path}: {e.strerror or e}") from None


def write_pidfile(path: str) -> None:
    """Write our pid, refusing to clobber the pid file of a live monkey."""
    st = _existing(path)
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            state = "" if os.path.exists(path) else ", which does not exist"
            raise MonkeyError(f"pid file {path} is a symbolic link (to {target}{state}); "
                              "refusing to follow it: remove it, or set pidfile to a plain path")
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise MonkeyError(f"pid file {path} is {kind}; set pidfile to a file path")
        try:
            old = int(Path(path).read_text().split()[0])
            os.kill(old, 0)
        except (ValueError, IndexError, ProcessLookupError, UnicodeDecodeError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except PermissionError:
            raise MonkeyError(f"pid file {path} belongs to a running process") from None
        except OSError as e:
            raise MonkeyError(f"pid file {path}: {e.strerror or e}") from None
        else:
            if old != os.getpid():
                raise MonkeyError(f"pid file {path}: MilterMonkey already runs as pid {old}")
    # Written beside it and renamed over it: whoever reads the pid file sees
    # either no file or the whole pid, never an empty one.
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise MonkeyError(f"cannot write pid file {path}: {e.strerror or e}") from None


def remove_pidfile(path: str | None) -> None:
    if not path:
        return
    with contextlib.suppress(OSError, ValueError):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return
        if int(Path(path).read_text().split()[0]) == os.getpid():
            os.unlink(path)
