"""Helpers shared by the reliability, bad-mail and fuzz suites (this module holds no tests).

* :class:`RawMilter` speaks the milter protocol with no safety net, for
  sequences no MTA would send, honouring the no-reply bits the daemon
  negotiated so it knows when to wait for an answer;
* :func:`worker_pid` and :func:`rss_kib` find and measure the libmilter
  process under the supervisor;
* :func:`start_with_overrides` starts a daemon whose ``[[brain]]`` entries
  carry values the TOML schema may not offer yet (``on_error = "mta"``);
* :func:`alive_and_serving` is the liveness probe the fuzz suites use.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miltermonkey_core.milter.protocol import read_packet, send_packet
from miltermonkey_core.testing.client import run_session
from miltermonkey_core.testing.daemon import MonkeyProcess

LONG = os.environ.get("MILTERMONKEY_LONG", "") in ("1", "yes", "true")

#: Which no-reply bit silences the answer to each MTA command.
NR_BITS = {"C": 0x1000, "H": 0x2000, "M": 0x4000, "R": 0x8000, "T": 0x10000, "U": 0x20000,
           "L": 0x80, "N": 0x40000, "B": 0x80000}
#: Commands that never get an answer.
SILENT = set("ADQK")
#: Reply codes that are modifications (more packets follow before the final one).
MODIFICATIONS = set("hmibe+-2q")
OPTNEG = struct.pack("!III", 6, 0x1FF, 0x1FFFFF)


def message(subject: str, body: str = "hello\r\n", headers: Sequence[tuple[str, str]] = (),
            message_id: str | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    mid = message_id or f"<{subject.replace(' ', '-')}@example.test>"
    return (f"From: a@example.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\n{extra}\r\n{body}").encode()


class RawMilter:
    """One raw milter connection: send any packet, read what comes back.

    ``step`` waits for an answer only when one is due (not for ABORT, QUIT,
    macros, or a step negotiated as no-reply); a milter that went quiet
    (libmilter ignores steps out of order after a final reply) shows up as
    ``("timeout", b"")``, a closed connection as ``("closed", b"")``.
    """

    def __init__(self, address: Any, timeout: float = 3.0) -> None:
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(address))
        self.pflags = 0
        self.closed = False

    def __enter__(self) -> RawMilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        self.closed = True

    def negotiate(self, data: bytes = OPTNEG) -> tuple[str, bytes]:
        send_packet(self.sock, "O", data)
        cmd, reply = self.read()
        if cmd == "O" and len(reply) >= 12:
            self.pflags = struct.unpack("!III", reply[:12])[2]
        return cmd, reply

    def read(self) -> tuple[str, bytes]:
        try:
            return read_packet(self.sock)
        except TimeoutError:
            return "timeout", b""
        except OSError:
            return "closed", b""
        except Exception:  # framing error: the milter hung up mid-packet
            return "closed", b""

    def step(self, cmd: str, data: bytes = b"") -> list[tuple[str, bytes]]:
        """Send one packet; return the answers (modifications, then the final one)."""
        try:
            send_packet(self.sock, cmd, data)
        except OSError:
            return [("closed", b"")]
        if cmd in SILENT or (cmd in NR_BITS and self.pflags & NR_BITS[cmd]):
            return []
        out = []
        while True:
            got = self.read()
            out.append(got)
            if got[0] not in MODIFICATIONS and got[0] != "p":
                return out

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True


def connect_packet(host: str = "client.test", addr: str = "127.0.0.1", port: int = 4242) -> bytes:
    return host.encode() + b"\0" + b"4" + struct.pack("!H", port) + addr.encode() + b"\0"


def alive_and_serving(address: Any, timeout: float = 10.0) -> bool:
    """A well-formed message gets a final answer within ``timeout``."""
    try:
        res = run_session(address, [(message("probe"), "<a@example.test>",
                                         ["<b@example.test>"])], timeout=timeout)
    except Exception:
        return False
    return res[0].disposition is not None


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def worker_pid(m: MonkeyProcess, timeout: float = 10.0) -> int:
    """The libmilter process the supervisor runs (its only live child)."""
    assert m.proc is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = children_of(m.proc.pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError(f"no worker under supervisor {m.proc.pid}:\n{m.output()[-3000:]}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def proc_ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def start_with_overrides(m: MonkeyProcess, brain_overrides: Mapping[str, Mapping[str, Any]],
                         env: Mapping[str, str] | None = None,
                         preamble: str = "") -> MonkeyProcess:
    """Start ``m`` with some ``[[brain]]`` fields replaced after the TOML is read.

    For values the configuration schema does not take (yet), e.g. a brain's
    ``on_error = "mta"``: the daemon code is the same, only the loading
    differs.  ``m.proc`` is the supervisor, as with ``m.start()``.  ``preamble``
    is Python run first (with ``MILTERMONKEY_NO_SUPERVISOR=1`` in ``env`` it can
    patch module defaults of the one process).
    """
    launcher = preamble + "\n" + textwrap.dedent(f"""
        import sys
        import attrs
        from miltermonkey_core.config import load_config
        from miltermonkey_core.server.main import run
        overrides = {dict((k, dict(v)) for k, v in brain_overrides.items())!r}
        c = load_config({str(m.config_path)!r})
        c = attrs.evolve(c, brains=tuple(attrs.evolve(b, **overrides.get(b.name, {{}}))
                                         for b in c.brains))
        sys.exit(run(c))
    """)
    with m.stderr_path.open("wb") as err:
        m.proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=err,
                                  stderr=subprocess.STDOUT, cwd=m.workdir,
                                  env={**os.environ, **(env or {})})
    if not wait_for(m._listening, 20):
        m.stop()
        raise AssertionError(f"daemon did not start:\n{m.output()[-3000:]}")
    return m


def render_brains_reload(m: MonkeyProcess, brains: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``m``'s configuration with ``brains`` and send the supervisor SIGHUP."""
    import signal

    from miltermonkey_core.testing.daemon import render_config

    m.config_path.write_text(render_config(m.daemon_options, list(brains)))
    m.signal(signal.SIGHUP)
