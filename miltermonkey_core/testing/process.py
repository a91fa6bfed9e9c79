"""Processes, ports, commands and file ownership: what every part of the test stack needs.

The parts (:mod:`miltermonkey_core.testing.part` and its subclasses, here
and in the brain packages) start genuine daemons, and the same few
questions come up for each: is the program installed (daemons live in sbin
directories a non-login shell may not have on PATH), is this pid still that
daemon, is the port free again, what did the command print.  The answers
live here once, so an engine part written in a brain package behaves like
the core's own.

Rules every helper keeps:

* a zombie counts as dead, because orphaned daemons are reaped late by some
  init processes and a zombie would otherwise look alive forever;
* a process is signalled by the pid it wrote, never by name, and only its own
  process group is ever signalled, never the one the tests run in;
* listening ports are read from /proc/net/tcp, not probed, so that checking
  never starts an SMTP session or races a daemon binding the port.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "POLL_INTERVAL",
    "StackError",
    "StackTimeoutError",
    "binary",
    "child_pids",
    "chown",
    "free_port",
    "grant_traverse",
    "group_members",
    "is_root",
    "kill_group",
    "pid_alive",
    "pid_runs",
    "port_in_use",
    "proc_state",
    "process_group",
    "read_pidfile",
    "run_command",
    "run_with_tty",
    "send_signal",
    "tail",
    "terminate",
    "wait_port_free",
    "wait_until",
    "which",
]

# Daemons live in sbin directories that a non-login shell (or nox) may not
# have on PATH; looking there too keeps "is it installed" honest.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")
POLL_INTERVAL = 0.02


class StackError(RuntimeError):
    """A part of the test mail stack could not be started, stopped or queried."""


class StackTimeoutError(StackError, TimeoutError):
    """Something expected from a running part did not happen in time."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing is bound to right now.

    The kernel picks it, so parallel test runs do not collide on fixed ports.
    Another process may still take it before the caller binds it; the window
    is small enough for tests.
    """
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        # The kernel may offer a just-closed port again; a fixture asking for
        # a sink port and an smtpd port in a row must get two different ones.
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise StackError("free_port: the kernel keeps offering ports already handed out")


def which(name: str) -> str | None:
    """The path of program *name*, looking in the sbin directories too, or None."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def binary(name: str) -> str:
    """The path of program *name*; :class:`StackError` naming it when it is missing."""
    found = which(name)
    if found is None:
        raise StackError(f"{name} is not installed (looked in PATH and {', '.join(_EXTRA_PATH)})")
    return found


def is_root() -> bool:
    """Daemons only switch to their own users, and Postfix only runs, when we are root."""
    return os.geteuid() == 0


def proc_state(pid: int) -> str | None:
    """Return the one-letter state from /proc/PID/stat, or None if no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # The command name may contain spaces and parentheses: the state follows the last ")".
    return raw[raw.rfind(")") + 2 :][:1] or "?"


def pid_alive(pid: int) -> bool:
    """Is *pid* a live process?  Zombies count as dead: they hold no sockets or files."""
    if pid <= 0:
        return False
    state = proc_state(pid)
    if state is None:
        return False
    if state in ("Z", "X", "x"):
        return False
    if state != "?":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_group(pid: int) -> int | None:
    """The process group of *pid* from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 else None


def group_members(pgid: int) -> list[int]:
    """Live processes of process group *pgid* (a daemon and the workers it forked)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_group(int(entry.name)) == pgid:
            pid = int(entry.name)
            if pid_alive(pid):
                members.append(pid)
    return members


def child_pids(ppid: int) -> list[int]:
    """Pids whose parent is *ppid* (a master's service processes, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(ppid):
            found.append(int(entry.name))
    return found


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = POLL_INTERVAL
) -> bool:
    """Poll *predicate* until it holds or *timeout* passes; say which happened.

    Daemons report readiness in files, sockets and /proc, none of which can
    be waited on directly.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def send_signal(pid: int, sig: signal.Signals) -> None:
    """Signal *pid*; a process that already exited is not an error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a daemon's own process group, never the one the tests run in."""
    if pgid <= 1 or pgid == os.getpgrp():
        return
    for pid in group_members(pgid):
        send_signal(pid, sig)


