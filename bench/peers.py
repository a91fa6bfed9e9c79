"""The other milters the benchmark runs, each in a private state directory.

* :class:`Child` runs any command as our own child in its own session, and
  stops it (and only it, by pid) at the end.  Every daemon here runs in the
  foreground, so it is stopped by the pid we started, not by its pid file
  (each still writes one in its private directory), and no zombie waits for
  init.
* :class:`ClamavMilter` and :class:`SpamassMilter` are Debian's
  ``clamav-milter`` and ``spamass-milter``, the classic chain.
* :class:`MimeDefang` is ``mimedefang-multiplexor`` plus ``mimedefang`` with a
  filter that asks clamd (over its UNIX socket: MIMEDefang only speaks SCAN,
  so clamd reads the spool itself) and runs SpamAssassin embedded in the
  Perl workers.
* :func:`build_c_milter` compiles ``bench/c_milter.c``, the benchmark's own
  minimal C milter (contender 2d).

None of the Debian milters sets TCP_NODELAY on its milter socket (they are
libmilter programs too); they are measured as Debian ships them.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from miltermonkey_core.testing.process import port_in_use, stop_popen

#: Everything started through :class:`Child`, for the last-resort cleanup.
STARTED: list[Child] = []


def wait_for(what: str, ready: Callable[[], bool], timeout: float,
             alive: Callable[[], bool] | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if alive is not None and not alive():
            raise RuntimeError(f"{what} exited during startup{_tail(log)}")
        if time.monotonic() > end:
            raise RuntimeError(f"{what} not ready after {timeout:g} s{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- {log} ---\n" + "\n".join(text)


def chown_tree(path: Path, user: str, group: str | None = None) -> None:
    uid = pwd.getpwnam(user).pw_uid
    gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(user).pw_gid
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, gid)


class Child:
    """A foreground daemon we started; stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, close_fds=True,
                # own session: a Ctrl-C for the benchmark must not reach the daemon
                # before the benchmark has stopped the MTA that talks to it
                start_new_session=True)
        STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        stop_popen(self.proc, timeout)
        with contextlib.suppress(ValueError):
            STARTED.remove(self)


def stop_many(children: Iterable[Child], timeout: float = 10.0) -> None:
    """SIGTERM all at once, then wait: a libmilter program takes ~5 s to notice."""
    children = list(children)
    for c in children:
        if c.alive():
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
    for c in children:
        c.stop(timeout)


def stop_all() -> None:
    with contextlib.suppress(Exception):
        stop_many(reversed(list(STARTED)))


class Peer:
    """Common shape: start(), stop(), roots() for CPU/RSS metering, postfix_spec."""

    name = "peer"

    def __init__(self) -> None:
        self.children: list[Child] = []

    def roots(self) -> list[int]:
        return [c.pid for c in self.children if c.alive()]

    def stop(self) -> None:
        stop_many(reversed(self.children))
        self.children = []

    def alive(self) -> bool:
        return bool(self.children) and all(c.alive() for c in self.children)


class ClamavMilter(Peer):
    name = "clamav-milter"

    def __init__(self, state_dir: Path, port: int, clamd_port: int) -> None:
        super().__init__()
        self.dir = state_dir
        self.port = port
        self.clamd_port = clamd_port

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        d = self.dir
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        conf = d / "clamav-milter.conf"
        conf.write_text("\n".join([
            "# written by bench/peers.py",
            f"MilterSocket inet:{self.port}@127.0.0.1",
            "Foreground yes",
            f"PidFile {d / 'clamav-milter.pid'}",
            "User clamav",
            f"ClamdSocket tcp:127.0.0.1:{self.clamd_port}",
            "OnClean Accept",
            "OnInfected Reject",
            "OnFail Defer",
            "RejectMsg Rejected: virus %v",
            "AddHeader Replace",
            "MaxFileSize 25M",
            "ReadTimeout 120",
            f"TemporaryDirectory {d / 'tmp'}",
            f"LogFile {d / 'clamav-milter.log'}",
            "LogTime yes",
            "LogClean Off",
            "LogInfected Basic",
            "",
        ]))
        chown_tree(d, "clamav")
        child = Child(self.name, [_sbin("clamav-milter"), "-c", str(conf)], d / "stdout.log")
        self.children.append(child)
        wait_for(self.name, lambda: port_in_use(self.port), 30, child.alive,
                 d / "clamav-milter.log")


