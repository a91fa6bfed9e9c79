"""A private Sendmail for end-to-end tests: Debian's sendmail-bin, unpacked, never installed.

Sendmail is the MTA the milter protocol was written for, and it drives a
milter differently from Postfix (where added headers land, which macros it
sends, when it writes to the socket), so the tests run the real one.

Debian's ``sendmail-bin`` conflicts with ``postfix`` (both are the system's
mail transport agent), so ``.ci/install-system.sh`` only unpacks the
``sendmail-bin``, ``sendmail-base`` and ``sendmail-cf`` packages into a
private prefix (``/opt/miltermonkey-test/sendmail``, or
``$MILTERMONKEY_SENDMAIL_PREFIX``).  This part runs the binary from there:

* its ``sendmail.cf`` is built from a ``.mc`` with ``m4`` and the unpacked
  ``sendmail-cf``, with its own queue, pid file and port on 127.0.0.1, and it
  relays everything to ``[127.0.0.1]:relay_port`` (an
  :class:`~miltermonkey_core.testing.sink.SmtpSink`);
* it runs in the foreground (``-bD``) as our child, in its own UTS and mount
  namespaces.  The UTS namespace gives it a qualified host name: on a
  machine whose name is unqualified, Sendmail sleeps 60 s at every start
  while it tries to qualify it.  The mount namespace gives it a private
  ``/dev`` whose ``/dev/log`` is this part's own syslog socket: Sendmail
  logs only through syslog(3), so its log lands in :attr:`Sendmail.log_path`
  and never in (or, on a machine without a syslog daemon, lost beside) the
  host's log.  Nothing of the host's ``/etc/mail``, ``/var/spool/mqueue`` or
  ``/dev`` is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Final

import attrs

from miltermonkey_core.testing.part import ChildProcessPart
from miltermonkey_core.testing.process import (
    POLL_INTERVAL,
    StackError,
    StackTimeoutError,
    group_members,
    is_root,
    kill_group,
    port_in_use,
    run_command,
    tail,
    wait_port_free,
    wait_until,
    which,
)

__all__ = [
    "DEFAULT_PREFIX",
    "MACRO_STAGES",
    "PREFIX_ENV",
    "Sendmail",
    "SendmailMilter",
    "queue_id_from_reply",
]

#: Environment variable naming the prefix the Sendmail packages were unpacked into.
PREFIX_ENV: Final = "MILTERMONKEY_SENDMAIL_PREFIX"
#: Where ``.ci/install-system.sh`` unpacks them by default.
DEFAULT_PREFIX: Final = Path("/opt/miltermonkey-test/sendmail")

#: The stages whose macro lists Sendmail's ``confMILTER_MACROS_<STAGE>`` sets.
MACRO_STAGES: Final = ("connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom")

# Programs the part runs besides Sendmail itself, and the Debian package of each.
_TOOLS: Final = {"m4": "m4", "unshare": "util-linux", "mount": "mount", "hostname": "hostname"}

# Run inside the new namespaces: a qualified host name, and a /dev of our own
# whose log is the part's syslog socket.  The devices Sendmail opens are bound
# in from the real /dev; the tmpfs and its binds vanish with the namespace.
_NAMESPACE_SCRIPT: Final = """\
set -e
hostname "$1"
dev=$2
mount -t tmpfs -o mode=0755,size=64k miltermonkey-sendmail-dev "$dev"
for node in null zero full random urandom tty; do
    [ -e "/dev/$node" ] || continue
    : > "$dev/$node"
    mount --bind "/dev/$node" "$dev/$node"
done
ln -s "$3" "$dev/log"
ln -s /proc/self/fd "$dev/fd"
mount --move "$dev" /dev
shift 3
exec "$@"
"""

_SAFE_M4 = re.compile(r"[^`'\n,]*")
_REPLY_QUEUE_ID = re.compile(r"^2\.0\.0 (\w+) Message accepted for delivery")
_SYSLOG_PREFIX = re.compile(r"^<\d+>(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d )?")


def sendmail_prefix() -> Path:
    """The prefix the Sendmail packages were unpacked into."""
    return Path(os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX)


def queue_id_from_reply(text: str) -> str | None:
    """Sendmail's queue id from the reply to DATA (``2.0.0 QID Message accepted ...``)."""
    match = _REPLY_QUEUE_ID.match(text)
    return match.group(1) if match else None


