"""Private instances of real mail software (Postfix, smtp-sink, clamd, spamd) for tests.

A milter is only proven when a real MTA talks to it and real engines answer it,
so the end-to-end and engine tests start the genuine Debian binaries instead of
fakes.  Every part here:

* lives entirely under a state directory the caller owns (give each part its
  own), listens on loopback only and never touches the system's instances;
* is stopped by the pid it wrote (never by process name), so parallel runs and
  a developer's own daemons are safe;
* counts a zombie as dead, because orphaned daemons are reaped late by some
  init processes and a zombie would otherwise look alive forever;
* waits until its port is free again after ``stop()``, so the next test can
  bind it at once;
* raises :class:`StackError` with the tail of its log when it cannot start,
  because "timed out" alone tells nobody what went wrong.

The daemons drop root for their own users (``nobody``, ``postfix``,
``clamav``, ``debian-spamd``).  They can only do that if those users can walk
into the state directory, and pytest's temporary base directory is private
(mode 0700), so when run as root the parts add the search bit (``o+x``, never
read) to the ancestors that lack it.

Tests decide whether a missing part is a skip or a failure with
:func:`require_or_skip`: CI sets ``MILTERMONKEY_REQUIRE_STACK=1`` so that a
broken installation cannot pass as "all skipped".
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import pty
import pwd
import re
import select
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import attrs

__all__ = [
    "EICAR",
    "EICAR_SIGNATURE",
    "GTUBE",
    "Clamd",
    "Postfix",
    "SinkMessage",
    "SmtpResult",
    "SmtpSink",
    "SmtpStage",
    "Spamd",
    "StackError",
    "StackPart",
    "StackTimeoutError",
    "free_port",
    "parse_dump",
    "require_or_skip",
    "send_mail",
]

#: The 68-byte EICAR anti-virus test string.  Kept as bytes so that no
#: scanner on a developer's machine quarantines this source file.
EICAR: bytes = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

#: The name clamd reports for :data:`EICAR` with the default database
#: (clamd appends ``.UNOFFICIAL`` to every signature it did not ship).
EICAR_SIGNATURE = "MilterMonkey.Test.EICAR.UNOFFICIAL"

#: SpamAssassin's GTUBE test string; Debian's shipped rules score it 1000.
GTUBE: bytes = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

REQUIRE_ENV = "MILTERMONKEY_REQUIRE_STACK"

# Daemons live in sbin directories that a non-login shell (or nox) may not
# have on PATH; looking there too keeps "is it installed" honest.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_POLL = 0.02


class StackError(RuntimeError):
    """A part of the test mail stack could not be started, stopped or queried."""


class StackTimeoutError(StackError, TimeoutError):
    """Something expected from a running part did not happen in time."""


# --------------------------------------------------------------------------
# small process, port and file helpers
# --------------------------------------------------------------------------


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


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def _binary(name: str) -> str:
    found = _which(name)
    if found is None:
        raise StackError(f"{name} is not installed (looked in PATH and {', '.join(_EXTRA_PATH)})")
    return found


def _is_root() -> bool:
    return os.geteuid() == 0


def _proc_state(pid: int) -> str | None:
    """Return the one-letter state from /proc/PID/stat, or None if no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # The command name may contain spaces and parentheses: the state follows the last ")".
    return raw[raw.rfind(")") + 2 :][:1] or "?"


def _pid_alive(pid: int) -> bool:
    """Is *pid* a live process?  Zombies count as dead: they hold no sockets or files."""
    if pid <= 0:
        return False
    state = _proc_state(pid)
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


def _process_group(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 else None


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group *pgid* (a daemon and the workers it forked)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _process_group(int(entry.name)) == pgid:
            pid = int(entry.name)
            if _pid_alive(pid):
                members.append(pid)
    return members


def _children(ppid: int) -> list[int]:
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


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = _POLL) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a daemon's own process group, never the one the tests run in."""
    if pgid <= 1 or pgid == os.getpgrp():
        return
    for pid in _group_members(pgid):
        _signal(pid, sig)


def _terminate(pid: int, timeout: float, group: bool = False) -> None:
    """SIGTERM *pid*, then SIGKILL it (and, with *group*, its process group) if it lingers."""
    pgid = _process_group(pid) if group else None
    if _pid_alive(pid):
        _signal(pid, signal.SIGTERM)
        if not _wait_until(lambda: not _pid_alive(pid), timeout):
            _signal(pid, signal.SIGKILL)
            _wait_until(lambda: not _pid_alive(pid), 5.0)
    # Workers of a killed parent may still hold the listening socket.
    if pgid is not None and pgid == pid and not _wait_until(lambda: not _group_members(pgid), 2.0):
        _kill_group(pgid, signal.SIGKILL)
        _wait_until(lambda: not _group_members(pgid), 5.0)


def _pid_runs(pid: int, program: str) -> bool:
    """Is *pid* alive and still the *program* whose pid file named it?

    A pid file can outlive its daemon (a crash, a SIGKILL), and the kernel
    may give the number to an unrelated process; signalling that one would
    be a disaster.
    """
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell (no /proc): trust the pid file
    return program.encode() in cmdline


def _read_pidfile(path: Path) -> int | None:
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


def _port_in_use(port: int) -> bool:
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