def stop_popen(proc: subprocess.Popen[Any], timeout: float,
               sig: signal.Signals = signal.SIGTERM,
               kill_timeout: float | None = 5.0) -> int | None:
    """Signal a child we started, give it *timeout* to exit, then SIGKILL it.

    Returns its exit status.  *kill_timeout* None waits for the killed child
    however long the kernel takes to reap it.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_timeout)
    return proc.returncode


def terminate(pid: int, timeout: float, group: bool = False) -> None:
    """SIGTERM *pid*, then SIGKILL it (and, with *group*, its process group) if it lingers."""
    pgid = process_group(pid) if group else None
    if pid_alive(pid):
        send_signal(pid, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(pid), timeout):
            send_signal(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), 5.0)
    # Workers of a killed parent may still hold the listening socket.
    if pgid is not None and pgid == pid and not wait_until(lambda: not group_members(pgid), 2.0):
        kill_group(pgid, signal.SIGKILL)
        wait_until(lambda: not group_members(pgid), 5.0)


def pid_runs(pid: int, program: str) -> bool:
    """Is *pid* alive and still the *program* whose pid file named it?

    A pid file can outlive its daemon (a crash, a SIGKILL), and the kernel
    may give the number to an unrelated process; signalling that one would
    be a disaster.
    """
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell (no /proc): trust the pid file
    return program.encode() in cmdline


def read_pidfile(path: Path) -> int | None:
    """The pid on the first line of *path*, or None when there is no usable one."""
    try:
        first = path.read_text(encoding="ascii", errors="replace").strip().splitlines()
    except OSError:
        return None
    if not first:
        return None
    try:
        return int(first[0].split()[0])
    except (ValueError, IndexError):
        return None


def _hex_addr(address: str) -> str:
    # /proc/net/tcp prints the address as a native-endian 32-bit number.
    return f"{int.from_bytes(socket.inet_aton(address), sys.byteorder):08X}"


_LISTEN = "0A"
_V4_ANY = "0" * 8
_V6_ANY = "0" * 32


def port_in_use(port: int) -> bool:
    """Does something listen on 127.0.0.1:*port* (or on every address)?

    Read from /proc/net/tcp instead of probed: a connection would start a
    real SMTP session (and wake the milters under test), and a probing bind
    could collide with a daemon that binds the port at that very moment.
    """
    wanted = {f"{_hex_addr('127.0.0.1')}:{port:04X}", f"{_V4_ANY}:{port:04X}"}
    try:
        tables = [Path("/proc/net/tcp").read_text(encoding="ascii")]
    except OSError:
        return _bind_fails(port)
    with contextlib.suppress(OSError):
        tables.append(Path("/proc/net/tcp6").read_text(encoding="ascii"))
        wanted.add(f"{_V6_ANY}:{port:04X}")
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _LISTEN and fields[1] in wanted:
                return True
    return False


def _bind_fails(port: int) -> bool:
    """Fallback for systems without /proc: would a server fail to bind *port* now?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
        return False


def wait_port_free(port: int, timeout: float, what: str) -> None:
    """Return once nothing listens on *port*, so the next test can bind it at once."""
    if not wait_until(lambda: not port_in_use(port), timeout):
        raise StackError(f"{what}: port 127.0.0.1:{port} still in use {timeout:g}s after stop")


def tail(path: Path, lines: int = 25) -> str:
    """The last *lines* of a log, for error messages ("timed out" alone tells nobody why)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    text = data[-16384:].decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def run_command(
    cmd: Sequence[str], timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run a short command; return its exit status and combined output.

    Output goes through a temporary file, not a pipe: daemons started by the
    command may inherit the descriptors and would keep a pipe open forever.
    """
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env=None if env is None else dict(env),
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"{' '.join(cmd)} did not finish in {timeout:g}s") from exc
        out.seek(0)
        return proc.returncode, out.read().decode("utf-8", errors="replace")


def run_with_tty(cmd: Sequence[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run *cmd* with stderr on a pseudo-terminal and return its status and output.

    Postfix commands send their errors to the maillog_file service when stderr
    is not a terminal, and while Postfix is down nothing writes that log: the
    message would vanish.  A pty makes them print it.
    """
    master, slave = pty.openpty()
    chunks: list[bytes] = []
    try:
        proc = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True
        )
        os.close(slave)
        slave = -1
        deadline = time.monotonic() + timeout

        def read() -> bool:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return False
            chunks.append(data)
            return bool(data)

        while True:
            if select.select([master], [], [], 0.1)[0]:
                if read():
                    continue
                break
            if proc.poll() is not None:
                # It may have written its last words just before exiting.
                while select.select([master], [], [], 0)[0] and read():
                    pass
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise StackError(f"{' '.join(cmd)} did not finish in {timeout:g}s")
        status = proc.wait()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return status, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def _user_ids(user: str) -> tuple[int, int, set[int]]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, set(os.getgrouplist(user, entry.pw_gid))


def grant_traverse(path: Path, user: str) -> None:
    """Let *user* search every directory from / down to *path* (root only)."""
    if not is_root():
        return
    uid, _gid, groups = _user_ids(user)
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            needed = stat.S_IXUSR
        elif st.st_gid in groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            directory.chmod(stat.S_IMODE(st.st_mode) | needed)


def chown(path: Path, user: str, group: str | None = None, recursive: bool = False) -> None:
    """Give *path* to the daemon's user (root only), since it writes there after dropping root."""
    if not is_root():
        return
    paths: Iterator[Path] = iter([path])
    if recursive:
        paths = iter([path, *path.rglob("*")])
    for item in paths:
        try:
            shutil.chown(item, user, group)
        except LookupError as exc:
            raise StackError(f"cannot give {item} to {user}:{group or '-'}: {exc}") from None