def _m4_text(value: str, what: str) -> str:
    """*value*, refused if it would break out of an m4 quoted argument or a cf list."""
    if not _SAFE_M4.fullmatch(value):
        raise ValueError(f"{what} {value!r} may not contain quotes, commas or newlines")
    return value


@attrs.frozen
class SendmailMilter:
    """One ``INPUT_MAIL_FILTER`` line: a milter Sendmail calls for every SMTP session.

    ``socket`` is Sendmail's ``S=`` value (``unix:/path`` or ``inet:port@host``;
    :meth:`at` builds it from an address).  ``flags`` is ``F=``: ``T``
    tempfails the session when the milter cannot be reached, ``R`` rejects
    it, empty skips the milter.  ``timeouts`` is ``T=``: ``C`` connect, ``S``
    send, ``R`` read, ``E`` the whole end of message; shorter than Sendmail's
    defaults (a 5 min connect timeout) so a dead milter shows within a test.
    """

    name: str
    socket: str
    flags: str = "T"
    timeouts: Mapping[str, str] = attrs.field(
        factory=lambda: {"C": "10s", "S": "30s", "R": "30s", "E": "5m"}
    )

    @classmethod
    def at(
        cls,
        name: str,
        address: str | Path | tuple[str, int],
        flags: str = "T",
        timeouts: Mapping[str, str] | None = None,
    ) -> SendmailMilter:
        """A milter listening on *address*: a UNIX socket path or a ``(host, port)`` pair.

        That is what :attr:`MonkeyProcess.address
        <miltermonkey_core.testing.daemon.MonkeyProcess.address>` gives.
        """
        if isinstance(address, tuple):
            host, port = address
            spec = f"inet:{port}@{host}"
        else:
            spec = f"unix:{address}"
        if timeouts is None:
            return cls(name, spec, flags)
        return cls(name, spec, flags, dict(timeouts))

    def mc_line(self) -> str:
        """The ``INPUT_MAIL_FILTER`` line for the ``.mc``."""
        equates = [f"S={_m4_text(self.socket, 'milter socket')}"]
        if self.flags:
            equates.append(f"F={_m4_text(self.flags, 'milter flags')}")
        if self.timeouts:
            spans = ";".join(f"{key}:{value}" for key, value in self.timeouts.items())
            equates.append(f"T={_m4_text(spans, 'milter timeouts')}")
        name = _m4_text(self.name, "milter name")
        return f"INPUT_MAIL_FILTER(`{name}', `{', '.join(equates)}')dnl"