class SpamassMilter(Peer):
    """spamass-milter as its own user, forking one ``spamc`` per message (its design).

    Not with Debian's ``-i 127.0.0.1`` (that would skip all loopback mail);
    ``-m`` only adds X-Spam-* headers and leaves Subject and body alone.
    """

    name = "spamass-milter"

    def __init__(self, state_dir: Path, port: int, spamd_port: int) -> None:
        super().__init__()
        self.dir = state_dir
        self.port = port
        self.spamd_port = spamd_port

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        chown_tree(d, "spamass-milter")
        cmd = [shutil.which("setpriv") or "/usr/bin/setpriv",
               "--reuid=spamass-milter", "--regid=spamass-milter", "--init-groups",
               _sbin("spamass-milter"), "-p", f"inet:{self.port}@127.0.0.1", "-m",
               "-P", str(d / "spamass-milter.pid"),
               "--", "-d", "127.0.0.1", "-p", str(self.spamd_port)]
        child = Child(self.name, cmd, d / "stdout.log", cwd=d)
        self.children.append(child)
        wait_for(self.name, lambda: port_in_use(self.port), 30, child.alive,
                 d / "stdout.log")


MIMEDEFANG_FILTER = r"""# -*- Perl -*-
# MIMEDefang filter written by MilterMonkey's bench/peers.py: the same policy as
# the other contenders. clamd (reject viruses at end of DATA) and SpamAssassin
# (embedded, local tests only, X-Spam-* headers), skipped above spamc's 500 KiB.
$AdminAddress  = 'postmaster@bench.test';
$AdminName     = 'MilterMonkey benchmark';
$DaemonAddress = 'mimedefang@bench.test';
$ClamdSock = '@CLAMD_SOCK@';
$SALocalTestsOnly = 1;
$SAConfig = '@DIR@/sa.cf';
$Features{'Path:QUARANTINEDIR'} = '@DIR@/quarantine';

detect_and_load_perl_modules();

sub filter_initialize {
    # compile the rules once per worker, before its first message
    if ($Features{'SpamAssassin'}) {
        my $sa = spam_assassin_init($SAConfig);
        $sa->compile_now(1) if $sa;
    }
}

sub filter_begin {
    my ($entity) = @_;
    my ($code, $category, $action) = message_contains_virus_clamd();
    if ($category eq 'virus') {
        return action_bounce("Rejected: virus $VirusName", 554, '5.7.1');
    }
    if ($action eq 'tempfail') {
        return action_tempfail("virus scanner unavailable ($category)");
    }
}

sub filter {
    my ($entity, $fname, $ext, $type) = @_;
    return action_accept();
}

sub filter_end {
    my ($entity) = @_;
    return if message_rejected();
    return unless $Features{'SpamAssassin'};
    return if (-s './INPUTMSG') > 500 * 1024;
    my ($hits, $req, $names, $report) = spam_assassin_check($SAConfig);
    my $is_spam = $hits >= $req;
    action_change_header('X-Spam-Status', sprintf('%s, score=%.1f required=%.1f tests=%s',
                         $is_spam ? 'Yes' : 'No', $hits, $req, $names));
    action_change_header('X-Spam-Flag', 'YES') if $is_spam;
}

1;
"""

#: SpamAssassin's Debian defaults, like the shared spamd: local tests only (the
#: filter's $SALocalTestsOnly, spamd's -L) and Bayes with autolearn on, here in a
#: private database (spamd's lands in its user's home, /var/lib/spamassassin).
SA_PREFS = """\
# SpamAssassin preferences for the benchmark's MIMEDefang (embedded SA)
required_score 5
bayes_path @DIR@/bayes/bayes
"""