def _wait_port_free(port: int, timeout: float, what: str) -> None:
    if not _wait_until(lambda: not _port_in_use(port), timeout):
        raise StackError(f"{what}: port 127.0.0.1:{port} still in use {timeout:g}s after stop")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    text = data[-16384:].decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _run(
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


def _run_with_tty(cmd: Sequence[str], timeout: float = 60.0) -> tuple[int, str]:
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


def _grant_traverse(path: Path, user: str) -> None:
    """Let *user* search every directory from / down to *path* (root only)."""
    if not _is_root():
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


def _chown(path: Path, user: str, group: str | None = None, recursive: bool = False) -> None:
    if not _is_root():
        return
    paths: Iterator[Path] = iter([path])
    if recursive:
        paths = iter([path, *path.rglob("*")])
    for item in paths:
        try:
            shutil.chown(item, user, group)
        except LookupError as exc:
            raise StackError(f"cannot give {item} to {user}:{group or '-'}: {exc}") from None


# --------------------------------------------------------------------------
# the common base
# --------------------------------------------------------------------------

# Strong references: a part that is still running must not be garbage
# collected (a running Popen would warn, and nobody could stop the daemon).
_RUNNING: set[StackPart] = set()


@atexit.register
def _stop_leftovers() -> None:
    # A test run that crashes between start() and stop() must not leave
    # daemons behind on the CI machine.
    for part in list(_RUNNING):
        with contextlib.suppress(Exception):
            part.stop()


class StackPart:
    """Behaviour shared by every part: availability, context manager, errors.

    Subclasses name the executables they need in :attr:`binaries`; that is
    what :meth:`available` checks, so tests can skip (or, in CI, fail) with a
    reason that names the missing package.
    """

    #: Human-readable name used in messages.
    name: ClassVar[str] = "part"
    #: Executables that must be installed.
    binaries: ClassVar[tuple[str, ...]] = ()
    #: Debian package that provides them (named in skip reasons).
    package: ClassVar[str] = ""
    #: System user the daemon switches to when started as root.
    run_as: ClassVar[str | None] = None
    #: Whether the part only works when the tests run as root.
    needs_root: ClassVar[bool] = False

    state_dir: Path
    start_timeout: float
    stop_timeout: float

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.start_timeout = 60.0
        self.stop_timeout = 10.0

    # -- availability ------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this part cannot run on this machine, or None if it can."""
        missing = [name for name in cls.binaries if _which(name) is None]
        if missing:
            return (
                f"{cls.name}: {', '.join(missing)} not installed"
                f" (Debian package {cls.package}; see .ci/install-system.sh)"
            )
        if cls.needs_root and not _is_root():
            return f"{cls.name}: needs root (tests run as uid {os.geteuid()})"
        if cls.run_as is not None and _is_root():
            try:
                pwd.getpwnam(cls.run_as)
            except KeyError:
                return f"{cls.name}: system user {cls.run_as!r} does not exist"
        return None

    @classmethod
    def available(cls) -> bool:
        """True when the executables are installed and the part can run here."""
        return cls.unavailable_reason() is None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the part and return once it serves requests."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the part; safe to call when it is not running."""
        raise NotImplementedError

    def is_running(self) -> bool:
        """True while the part's main process is alive (zombies count as dead)."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """The file the part logs to; its tail ends up in :class:`StackError`."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state_dir} running={self.is_running()}>"

    # -- helpers for subclasses --------------------------------------------

    def _error(self, message: str, log: Path | None = None) -> StackError:
        log = log or self.log_path
        return StackError(
            f"{self.name} ({self.state_dir}): {message}\n--- last lines of {log} ---\n{_tail(log)}"
        )

    def _prepare_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            _grant_traverse(self.state_dir, self.run_as)

    def _check_port_free(self, port: int) -> None:
        if _port_in_use(port):
            raise StackError(f"{self.name}: 127.0.0.1:{port} is already in use")


class _ChildProcessPart(StackPart):
    """A part that runs in the foreground as our own child process.

    Being its parent means we reap it ourselves: no pid file races and no
    zombies waiting for init.
    """

    _proc: subprocess.Popen[bytes] | None

    def __init__(self, state_dir: Path | str) -> None:
        super().__init__(state_dir)
        self._proc = None

    @property
    def pid(self) -> int | None:
        """Pid of the running process, or None."""
        return self._proc.pid if self._proc is not None and self.is_running() else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, cmd: Sequence[str], output: Path, cwd: Path | None = None) -> None:
        with output.open("ab") as out:
            self._proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                close_fds=True,
                # Its own session: a Ctrl-C meant for pytest must not kill the
                # daemon before the fixtures' stop() runs.
                start_new_session=True,
            )
        _RUNNING.add(self)

    def _reap(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        _RUNNING.discard(self)

    def _wait_ready(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            proc = self._proc
            if proc is None or proc.poll() is not None:
                status = None if proc is None else proc.returncode
                self._reap()
                raise self._error(f"exited during startup (status {status})")
            if time.monotonic() > deadline:
                self._reap()
                raise self._error(f"not ready after {self.start_timeout:g}s")
            time.sleep(_POLL)


# --------------------------------------------------------------------------
# smtp-sink
# --------------------------------------------------------------------------

_ADDRESS = re.compile(r"^\s*(?:from:|to:)?\s*<([^>]*)>", re.IGNORECASE)


def _address(args: str) -> str:
    match = _ADDRESS.match(args)
    if match:
        return match.group(1)
    words = args.split(maxsplit=1)
    return words[0] if words else ""


@attrs.frozen
class SinkMessage:
    """One message as Postfix delivered it to :class:`SmtpSink`.

    ``message`` is the message exactly as smtp-sink stored it: dot-unstuffed,
    with LF line endings (smtp-sink writes text lines).
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes
    client_addr: str = ""
    helo: str | None = None
    mail_args: str = ""
    rcpt_args: tuple[str, ...] = ()
    path: Path | None = None

    def _split(self) -> tuple[bytes, bytes]:
        msg = self.message
        if msg.startswith((b"\n", b"\r\n")):  # no header at all
            return b"", msg.split(b"\n", 1)[1]
        for sep in (b"\r\n\r\n", b"\n\n"):
            head, found, body = msg.partition(sep)
            if found and b"\n\n" not in head and b"\r\n\r\n" not in head:
                return head + sep[: len(sep) // 2], body
        return msg, b""  # no blank line: all header

    def headers(self) -> list[tuple[str, str]]:
        """The header fields in order, unfolded, as (name, value) pairs."""
        head, _body = self._split()
        fields: list[tuple[str, str]] = []
        for raw in re.split(rb"\r?\n", head):
            if not raw:
                continue
            line = raw.decode("utf-8", errors="replace")
            if line[0] in " \t" and fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line)
                continue
            name, _colon, value = line.partition(":")
            fields.append((name.strip(), value.lstrip(" \t")))
        return fields

    def header(self, name: str) -> str | None:
        """The value of the first header named *name* (any case), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """All values of the headers named *name* (any case), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers() if key.lower() == wanted]

    @property
    def body(self) -> bytes:
        """Everything after the blank line that ends the header."""
        return self._split()[1]


def parse_dump(path: Path | str) -> SinkMessage:
    """Parse one ``smtp-sink -d`` dump file.

    The format (smtp-sink(1), "DUMP FILE FORMAT"): records ``X-Client-Addr``,
    ``X-Client-Proto``, ``X-Helo-Args`` (if HELO/EHLO was sent),
    ``X-Mail-Args`` (the MAIL FROM arguments, e.g. ``<a@b> SIZE=5``) and one
    ``X-Rcpt-Args`` per recipient, then a three-line ``Received:`` header that
    marks the end of smtp-sink's own records, then the message as received,
    then one empty line.
    """
    path = Path(path)
    data = path.read_bytes()
    records: list[tuple[str, str]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end].decode("utf-8", errors="replace")
        pos = end + 1
        name, _colon, value = line.partition(":")
        if name.lower() == "received":
            # Skip the continuation lines of smtp-sink's Received: header.
            while pos < len(data) and data[pos : pos + 1] in (b" ", b"\t"):
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end + 1
            break
        records.append((name.lower(), value.strip()))
    else:
        raise StackError(f"{path}: not an smtp-sink dump (no Received: record)")
    message = data[pos:]
    # smtp-sink ends each dump with one empty line of its own.
    if message.endswith(b"\n"):
        message = message[:-1]
    mail_args = next((v for k, v in records if k == "x-mail-args"), "")
    rcpt_args = tuple(v for k, v in records if k == "x-rcpt-args")
    return SinkMessage(
        sender=_address(mail_args),
        recipients=tuple(_address(args) for args in rcpt_args),
        message=message,
        client_addr=next((v for k, v in records if k == "x-client-addr"), ""),
        helo=next((v for k, v in records if k == "x-helo-args"), None),
        mail_args=mail_args,
        rcpt_args=rcpt_args,
        path=path,
    )


class SmtpSink(_ChildProcessPart):
    """Postfix's ``smtp-sink``: accepts any mail and dumps each message to a file.

    This is the "next hop" of :class:`Postfix`, so tests can see exactly what
    a milter did to a message after the MTA applied it.
    """

    name = "smtp-sink"
    binaries = ("smtp-sink",)
    package = "postfix"
    run_as = "nobody"

    port: int

    def __init__(self, state_dir: Path | str, port: int) -> None:
        super().__init__(state_dir)
        self.port = port

    @property
    def dump_dir(self) -> Path:
        """Where the dumps go (one file per message, in hourly folders)."""
        return self.state_dir / "dumps"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "smtp-sink.log"

    def start(self) -> None:
        if self.is_running():
            return
        self._prepare_state_dir()
        self._check_port_free(self.port)
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        cmd = [_binary("smtp-sink")]
        if _is_root():
            # smtp-sink refuses to run as root; the dumps then belong to nobody.
            _chown(self.dump_dir, "nobody", recursive=True)
            cmd += ["-u", "nobody"]
        # A template relative to its working directory: smtp-sink then never
        # walks the path from / again.  Every new pytest session resets its
        # base directory to 0700, and nobody could no longer reach an
        # absolute path (smtp-sink dies on the first failed open).
        cmd += ["-d", "%Y%m%d%H/%M.", f"127.0.0.1:{self.port}", "1000"]
        self._spawn(cmd, self.log_path, cwd=self.dump_dir)
        self._wait_ready(lambda: _port_in_use(self.port))

    def stop(self) -> None:
        self._reap()
        _wait_port_free(self.port, self.stop_timeout, self.name)

    def _open_files(self) -> set[str] | None:
        """Paths the sink holds open, or None when /proc cannot tell us."""
        pid = self.pid
        if pid is None:
            return set()
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            links = set()
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    links.add(os.readlink(fd))
        except OSError:
            return None
        return links

    def messages(self) -> list[Path]:
        """Dumps of completely received messages, oldest first.

        smtp-sink creates the file when DATA starts and fills it while the
        message arrives.  A dump counts as complete once the sink no longer
        holds it open; where /proc cannot tell, once its size stopped changing.
        """
        if not self.dump_dir.exists():
            return []
        files = [p for p in self.dump_dir.rglob("*") if p.is_file()]
        open_files = self._open_files()
        if open_files is None:
            sizes = {p: p.stat().st_size for p in files}
            time.sleep(0.2)
            done = [p for p in files if p.stat().st_size == sizes[p]]
        else:
            done = [p for p in files if str(p) not in open_files]

        def age(path: Path) -> tuple[int, str]:
            return path.stat().st_mtime_ns, str(path)

        return sorted(done, key=age)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least *count* complete dumps exist and return all of them."""
        found: list[Path] = []

        def enough() -> bool:
            nonlocal found
            found = self.messages()
            return len(found) >= count

        if not _wait_until(enough, timeout, 0.05):
            raise StackTimeoutError(
                f"{self.name}: {len(found)} of {count} messages arrived within {timeout:g}s"
                f" in {self.dump_dir}"
            )
        return found

    def wait_for_text(self, needle: bytes, timeout: float = 30.0) -> Path:
        """Wait for a complete dump that contains *needle* and return its path."""
        hit: list[Path] = []

        def search() -> bool:
            for path in self.messages():
                if needle in path.read_bytes():
                    hit.append(path)
                    return True
            return False

        if not _wait_until(search, timeout, 0.05):
            raise StackTimeoutError(
                f"{self.name}: no message containing {needle!r} within {timeout:g}s"
                f" ({len(self.messages())} messages in {self.dump_dir})"
            )
        return hit[0]

    def clear(self) -> None:
        """Delete every dump, so the next wait only sees new messages."""
        if not self.dump_dir.exists():
            return
        for child in self.dump_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


# --------------------------------------------------------------------------
# SMTP client
# --------------------------------------------------------------------------

SmtpStage = Literal["connect", "helo", "mail", "rcpt", "data"]


@attrs.frozen
class SmtpResult:
    """What an SMTP client saw for one message.

    ``code``/``text`` are the final reply (``text`` includes the enhanced
    status code, e.g. ``"5.7.1 Message rejected"``; lines of a multi-line
    reply are joined with newlines).  ``stage`` names the command that failed,
    or is None when the message was accepted.
    """

    code: int
    text: str
    stage: SmtpStage | None = None
    #: Recipients refused while others were accepted: address -> (code, text).
    refused: Mapping[str, tuple[int, str]] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        """True when the server accepted the message."""
        return self.stage is None and 200 <= self.code < 300

    @property
    def reply(self) -> str:
        """Code and text as the server sent them, e.g. ``"550 5.7.1 Rejected"``."""
        return f"{self.code} {self.text}"

    @property
    def queue_id(self) -> str | None:
        """Postfix's queue id from ``250 2.0.0 Ok: queued as ID``, if any."""
        match = re.search(r"queued as ([0-9A-Za-z]+)", self.text)
        return match.group(1) if match and self.ok else None

    def __str__(self) -> str:
        where = f" at {self.stage}" if self.stage else ""
        return f"{self.reply}{where}"


def _reply(code: int, raw: bytes | str) -> tuple[int, str]:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return code, text


def send_mail(
    port: int,
    raw: bytes,
    sender: str,
    recipients: Sequence[str],
    host: str = "127.0.0.1",
    helo: str = "client.test",
    timeout: float = 120.0,
) -> SmtpResult:
    """Send *raw* over SMTP and report the outcome instead of raising.

    Tests assert on what the client saw ("550 5.7.1 ..." at end of data), so
    4xx/5xx replies are returned as data.  Bare LF line endings in *raw* are
    sent as CRLF, as SMTP requires.
    """
    payload = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    if isinstance(recipients, str):
        recipients = [recipients]
    try:
        client = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)
    except smtplib.SMTPConnectError as exc:
        return SmtpResult(*_reply(exc.smtp_code, exc.smtp_error), stage="connect")
    except (OSError, smtplib.SMTPException) as exc:
        return SmtpResult(0, f"cannot connect to {host}:{port}: {exc}", stage="connect")
    stage: SmtpStage = "helo"
    try:
        code, text = _reply(*client.ehlo(helo))
        if not 200 <= code < 300:
            code, text = _reply(*client.helo(helo))
            if not 200 <= code < 300:
                return SmtpResult(code, text, stage="helo")
        options = []
        if any(byte > 0x7F for byte in payload) and client.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        stage = "mail"
        code, text = _reply(*client.mail(sender, options))
        if not 200 <= code < 300:
            return SmtpResult(code, text, stage="mail")
        stage = "rcpt"
        refused: dict[str, tuple[int, str]] = {}
        for rcpt in recipients:
            code, text = _reply(*client.rcpt(rcpt))
            if not 200 <= code < 300:
                refused[rcpt] = (code, text)
        if len(refused) == len(recipients):
            code, text = refused[recipients[-1]] if recipients else (0, "no recipients")
            return SmtpResult(code, text, stage="rcpt", refused=refused)
        stage = "data"
        try:
            code, text = _reply(*client.data(payload))
        except smtplib.SMTPDataError as exc:  # the DATA command itself was refused
            return SmtpResult(*_reply(exc.smtp_code, exc.smtp_error), "data", refused)
        # smtplib returns the reply to the final dot instead of raising.
        final_stage: SmtpStage | None = None if 200 <= code < 300 else "data"
        return SmtpResult(code, text, stage=final_stage, refused=refused)
    except smtplib.SMTPResponseException as exc:
        return SmtpResult(*_reply(exc.smtp_code, exc.smtp_error), stage=stage)
    except (smtplib.SMTPException, OSError) as exc:
        return SmtpResult(0, f"connection failed: {exc}", stage=stage)
    finally:
        # Not "with client": its QUIT may raise after the message was accepted.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------

_MASTER_CF = """\
# Generated by miltermonkey_core.testing.stack: only what a relay needs
# (pickup: postqueue -f refuses to run without it).
# service  type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
flush      unix  n       -       n       1000?   0       flush
showq      unix  n       -       n       -       -       showq
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
proxymap   unix  -       -       n       -       -       proxymap
postlog    unix-dgram n  -       n       -       1       postlogd
"""


# Used when /etc/postfix/postfix-files is missing; same format, same content.
_QUEUE_DIRS = [
    "$data_directory:d:$mail_owner:-:700:uc",
    "$queue_directory:d:root:-:755:uc",
    *(
        f"$queue_directory/{name}:d:$mail_owner:-:700:ucr"
        for name in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "saved",
            "trace",
        )
    ),
    "$queue_directory/private:d:$mail_owner:-:700:uc",
    "$queue_directory/maildrop:d:$mail_owner:$setgid_group:730:uc",
    "$queue_directory/public:d:$mail_owner:$setgid_group:710:uc",
    "$queue_directory/pid:d:root:-:755:uc",
]


