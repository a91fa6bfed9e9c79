"""The UNIX socket file: created safely, secured, and removed only when it is ours.

A milter socket file outlives processes: a stale one must be cleaned up at
start, a live one (another daemon's) must never be taken over, and a
daemon leaving must not remove a successor's socket.  The file is
recognised by its device and inode, recorded right after bind.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
from pathlib import Path

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.daemon")


def prepare_unix_socket(path: str) -> None:
    """Remove a stale socket file, but never steal one a live milter still serves."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        p.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(p.lstat().st_mode):
        raise MonkeyError(f"{path} exists and is not a socket; refusing to remove it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
    except OSError:
        log.info("removing stale socket %s (nothing listens on it)", path)
        p.unlink()
    else:
        raise MonkeyError(f"another process is listening on {path}; stop it first")
    finally:
        s.close()


def secure_unix_socket(path: str, mode: int, group: str | None) -> None:
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise MonkeyError(f"socket_group {group!r} does not exist") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def socket_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket file, to recognise it as ours later."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def remove_unix_socket(path: str, ident: tuple[int, int] | None) -> bool:
    """Unlink ``path`` if it is still the socket we created (not a successor's)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (ident is not None and (st.st_dev, st.st_ino) != ident):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        log.warning("cannot remove socket %s: %s", path, e)
        return False
    return True