class MimeDefang(Peer):
    """MIMEDefang 3: C milter + multiplexor + Perl workers (``workers`` of them, pre-forked)."""

    name = "mimedefang"

    def __init__(self, state_dir: Path, port: int, clamd_socket: Path, workers: int) -> None:
        super().__init__()
        self.dir = state_dir
        self.port = port
        self.clamd_socket = clamd_socket
        self.workers = workers

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @staticmethod
    def unavailable_reason() -> str | None:
        for b in ("mimedefang", "mimedefang-multiplexor", "mimedefang.pl"):
            if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin") is None:
                return f"{b} not installed (Debian package mimedefang)"
        for user in ("defang", "clamav"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                return f"system user {user} missing"
        return None

    def start(self) -> None:
        d = self.dir
        spool = d / "spool"
        for sub in ("quarantine", "run"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        spool.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        (d / "filter").write_text(MIMEDEFANG_FILTER.replace("@DIR@", str(d))
                                  .replace("@CLAMD_SOCK@", str(self.clamd_socket)))
        (d / "bayes").mkdir(exist_ok=True)
        (d / "sa.cf").write_text(SA_PREFS.replace("@DIR@", str(d)))
        chown_tree(d, "defang")
        # clamd (user clamav) reads each message's working directory itself: the
        # spool's group is clamav, setgid so new directories inherit it, and -G
        # makes MIMEDefang create them group-readable.
        os.chown(spool, pwd.getpwnam("defang").pw_uid, grp.getgrnam("clamav").gr_gid)
        spool.chmod(0o2750)
        check = subprocess.run(
            ["setpriv", "--reuid=defang", "--regid=defang", "--init-groups",
             "mimedefang.pl", "-f", str(d / "filter"), "-test"],
            capture_output=True, text=True, timeout=120, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"mimedefang.pl -test failed: {check.stdout}{check.stderr}")
        mx_sock = spool / "mimedefang-multiplexor.sock"
        mux = Child("mimedefang-multiplexor", [
            "mimedefang-multiplexor", "-D", "-U", "defang", "-G",
            "-p", str(d / "run" / "multiplexor.pid"),
            "-z", str(spool), "-s", str(mx_sock), "-F", str(d / "filter"),
            "-m", str(self.workers), "-x", str(self.workers), "-q", "100", "-Q", "120",
            "-l"], d / "multiplexor.log")
        self.children.append(mux)
        wait_for("mimedefang-multiplexor", mx_sock.exists, 60, mux.alive, d / "multiplexor.log")
        md = Child("mimedefang", [
            "mimedefang", "-D", "-U", "defang", "-G", "-q", "-z", str(spool),
            "-P", str(d / "run" / "mimedefang.pid"),
            "-m", str(mx_sock), "-p", f"inet:{self.port}@127.0.0.1"], d / "mimedefang.log")
        self.children.append(md)
        wait_for("mimedefang", lambda: port_in_use(self.port), 30, md.alive,
                 d / "mimedefang.log")
        # wait until the pre-forked workers have compiled SpamAssassin's rules
        end = time.monotonic() + 120
        while time.monotonic() < end:
            out = subprocess.run(["md-mx-ctrl", "-s", str(mx_sock), "rawstatus"],
                                 capture_output=True, text=True, timeout=10, check=False)
            states = out.stdout.split()[0] if out.stdout.split() else ""
            if states and states.count("I") >= self.workers:
                return
            time.sleep(0.5)


C_MILTER_SOURCE = Path(__file__).resolve().with_name("c_milter.c")


def build_c_milter(dest: Path) -> str | None:
    """Compile ``bench/c_milter.c`` to ``dest``; None, or why it cannot be built here."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "gcc not installed (Debian package gcc)"
    cmd = [gcc, "-O2", "-o", str(dest), str(C_MILTER_SOURCE), "-lmilter", "-lpthread"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}"
    if out.returncode == 0:
        return None
    text = (out.stdout + out.stderr).strip()
    if "mfapi.h" in text:
        return "libmilter headers not installed (Debian package libmilter-dev)"
    if "-lmilter" in text:
        return "libmilter not installed (Debian package libmilter-dev)"
    return f"{' '.join(cmd)} failed: {text[-800:]}"


def _sbin(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return found