class Postfix(StackPart):
    """A private Postfix that relays everything to ``[127.0.0.1]:relay_port``.

    Its config, queue and data directories and its log live under the state
    directory, and it is started with ``postfix -c DIR``, so several can run
    beside each other and beside a system Postfix.  No chroot, no DNS, no
    local delivery: only smtpd -> milters -> queue -> smtp to the sink.
    """

    name = "postfix"
    binaries = ("postfix", "postconf", "postqueue", "postsuper")
    package = "postfix"
    run_as = "postfix"
    needs_root = True

    #: main.cf settings besides the paths; *extra* and :meth:`postconf` override them.
    #: The timeouts are shorter than Postfix's defaults so a hung milter shows
    #: up within a test's patience, yet long enough for a slow CI machine.
    DEFAULTS: ClassVar[Mapping[str, str]] = {
        "compatibility_level": "3.6",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "mta.milter.test",
        "mydomain": "milter.test",
        "myorigin": "$myhostname",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtp_connect_timeout": "5s",
        "smtpd_error_sleep_time": "0s",
        "smtpd_soft_error_limit": "100",
        "smtpd_hard_error_limit": "200",
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "in_flow_delay": "0s",
        "default_destination_concurrency_limit": "20",
        "smtp_destination_concurrency_limit": "20",
        "delay_warning_time": "0h",
        "non_smtpd_milters": "",
        "milter_protocol": "6",
        "milter_connect_timeout": "5s",
        "milter_command_timeout": "15s",
        "milter_content_timeout": "60s",
    }

    smtp_port: int
    relay_port: int

    def __init__(
        self,
        state_dir: Path | str,
        smtp_port: int,
        relay_port: int,
        milters: str = "",
        milter_default_action: str = "tempfail",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(state_dir)
        self.smtp_port = smtp_port
        self.relay_port = relay_port
        self._settings: dict[str, str] = dict(self.DEFAULTS)
        self._settings.update(
            {
                "config_directory": str(self.config_dir),
                "queue_directory": str(self.queue_dir),
                "data_directory": str(self.data_dir),
                "command_directory": "/usr/sbin",
                "daemon_directory": "/usr/lib/postfix/sbin",
                "meta_directory": "/etc/postfix",
                "shlib_directory": "/usr/lib/postfix",
                "maillog_file": str(self.log_path),
                "maillog_file_prefixes": f"/var, /dev/stdout, {self.state_dir}",
                "relayhost": f"[127.0.0.1]:{relay_port}",
                "smtpd_milters": milters,
                "milter_default_action": milter_default_action,
            }
        )
        self._settings.update(extra or {})
        self._configured = False

    # -- paths -------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        """config_directory (main.cf, master.cf); pass it to ``postfix -c``."""
        return self.state_dir / "etc"

    @property
    def queue_dir(self) -> Path:
        """queue_directory."""
        return self.state_dir / "spool"

    @property
    def data_dir(self) -> Path:
        """data_directory."""
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "maillog"

    @property
    def pid(self) -> int | None:
        """The master process's pid while it runs."""
        pid = _read_pidfile(self.queue_dir / "pid" / "master.pid")
        return pid if pid is not None and _pid_runs(pid, "master") else None

    def is_running(self) -> bool:
        return self.pid is not None

    # -- configuration -------------------------------------------------------

    def _configure(self) -> None:
        if self._configured:
            return
        self._prepare_state_dir()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        # Postfix insists on a root-owned config directory that nobody else
        # can write.
        self.state_dir.chmod(0o755)
        self.config_dir.chmod(0o755)
        self._create_queue_dirs()
        lines = ["# Generated by miltermonkey_core.testing.stack; change with postconf -e."]
        lines += [f"{key} = {value}" for key, value in self._settings.items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(port=self.smtp_port), encoding="utf-8"
        )
        self.log_path.touch()
        self._cool_down_main_cf()
        self._configured = True

    def _cool_down_main_cf(self) -> None:
        """Backdate main.cf so Postfix programs do not wait for it to "cool down".

        Every Postfix program re-reads a main.cf modified within the last
        second or two in 0.3 s steps (to avoid reading a half-written file);
        after each edit that costs about two seconds per command.  Our edits
        are complete when the file is closed.
        """
        main_cf = self.config_dir / "main.cf"
        past = time.time() - 10
        os.utime(main_cf, (past, past))

    def _create_queue_dirs(self) -> None:
        """Create the queue and data directories the way ``post-install`` would.

        ``postfix start`` normally runs ``post-install create-missing``, a shell
        script that takes about two seconds; creating the directories from
        Postfix's own manifest (postfix-files) and starting with the
        ``quick-start`` marker makes a test instance start in a fraction of that.
        """
        manifest = Path(self._settings["meta_directory"]) / "postfix-files"
        try:
            entries = manifest.read_text(encoding="utf-8").splitlines()
        except OSError:
            entries = _QUEUE_DIRS
        roots = {"$queue_directory": self.queue_dir, "$data_directory": self.data_dir}
        names = {
            "$mail_owner": self._settings["mail_owner"],
            "$setgid_group": self._settings["setgid_group"],
        }
        for entry in entries:
            fields = entry.split(":")
            if len(fields) < 5 or fields[1] != "d":
                continue
            root, _slash, rest = fields[0].partition("/")
            if root not in roots:
                continue
            directory = roots[root] / rest if rest else roots[root]
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(int(fields[4], 8))
            owner = names.get(fields[2], fields[2])
            group = None if fields[3] == "-" else names.get(fields[3], fields[3])
            _chown(directory, owner, group)

    def _postfix(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        return _run([_binary("postfix"), "-c", str(self.config_dir), *args], timeout)

    def _reload_count(self) -> int:
        try:
            return self.log_path.read_bytes().count(b"reload -- version")
        except OSError:
            return 0

    def param(self, name: str) -> str:
        """Current value of one main.cf parameter (defaults included)."""
        self._configure()
        status, out = _run(
            [_binary("postconf"), "-c", str(self.config_dir), "-h", name], timeout=30.0
        )
        if status != 0:
            raise StackError(f"{self.name}: postconf -h {name} failed: {out.strip()}")
        return out.rstrip("\n")

    def postconf(self, **params: str) -> None:
        """Change main.cf (``postconf -e``); a running Postfix reloads and applies it.

        Parameter names are Python keywords: ``postconf(milter_command_timeout="5s")``.
        """
        self._configure()
        if not params:
            return
        args = [f"{key}={value}" for key, value in params.items()]
        status, out = _run([_binary("postconf"), "-c", str(self.config_dir), "-e", *args])
        if status != 0:
            raise StackError(f"{self.name}: postconf -e {' '.join(args)} failed: {out.strip()}")
        self._settings.update(params)
        self._cool_down_main_cf()
        if self.is_running():
            self.reload()

    def set_milters(self, spec: str, **params: str) -> None:
        """Point ``smtpd_milters`` at *spec* (plus other settings) and apply it.

        Returns once new SMTP sessions use the new milters.
        """
        self.postconf(smtpd_milters=spec, **params)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        if self.is_running():
            return
        self._configure()
        self._check_port_free(self.smtp_port)
        self._create_queue_dirs()
        # quick-start: the directories exist, skip post-install's two seconds.
        (self.queue_dir / "quick-start").touch()
        # On a pty: without a terminal, postfix(1) and postfix-script send
        # their complaints only to the maillog service, which is not running
        # yet, so a failed start would say nothing.
        status, out = _run_with_tty([_binary("postfix"), "-c", str(self.config_dir), "start"])
        if status != 0:
            (self.queue_dir / "quick-start").unlink(missing_ok=True)
            with contextlib.suppress(StackError):
                self.stop()
            raise self._error(f"postfix start failed ({status}):\n{out}")
        pid = self.pid
        if pid is not None:
            _RUNNING.add(self)
        if not _wait_until(lambda: _port_in_use(self.smtp_port), self.start_timeout):
            self.stop()
            raise self._error(f"smtpd not listening on 127.0.0.1:{self.smtp_port}")
        if pid is None:
            raise self._error("no running master process after postfix start")

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            # The master's SIGTERM handler signals its whole process group
            # (it is a session leader); 'postfix stop' would add a 1 s sleep.
            _terminate(pid, self.stop_timeout, group=True)
        _RUNNING.discard(self)
        _wait_port_free(self.smtp_port, self.stop_timeout, self.name)

    def reload(self) -> None:
        """``postfix reload`` and wait until new SMTP sessions see the new config.

        ``postfix reload`` only signals the master.  The master re-reads main.cf
        when it handles the signal, and idle smtpd processes of the old
        generation exit soon after; until both happened a new connection could
        still be served with the old settings.
        """
        master = self.pid
        if master is None:
            raise StackError(f"{self.name}: reload while not running")
        before = self._reload_count()
        old = set(_children(master))
        status, out = self._postfix("reload")
        if status != 0:
            raise self._error(f"postfix reload failed ({status}): {out.strip()}")
        if not _wait_until(lambda: self._reload_count() > before, self.start_timeout):
            raise self._error("the master did not log the reload")
        # Idle processes leave within milliseconds; one still serving a session
        # (a test holding a connection open) finishes it with the old settings,
        # exactly as in production, so waiting for it would only stall.
        _wait_until(lambda: not any(_pid_alive(p) for p in old), 2.0)

    # -- logs and queue --------------------------------------------------------

    def maillog(self) -> str:
        """The whole maillog_file (what syslog would have received)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def queue(self) -> list[dict[str, Any]]:
        """Every queued message as ``postqueue -j`` describes it (queue_name, queue_id, ...)."""
        status, out = _run([_binary("postqueue"), "-c", str(self.config_dir), "-j"], timeout=30.0)
        if status != 0:
            raise self._error(f"postqueue -j failed ({status}): {out.strip()}")
        entries = []
        for line in out.splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries

    def queue_empty(self) -> bool:
        """True when no message waits in any queue (incoming, active, deferred, hold)."""
        return not self.queue()

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Wait until every accepted message left the queue (delivered or bounced)."""
        if not _wait_until(self.queue_empty, timeout, 0.1):
            left = ", ".join(f"{e.get('queue_id')}({e.get('queue_name')})" for e in self.queue())
            raise StackTimeoutError(f"{self.name}: queue not empty after {timeout:g}s: {left}")

    def flush(self) -> None:
        """Retry deferred mail now (``postqueue -f``) instead of after the backoff time."""
        status, out = _run([_binary("postqueue"), "-c", str(self.config_dir), "-f"], 30.0)
        if status != 0:
            raise self._error(f"postqueue -f failed ({status}): {out.strip()}")

    def hold_queue(self) -> list[str]:
        """Queue ids in the hold queue, where SMFIR_QUARANTINE puts a message."""
        return [str(e["queue_id"]) for e in self.queue() if e.get("queue_name") == "hold"]

    def deferred_count(self) -> int:
        """How many messages wait for a retry."""
        return sum(1 for e in self.queue() if e.get("queue_name") == "deferred")

    def purge_queue(self) -> None:
        """Delete every queued message (``postsuper -d ALL``)."""
        status, out = _run(
            [_binary("postsuper"), "-c", str(self.config_dir), "-d", "ALL"], timeout=30.0
        )
        if status != 0:
            raise self._error(f"postsuper -d ALL failed ({status}): {out.strip()}")


# --------------------------------------------------------------------------
# clamd
# --------------------------------------------------------------------------


def _clamd_command(
    address: tuple[str, int] | Path, command: bytes, payload: bytes | None, timeout: float
) -> str:
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(address) if isinstance(address, Path) else address)
        sock.sendall(b"z" + command + b"\0")
        if payload is not None:
            for start in range(0, len(payload), 65536):
                chunk = payload[start : start + 65536]
                sock.sendall(len(chunk).to_bytes(4, "big") + chunk)
            sock.sendall(b"\0\0\0\0")
        reply = b""
        while not reply.endswith(b"\0"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    return reply.rstrip(b"\0").decode("utf-8", errors="replace")


class Clamd(_ChildProcessPart):
    """A private clamd with a tiny signature database written by this class.

    There is no freshclam here (no network), and clamd refuses to start with
    an empty database, so the default database is one body signature for
    EICAR, which matches in plain bodies and (clamd decodes MIME) in
    base64 attachments.  It answers on TCP and on a UNIX socket, since
    milters use both.
    """

    name = "clamd"
    binaries = ("clamd",)
    package = "clamav-daemon"
    run_as = "clamav"

    tcp_port: int
    db_files: dict[str, str]

    def __init__(
        self, state_dir: Path | str, tcp_port: int, db_files: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(state_dir)
        self.tcp_port = tcp_port
        self.db_files = {"miltermonkey-eicar.ndb": f"MilterMonkey.Test.EICAR:0:*:{EICAR.hex()}\n"}
        self.db_files.update(db_files or {})

    @property
    def tcp_address(self) -> tuple[str, int]:
        """(host, port) for TCP clients."""
        return ("127.0.0.1", self.tcp_port)

    @property
    def unix_socket(self) -> Path:
        """The LocalSocket path."""
        return self.state_dir / "clamd.ctl"

    @property
    def config_path(self) -> Path:
        """The generated clamd.conf (``clamdscan -c`` accepts it too)."""
        return self.state_dir / "clamd.conf"

    @property
    def db_dir(self) -> Path:
        """DatabaseDirectory."""
        return self.state_dir / "db"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "clamd.log"

    def _write_config(self) -> None:
        self._prepare_state_dir()
        if self.db_dir.exists():
            shutil.rmtree(self.db_dir)
        self.db_dir.mkdir()
        for filename, content in self.db_files.items():
            (self.db_dir / filename).write_text(content, encoding="utf-8")
        settings = {
            "DatabaseDirectory": self.db_dir,
            "LocalSocket": self.unix_socket,
            # Milters under test may run as any user; the directory is private anyway.
            "LocalSocketMode": "666",
            "FixStaleSocket": "yes",
            "TCPSocket": self.tcp_port,
            "TCPAddr": "127.0.0.1",
            "PidFile": self.state_dir / "clamd.pid",
            "LogFile": self.log_path,
            "LogTime": "yes",
            "LogClean": "no",
            "Foreground": "yes",
            "ScanMail": "yes",
            "ScanArchive": "yes",
            "ScanHTML": "yes",
            "Bytecode": "no",
            "SelfCheck": "0",
            "ConcurrentDatabaseReload": "no",
            "MaxThreads": "8",
            "StreamMaxLength": "25M",
            "MaxFileSize": "25M",
            "MaxScanSize": "100M",
            "ReadTimeout": "60",
            "CommandReadTimeout": "10",
            "ExtendedDetectionInfo": "no",
        }
        if _is_root():
            settings["User"] = "clamav"
        text = "".join(f"{key} {value}\n" for key, value in settings.items())
        self.config_path.write_text(text, encoding="utf-8")
        # clamd drops to 'clamav' before it reads the database and creates
        # its socket and log, so the whole directory must be its own.
        _chown(self.state_dir, "clamav", "clamav", recursive=True)

    def start(self) -> None:
        if self.is_running():
            return
        self._check_port_free(self.tcp_port)
        self._write_config()
        for stale in (self.unix_socket, self.state_dir / "clamd.pid"):
            stale.unlink(missing_ok=True)
        self._spawn([_binary("clamd"), "-c", str(self.config_path)], self.state_dir / "clamd.out")
        self._wait_ready(lambda: self.ping() and self.unix_socket.exists())

    def _error(self, message: str, log: Path | None = None) -> StackError:
        # Errors before LogFile is open (a bad config line) only reach stdout.
        error = super()._error(message, log)
        out = self.state_dir / "clamd.out"
        return StackError(f"{error}\n--- last lines of {out} ---\n{_tail(out, 10)}")

    def stop(self) -> None:
        self._reap()
        _wait_port_free(self.tcp_port, self.stop_timeout, self.name)

    def kill(self) -> None:
        """SIGKILL clamd, the way an engine dies under a running milter."""
        self._reap(signal.SIGKILL)
        _wait_port_free(self.tcp_port, self.stop_timeout, self.name)

    def ping(self) -> bool:
        """True when clamd answers PING with PONG over TCP."""
        try:
            return _clamd_command(self.tcp_address, b"PING", None, 2.0) == "PONG"
        except OSError:
            return False

    def instream(self, data: bytes, via: Literal["tcp", "unix"] = "tcp") -> str:
        """Scan *data* with INSTREAM and return clamd's reply.

        e.g. ``"stream: OK"`` or ``"stream: MilterMonkey.Test.EICAR.UNOFFICIAL FOUND"``.
        """
        address: tuple[str, int] | Path = self.tcp_address if via == "tcp" else self.unix_socket
        return _clamd_command(address, b"INSTREAM", data, 30.0)


# --------------------------------------------------------------------------
# spamd
# --------------------------------------------------------------------------


class Spamd(StackPart):
    """A private spamd with Debian's shipped rules and no network tests.

    ``-L`` keeps SpamAssassin from DNS and URI blocklist lookups, which would
    time out on an offline machine; GTUBE still scores 1000.
    """

    name = "spamd"
    binaries = ("spamd",)
    package = "spamd"
    run_as = "debian-spamd"

    port: int
    max_children: int

    def __init__(self, state_dir: Path | str, port: int, max_children: int = 5) -> None:
        super().__init__(state_dir)
        self.port = port
        self.max_children = max_children

    @property
    def pid_file(self) -> Path:
        """spamd's pid file (``-r``); it holds the parent of the workers."""
        return self.state_dir / "spamd.pid"

    @property
    def home_dir(self) -> Path:
        """The helper home directory (``-H``)."""
        return self.state_dir / "home"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "spamd.log"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for spamc clients."""
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int | None:
        """The parent spamd's pid while it runs."""
        pid = _read_pidfile(self.pid_file)
        return pid if pid is not None and _pid_runs(pid, "spamd") else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        if self.is_running():
            return
        self._prepare_state_dir()
        self._check_port_free(self.port)
        self.home_dir.mkdir(exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        cmd = [
            _binary("spamd"),
            "-d",
            "-r", str(self.pid_file),
            "-i", "127.0.0.1",
            "-p", str(self.port),
            "-A", "127.0.0.1",
            "-x",
            "-L",
            "-H", str(self.home_dir),
            # a Bayes database of its own: with -x, every spamd would share
            # /var/lib/spamassassin's, its locks and what it learned
            "--cf", f"bayes_path {self.home_dir}/bayes",
            "--max-children", str(self.max_children),
            "--min-children", str(min(2, self.max_children)),
            "-s", str(self.log_path),
        ]  # fmt: skip
        if _is_root():
            cmd[2:2] = ["-u", self.run_as or "debian-spamd", "-g", self.run_as or "debian-spamd"]
            _chown(self.state_dir, "debian-spamd", "debian-spamd", recursive=True)
        out = self.state_dir / "spamd.out"
        # -d: the command returns once the daemon has forked; it does not
        # mean the rules are compiled and the socket accepts.
        status, output = _run(cmd, timeout=self.start_timeout)
        out.write_text(output, encoding="utf-8")
        if status != 0:
            raise self._error(f"spamd -d exited with status {status}:\n{output.strip()}")
        deadline = time.monotonic() + self.start_timeout
        while not self.ping():
            if self.pid is None and not _wait_until(lambda: self.pid is not None, 1.0):
                raise self._error("spamd exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise self._error(f"no PONG after {self.start_timeout:g}s")
            time.sleep(0.05)
        _RUNNING.add(self)

    def _kill(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is not None:
            if sig == signal.SIGKILL:
                # Killing only the parent would leave the workers serving.
                pgid = _process_group(pid)
                _signal(pid, sig)
                if pgid == pid:
                    _kill_group(pgid, sig)
            _terminate(pid, self.stop_timeout, group=True)
        self.pid_file.unlink(missing_ok=True)
        _RUNNING.discard(self)
        _wait_port_free(self.port, self.stop_timeout, self.name)

    def stop(self) -> None:
        self._kill(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL spamd and its workers, the way an engine dies under a running milter."""
        self._kill(signal.SIGKILL)

    def ping(self) -> bool:
        """True when spamd answers a SPAMC PING with PONG."""
        try:
            with socket.create_connection(self.address, timeout=2.0) as sock:
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                reply = b""
                while b"\n" not in reply:
                    data = sock.recv(256)
                    if not data:
                        break
                    reply += data
        except OSError:
            return False
        return reply.startswith(b"SPAMD/1.5 0 PONG")


# --------------------------------------------------------------------------
# pytest integration
# --------------------------------------------------------------------------


def require_or_skip(part_cls: type[StackPart]) -> None:
    """Skip the calling test when *part_cls* cannot run here, or fail it in CI.

    With ``MILTERMONKEY_REQUIRE_STACK=1`` a missing part is an error: CI
    installs everything, so a skip there would hide a broken installation.
    """
    reason = part_cls.unavailable_reason()
    if reason is None:
        return
    import pytest  # only test runs have pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 requires it)", pytrace=False)
    pytest.skip(reason)
