"""Dropping root after the milter socket is bound (the ``user`` and ``group`` options).

The order matters: the socket may need root (a port below 1024, a socket
directory only root can write), so it is opened first; then the process
switches for good to the configured user and group, before any brain is
built or any mail is read.  Root cannot be regained afterwards, which is
checked rather than assumed.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

import attrs

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.privileges")


@attrs.frozen
class Identity:
    """Who to become: numeric ids and the supplementary groups of the user."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str
    group: str
    home: str | None = None


def resolve(user: str | None, group: str | None) -> Identity | None:
    """Look ``user`` and ``group`` up; None when neither is configured.

    A missing group defaults to the user's primary group; a group without a
    user keeps the current user and changes only the group.
    """
    if not user and not group:
        return None
    pw = None
    if user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            try:
                pw = pwd.getpwuid(int(user))
            except (KeyError, ValueError):
                raise MonkeyError(f"user {user!r} does not exist") from None
    if group:
        try:
            gr = grp.getgrnam(group)
        except KeyError:
            try:
                gr = grp.getgrgid(int(group))
            except (KeyError, ValueError):
                raise MonkeyError(f"group {group!r} does not exist") from None
        gid, gname = gr.gr_gid, gr.gr_name
    elif pw is not None:
        gid = pw.pw_gid
        try:
            gname = grp.getgrgid(gid).gr_name
        except KeyError:
            gname = str(gid)
    else:  # pragma: no cover - excluded above
        return None
    if pw is not None:
        uid, uname, home = pw.pw_uid, pw.pw_name, pw.pw_dir
        groups = tuple(sorted(set(os.getgrouplist(uname, gid))))
    else:
        uid, home = os.geteuid(), None
        try:
            uname = pwd.getpwuid(uid).pw_name
        except KeyError:
            uname = str(uid)
        groups = (gid,)
    return Identity(uid=uid, gid=gid, groups=groups, user=uname, group=gname, home=home)


def drop_privileges(user: str | None, group: str | None) -> Identity | None:
    """Become ``user``/``group`` for good; a no-op when neither is set.

    Not running as root is fine when the process already is that user and
    group (a service manager switched for us); otherwise it is an error,
    because silently staying someone else is how permissions go wrong.
    """
    ident = resolve(user, group)
    if ident is None:
        return None
    if os.geteuid() != 0:
        if os.geteuid() == ident.uid and ident.gid in (os.getegid(), *os.getgroups()):
            return ident
        raise MonkeyError(
            f"cannot switch to user {ident.user!r} / group {ident.group!r}: not running as "
            "root (start as root, or leave user and group unset)"
        )
    os.setgroups(list(ident.groups))
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    if ident.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would be a kernel or libc bug
            raise MonkeyError("root could be regained after dropping privileges; refusing to run")
    if ident.home:
        os.environ["HOME"] = ident.home
    os.environ["USER"] = os.environ["LOGNAME"] = ident.user
    log.info("running as user %s (%d), group %s (%d)", ident.user, ident.uid, ident.group,
             ident.gid)
    return ident


def check_writable(path: str | None, what: str) -> str | None:
    """A warning if the (now unprivileged) process cannot write ``path``."""
    if path and not os.access(path, os.W_OK | os.X_OK):
        return f"{what} {path} is not writable by user {os.geteuid()}; spooling there will fail"
    return None
