"""The UNIX socket file: created safely, secured, and removed only when it is ours.

A milter socket file outlives processes: a stale one must be cleaned up at
start, a live one (another daemon's) must never be taken over, and a
daemon leaving must not remove a successor's socket, nor the socket of a
daemon it failed to replace.  The file is recognised by its device and
inode, recorded right after bind; a process that never bound the socket
has no identity for it and removes nothing.

The directories holding the socket are checked like OpenSSH's StrictModes
before binding, because whoever can rename entries in them can move the
socket aside and listen in its place (the MTA would then hand every
message to them):

* **refused** (the daemon does not start): a directory on the way that is
  writable by everyone without the sticky bit;
* **warned about** (the daemon starts, the log says why it should not):
  a socket directly in a world-writable directory with the sticky bit, like
  ``/tmp`` (another user can take the name while the daemon is not
  running; a directory of the daemon's own under ``/tmp`` is fine); a directory
  writable by a group other than root's and the daemon's; a directory
  owned by a user other than root and the daemon's.

A directory of its own (systemd's ``RuntimeDirectory=miltermonkey``, i.e.
``/run/miltermonkey``, or one inside Postfix's chroot owned by root) passes
without a word.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import stat
from pathlib import Path

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.daemon")


def directory_problems(path: str, uid: int | None = None,
                       gid: int | None = None) -> tuple[list[str], list[str]]:
    """What is wrong with the directories holding ``path``: (refusals, warnings).

    ``uid``/``gid`` are the daemon's own (default: this process's effective ones);
    root's are always trusted.
    """
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    refusals: list[str] = []
    warnings: list[str] = []
    d = Path(os.path.realpath(Path(path).parent))
    for directory in (d, *d.parents):
        try:
            st = os.stat(directory)
        except OSError:
            continue  # not there yet: created below, by us
        mode = st.st_mode
        sticky = bool(mode & stat.S_ISVTX)
        if mode & stat.S_IWOTH and not sticky:
            refusals.append(f"{directory} is writable by every user (mode "
                            f"{stat.S_IMODE(mode):04o}): anyone could replace the socket")
        elif mode & stat.S_IWOTH and directory == d:
            # (sticky: nobody else can rename what is in it; only the name can be taken)
            warnings.append(f"{directory} is world-writable (mode {stat.S_IMODE(mode):04o}, "
                            "sticky): another user can take the socket's name while the daemon "
                            "is not running")
        elif mode & stat.S_IWGRP and st.st_gid not in (0, gid) and not sticky:
            warnings.append(f"{directory} is writable by group {_group_name(st.st_gid)}: its "
                            "members could replace the socket")
        if st.st_uid not in (0, uid):
            warnings.append(f"{directory} is owned by {_user_name(st.st_uid)}, who could "
                            "replace the socket")
    return refusals, warnings


def _user_name(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def check_socket_directory(path: str) -> None:
    """Refuse a socket anyone could replace; warn about weaker spots (module doc)."""
    refusals, warnings = directory_problems(path)
    for w in warnings:
        log.warning("unix socket %s: %s; use a directory of its own such as "
                    "/run/miltermonkey", path, w)
    if refusals:
        raise MonkeyError(f"unix socket {path}: {refusals[0]}; refusing to listen there (use a "
                          "directory of its own such as /run/miltermonkey)")


def prepare_unix_socket(path: str) -> None:
    """Remove a stale socket file, but never steal one a live milter still serves."""
    check_socket_directory(path)
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
    """Unlink ``path`` if it is still the socket we created (not a successor's).

    ``ident`` None means we never bound it: the file there is someone else's
    (a running daemon we failed to replace) and stays.
    """
    if ident is None:
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != ident:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        log.warning("cannot remove socket %s: %s", path, e)
        return False
    return True