class _SyslogSink:
    """A datagram socket standing in for ``/dev/log``, appending what arrives to a file.

    A thread reads it: a full socket queue would block Sendmail's syslog()
    calls, and so the message under test.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        # Short and world-reachable: a UNIX socket path has at most 107 bytes,
        # and Sendmail's delivery agents may log after leaving root.
        self._dir = Path(tempfile.mkdtemp(prefix="mm-smlog-"))
        self._dir.chmod(0o755)
        self.socket_path = self._dir / "log"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.socket_path))
        self.socket_path.chmod(0o666)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="sendmail-syslog", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with self.log_path.open("a", encoding="utf-8", buffering=1) as log:
            while True:
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    if self._stop.is_set():
                        return
                    continue
                except OSError:
                    return
                text = _SYSLOG_PREFIX.sub("", data.decode("utf-8", errors="replace"))
                stamp = time.strftime("%H:%M:%S")
                log.write(f"{stamp} {text.rstrip(chr(0) + chr(10))}\n")

    def close(self) -> None:
        """Write what is still queued, then remove the socket."""
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class Sendmail(ChildProcessPart):
    """A private Sendmail on ``127.0.0.1:smtp_port`` relaying to ``[127.0.0.1]:relay_port``.

    *milters* become ``INPUT_MAIL_FILTER`` lines, in order; *macros* maps a
    stage of :data:`MACRO_STAGES` to the macro names Sendmail sends the
    milters at that stage (``confMILTER_MACROS_<STAGE>``; a stage not given
    keeps Sendmail's default list).  *extra_mc* lines go into the ``.mc``
    before the mailers.  :meth:`set_milters` changes milters and macros and
    restarts a running instance.
    """

    name = "sendmail"
    package = "sendmail-bin"
    needs_root = True

    #: Where the binary and the m4 files sit below the prefix.
    BINARY: ClassVar[str] = "usr/libexec/sendmail/sendmail"
    CF_M4: ClassVar[str] = "usr/share/sendmail/cf/m4/cf.m4"
    HELPFILE: ClassVar[str] = "etc/mail/helpfile"

    _namespace_problem: ClassVar[str | None] = None
    _namespace_checked: ClassVar[bool] = False

    smtp_port: int
    relay_port: int
    hostname: str
    milters: tuple[SendmailMilter, ...]
    macros: dict[str, tuple[str, ...]]

    def __init__(
        self,
        state_dir: Path | str,
        smtp_port: int,
        relay_port: int,
        milters: Sequence[SendmailMilter] = (),
        macros: Mapping[str, Sequence[str]] | None = None,
        *,
        hostname: str = "sendmail.milter.test",
        log_level: int = 9,
        milter_log_level: int = 9,
        extra_mc: Sequence[str] = (),
        prefix: Path | str | None = None,
    ) -> None:
        super().__init__(state_dir)
        self.smtp_port = smtp_port
        self.relay_port = relay_port
        self.hostname = hostname
        self.log_level = log_level
        self.milter_log_level = milter_log_level
        self.extra_mc = tuple(extra_mc)
        self.prefix = Path(prefix) if prefix is not None else sendmail_prefix()
        self.milters = ()
        self.macros = {}
        self._configure(milters, macros)
        self._syslog: _SyslogSink | None = None

    # -- availability ------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = [f"{tool} (Debian package {pkg})" for tool, pkg in _TOOLS.items()
                   if which(tool) is None]
        prefix = sendmail_prefix()
        for relative, package in ((cls.BINARY, "sendmail-bin"), (cls.CF_M4, "sendmail-cf")):
            if not (prefix / relative).exists():
                missing.append(f"{prefix / relative} (Debian package {package}, unpacked)")
        if missing:
            return (f"{cls.name}: {', '.join(missing)} not installed"
                    f" (see .ci/install-system.sh)")
        if not is_root():
            return f"{cls.name}: needs root (tests run as uid {os.geteuid()})"
        return cls._namespaces_unavailable()

    @classmethod
    def _namespaces_unavailable(cls) -> str | None:
        """Can this machine give Sendmail its own host name and /dev?  Asked once."""
        if not cls._namespace_checked:
            status, out = run_command(
                ["unshare", "--uts", "--mount", "--propagation", "private", "true"], 30.0)
            if status != 0:
                cls._namespace_problem = (
                    f"{cls.name}: cannot create UTS and mount namespaces"
                    f" (unshare: {out.strip() or status})")
            cls._namespace_checked = True
        return cls._namespace_problem

    # -- paths ---------------------------------------------------------------

    @property
    def binary(self) -> Path:
        """The unpacked sendmail binary."""
        return self.prefix / self.BINARY

    @property
    def mc_path(self) -> Path:
        """The generated ``.mc`` (what a test wrote, in Sendmail's own words)."""
        return self.state_dir / "sendmail.mc"

    @property
    def cf_path(self) -> Path:
        """The ``.cf`` that m4 built from :attr:`mc_path`; passed with ``-C``."""
        return self.state_dir / "sendmail.cf"

    @property
    def queue_dir(self) -> Path:
        """The private mail queue."""
        return self.state_dir / "mqueue"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "maillog"

    # -- configuration -------------------------------------------------------

    def _configure(
        self, milters: Sequence[SendmailMilter], macros: Mapping[str, Sequence[str]] | None
    ) -> None:
        unknown = set(macros or {}) - set(MACRO_STAGES)
        if unknown:
            raise ValueError(f"unknown macro stages {sorted(unknown)}; use {MACRO_STAGES}")
        names = [m.name for m in milters]
        if len(set(names)) != len(names):
            raise ValueError(f"milter names must differ: {names}")
        self.milters = tuple(milters)
        self.macros = {stage: tuple(names) for stage, names in (macros or {}).items()}

    def set_milters(
        self,
        milters: Sequence[SendmailMilter],
        macros: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Use *milters* (and *macros*, else Sendmail's defaults) from now on.

        A running Sendmail is restarted: it reads its ``.cf`` only at start,
        and a clean restart is quicker to be sure of than its SIGHUP re-exec.
        """
        self._configure(milters, macros)
        if self.is_running():
            self.stop()
            self.start()

    def mc_text(self) -> str:
        """The ``.mc`` for the current settings."""
        state, prefix = self.state_dir, self.prefix
        lines = [
            "divert(-1)dnl",
            "# Generated by miltermonkey_core.testing.sendmail for one test instance.",
            "divert(0)dnl",
            f"include(`{prefix / self.CF_M4}')dnl",
            f"VERSIONID(`miltermonkey test sendmail on 127.0.0.1:{self.smtp_port}')dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{_m4_text(self.hostname, 'hostname')}')dnl",
            # pytest's directories sit below /tmp (sticky, world-writable).
            "define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl",
            # No DNS: hosts from /etc/hosts, no canonification, any sender domain.
            f"define(`confSERVICE_SWITCH_FILE', `{state / 'service.switch'}')dnl",
            "define(`confHOSTS_FILE', `/etc/hosts')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            "define(`confTO_IDENT', `0s')dnl",
            "define(`confTO_CONNECT', `5s')dnl",
            # Everything of its own below the state directory.
            f"define(`QUEUE_DIR', `{self.queue_dir}')dnl",
            f"define(`STATUS_FILE', `{state / 'statistics'}')dnl",
            f"define(`confPID_FILE', `{state / 'sendmail.pid'}')dnl",
            f"define(`confHELP_FILE', `{prefix / self.HELPFILE}')dnl",
            f"define(`confCW_FILE', `-o {state / 'local-host-names'}')dnl",
            f"define(`ALIAS_FILE', `{state / 'aliases'}')dnl",
            "define(`confFORWARD_PATH', `')dnl",
            f"define(`confLOG_LEVEL', `{int(self.log_level)}')dnl",
            f"define(`confMILTER_LOG_LEVEL', `{int(self.milter_log_level)}')dnl",
            # One listener, on loopback; no port 25, no submission port 587.
            "FEATURE(`no_default_msa')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Name=MTA-test, Port={self.smtp_port},"
            " Addr=127.0.0.1')dnl",
            # A busy two-core CI machine must not make it queue or refuse.
            "define(`confQUEUE_LA', `100')dnl",
            "define(`confREFUSE_LA', `100')dnl",
            "define(`confMAX_DAEMON_CHILDREN', `0')dnl",
            "define(`confCONNECTION_RATE_THROTTLE', `0')dnl",
            # Everything to the sink; the bracketed host skips MX lookups.
            "define(`SMART_HOST', `relay:[127.0.0.1]')dnl",
            f"define(`RELAY_MAILER_ARGS', `TCP $h {self.relay_port}')dnl",
        ]
        lines += [milter.mc_line() for milter in self.milters]
        for stage, names in self.macros.items():
            listed = ", ".join(_m4_text(n, "macro name") for n in names)
            lines.append(f"define(`confMILTER_MACROS_{stage.upper()}', ``{listed}'')dnl")
        lines += list(self.extra_mc)
        # Sendmail insists on a local mailer even when everything is relayed.
        lines += ["MAILER(`local')dnl", "MAILER(`smtp')dnl"]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self._prepare_state_dir()
        # Sendmail refuses a .cf, queue or alias file below a directory that
        # others may write to.
        self.state_dir.chmod(0o755)
        self.queue_dir.mkdir(exist_ok=True)
        self.queue_dir.chmod(0o700)
        self.mc_path.write_text(self.mc_text(), encoding="utf-8")
        status, out = run_command(["m4", str(self.mc_path)], 30.0)
        if status != 0 or "\nERROR" in out or out.startswith("ERROR"):
            raise StackError(f"{self.name}: m4 {self.mc_path} failed ({status}):\n{out[-2000:]}")
        self.cf_path.write_text(out, encoding="utf-8")
        # No "dns": a test machine may have no resolver, and lookups would only stall.
        (self.state_dir / "service.switch").write_text("hosts files\naliases files\n")
        aliases = self.state_dir / "aliases"
        if not aliases.exists():
            aliases.write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
        (self.state_dir / "local-host-names").touch()
        for path in (self.cf_path, self.state_dir / "service.switch", self.state_dir / "aliases",
                     self.state_dir / "local-host-names"):
            path.chmod(0o644)

    def cf_options(self) -> dict[str, str]:
        """The ``O name=value`` options of the built ``.cf``, to check what Sendmail reads."""
        options = {}
        for line in self.cf_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("O "):
                key, _eq, value = line[2:].partition("=")
                options[key.strip()] = value
        return options

    # -- lifecycle -------------------------------------------------------------

    def _in_namespaces(self, *args: str) -> list[str]:
        """Sendmail with our .cf, started inside its own UTS and mount namespaces."""
        assert self._syslog is not None
        dev = self.state_dir / "dev"
        dev.mkdir(exist_ok=True)
        return [
            "unshare", "--uts", "--mount", "--propagation", "private",
            "sh", "-c", _NAMESPACE_SCRIPT, "sendmail-namespace",
            self.hostname, str(dev), str(self._syslog.socket_path),
            str(self.binary), "-C", str(self.cf_path), *args,
        ]  # fmt: skip

    def start(self) -> None:
        if self.is_running():
            return
        self._check_port_free(self.smtp_port)
        self._write_config()
        self.log_path.touch()
        if self._syslog is None:
            self._syslog = _SyslogSink(self.log_path)
        try:
            if not (self.state_dir / "aliases.db").exists():
                # newaliases: without aliases.db Sendmail complains at every message.
                status, out = run_command(self._in_namespaces("-bi"), 60.0)
                if status != 0:
                    raise self._error(f"sendmail -bi failed ({status}):\n{out.strip()}")
            # -bD: the daemon, in the foreground; -q30s: retry deferred mail soon.
            self._spawn(self._in_namespaces("-bD", "-q30s"), self.state_dir / "sendmail.out")
            self._wait_ready(lambda: port_in_use(self.smtp_port))
        except BaseException:
            self._close_syslog()
            raise

    def stop(self) -> None:
        proc = self._proc
        pgid = proc.pid if proc is not None else None
        # SIGTERM: the daemon passes it on to the children serving sessions.
        self._reap()
        # A child that outlived it would still hold connections (not the port).
        if pgid is not None and not wait_until(lambda: not group_members(pgid), 2.0):
            kill_group(pgid, signal.SIGKILL)
            wait_until(lambda: not group_members(pgid), 5.0)
        self._close_syslog()
        wait_port_free(self.smtp_port, self.stop_timeout, self.name)

    def _close_syslog(self) -> None:
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None

    def _error(self, message: str, log: Path | None = None) -> StackError:
        # What Sendmail says before its syslog works (a bad .cf) goes to its output.
        error = super()._error(message, log)
        out = self.state_dir / "sendmail.out"
        with contextlib.suppress(OSError):
            if out.stat().st_size:
                return StackError(f"{error}\n--- last lines of {out} ---\n{tail(out)}")
        return error

    # -- logs and queue --------------------------------------------------------

    def log_mark(self) -> int:
        """Where the log ends now: pass it as ``since`` to see only what follows."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def maillog(self, since: int = 0) -> str:
        """What Sendmail logged (its syslog lines), from byte *since* of the log on."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        """Wait for a log line matching the regular expression *pattern*; return the match.

        Sendmail logs a message's fate after the SMTP client saw the reply, so
        a test reads the log only through this.
        """
        found: list[re.Match[str]] = []

        def search() -> bool:
            match = re.search(pattern, self.maillog(since), re.MULTILINE)
            if match:
                found.append(match)
            return match is not None

        if not wait_until(search, timeout, 0.05):
            raise StackTimeoutError(f"{self.name}: no log line matching {pattern!r} within"
                                    f" {timeout:g}s; last lines:\n{self.maillog(since)[-3000:]}")
        return found[0]

    def queued(self) -> list[str]:
        """Queue ids of the messages in the queue (a ``qf`` file each)."""
        return sorted(p.name[2:] for p in self.queue_dir.glob("qf*"))

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Wait until every accepted message left the queue (delivered or bounced)."""
        if not wait_until(lambda: not self.queued(), timeout, POLL_INTERVAL * 5):
            raise StackTimeoutError(
                f"{self.name}: queue not empty after {timeout:g}s: {', '.join(self.queued())}")
