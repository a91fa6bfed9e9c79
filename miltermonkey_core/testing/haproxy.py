"""HAProxy in TCP mode in front of several milter hosts, as a part of the test stack.

A milter connection lasts one SMTP session, so a TCP balancer spreads
sessions over the hosts with no knowledge of the milter protocol; what it
needs is a health check that notices a dead, hung or draining host, and
rules for what happens to the sessions on it.  :class:`HAProxy` writes that
configuration (:meth:`HAProxy.config_text`, the same text the deployment
guide explains), runs ``haproxy`` in the foreground as our child, and reads
and steers it over its admin socket (:meth:`HAProxy.servers`,
:meth:`HAProxy.set_state`).

Two health checks:

* ``check="readyz"``: ``GET /readyz`` on each host's metrics port, 200 or
  down.  The daemon answers 404 while it drains after SIGTERM
  (``disable-on-404``: NOLB, open sessions go on), 503 when its worker does
  not answer and when a brain that refuses mail on failure has its circuit
  breaker open.
* ``check="milter"``: a real milter handshake on the milter port (an
  SMFIC_OPTNEG packet, the reply must be SMFIC_OPTNEG of version 6): a
  plain TCP connect would pass for a hung daemon, the kernel still accepts.

Either way ``on-marked-down shutdown-sessions`` turns sessions stuck on a
host that went down into an immediate error at the MTA (a tempfail with
``milter_default_action = tempfail``) instead of a wait for its milter
timeouts, ``observe layer4`` marks a host down after failed connections
before the next check, and ``retries`` with ``option redispatch`` send a
refused connection to another host.
"""

from __future__ import annotations

import csv
import io
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs

from miltermonkey_core.testing.part import ChildProcessPart
from miltermonkey_core.testing.process import (
    StackError,
    StackTimeoutError,
    binary,
    port_in_use,
    run_command,
    wait_port_free,
    wait_until,
)

__all__ = ["MILTER_CHECK_REPLY", "MILTER_CHECK_SEND", "HAProxy", "Server", "ServerStat"]

#: SMFIC_OPTNEG: length 13, 'O', protocol version 6, every action, every protocol step.
MILTER_CHECK_SEND = "0000000d4f00000006000001ff001fffff"
#: The start of a version-6 SMFIC_OPTNEG reply ('O', version 6), after the length.
MILTER_CHECK_REPLY = "4f00000006"

CheckKind = Literal["readyz", "milter"]


@attrs.frozen
class Server:
    """One milter host behind the balancer."""

    name: str
    address: str
    port: int
    #: The host's metrics port (``/readyz``); needed for ``check="readyz"``.
    metrics_port: int | None = None


@attrs.frozen
class ServerStat:
    """A server's line of ``show stat``: what the balancer thinks of one host."""

    name: str
    #: UP, DOWN, NOLB, MAINT, DRAIN, "UP 1/2" (going down), "DOWN 1/2" (coming up)...
    status: str
    current_sessions: int
    total_sessions: int
    connection_errors: int
    redispatches: int
    check_failures: int
    last_check: str

    @property
    def up(self) -> bool:
        return self.status == "UP"

    @property
    def down(self) -> bool:
        return self.status.startswith(("DOWN", "MAINT"))


def _seconds(value: float) -> str:
    return f"{round(value * 1000)}ms"


class HAProxy(ChildProcessPart):
    """A private ``haproxy`` on ``bind:port``, balancing milter sessions over *servers*."""

    name = "haproxy"
    binaries = ("haproxy",)
    package = "haproxy"

    def __init__(
        self,
        state_dir: Path | str,
        port: int,
        servers: Sequence[Server],
        *,
        bind: str = "127.0.0.1",
        check: CheckKind = "readyz",
        inter: float = 1.0,
        fall: int = 2,
        rise: int = 2,
        timeout_connect: float = 2.0,
        timeout_session: float = 360.0,
        timeout_check: float = 2.0,
        retries: int = 2,
        shutdown_sessions: bool = True,
    ) -> None:
        super().__init__(state_dir)
        if check == "readyz" and any(s.metrics_port is None for s in servers):
            raise StackError("haproxy: check='readyz' needs every server's metrics_port")
        self.port = port
        self.bind = bind
        self.servers_configured = list(servers)
        self.check = check
        self.inter = inter
        self.fall = fall
        self.rise = rise
        self.timeout_connect = timeout_connect
        self.timeout_session = timeout_session
        self.timeout_check = timeout_check
        self.retries = retries
        self.shutdown_sessions = shutdown_sessions

    # -- paths ---------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.state_dir / "haproxy.cfg"

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "haproxy.log"

    @property
    def spec(self) -> str:
        """The value for Postfix's ``smtpd_milters``."""
        return f"inet:{self.bind}:{self.port}"

    # -- configuration -------------------------------------------------------------------

    def config_text(self) -> str:
        """The whole haproxy.cfg; docs/deployment.md explains each line."""
        lines = [
            "# Generated by miltermonkey_core.testing.haproxy",
            "global",
            "    maxconn 4096",
            f"    stats socket {self.admin_socket} mode 600 level admin",
            "    log stdout format raw local0 info",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    # A milter connection lasts one SMTP session and may idle while the",
            "    # MTA waits for its client: longer than the MTA's milter timeouts.",
            f"    timeout connect {_seconds(self.timeout_connect)}",
            f"    timeout client {_seconds(self.timeout_session)}",
            f"    timeout server {_seconds(self.timeout_session)}",
            f"    timeout check {_seconds(self.timeout_check)}",
            "    # A refused or timed-out connect is tried again on another host.",
            f"    retries {self.retries}",
            "    option redispatch 1",
            "",
            "frontend milter_in",
            f"    bind {self.bind}:{self.port}",
            "    default_backend milters",
            "",
            "backend milters",
            "    balance leastconn",
        ]
        if self.check == "readyz":
            lines += [
                "    option httpchk GET /readyz",
                "    http-check disable-on-404",
                "    http-check expect status 200",
            ]
        else:
            lines += [
                "    option tcp-check",
                "    tcp-check connect",
                f"    tcp-check send-binary {MILTER_CHECK_SEND}",
                f"    tcp-check expect binary {MILTER_CHECK_REPLY}",
            ]
        server_opts = [f"check inter {_seconds(self.inter)} fall {self.fall} rise {self.rise}",
                       "observe layer4 error-limit 2 on-error mark-down"]
        if self.shutdown_sessions:
            server_opts.append("on-marked-down shutdown-sessions")
        lines.append("    default-server " + " ".join(server_opts))
        for s in self.servers_configured:
            port = f" port {s.metrics_port}" if self.check == "readyz" else ""
            lines.append(f"    server {s.name} {s.address}:{s.port}{port}")
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self._prepare_state_dir()
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        status, out = run_command([binary("haproxy"), "-c", "-q", "-f", str(self.config_path)])
        if status != 0:
            raise StackError(f"haproxy -c {self.config_path} refused the config:\n{out}")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self.is_running():
            return
        if self.bind == "127.0.0.1":
            self._check_port_free(self.port)
        self._write_config()
        self.admin_socket.unlink(missing_ok=True)
        # -db: foreground, no daemon, logs on stdout (our log file).
        self._spawn([binary("haproxy"), "-db", "-f", str(self.config_path)], self.log_path,
                    cwd=self.state_dir)
        self._wait_ready(lambda: self.admin_socket.exists() and port_in_use(self.port))

    def stop(self) -> None:
        self._reap()
        if self.bind == "127.0.0.1":
            wait_port_free(self.port, self.stop_timeout, self.name)

    # -- the admin socket ----------------------------------------------------------------

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One admin socket command (``show stat``, ``set server milters/h1 state drain``)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.admin_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def servers(self) -> dict[str, ServerStat]:
        """The backend's servers as the balancer sees them now."""
        text = self.command("show stat").lstrip("# ")
        out = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") != "milters" or row.get("svname") in ("BACKEND", "FRONTEND"):
                continue
            out[row["svname"]] = ServerStat(
                name=row["svname"], status=row["status"],
                current_sessions=int(row["scur"] or 0), total_sessions=int(row["stot"] or 0),
                connection_errors=int(row["econ"] or 0), redispatches=int(row["wredis"] or 0),
                check_failures=int(row["chkfail"] or 0),
                last_check=f"{row.get('check_status', '')} {row.get('last_chk', '')}".strip())
        return out

    def set_state(self, server: str, state: Literal["ready", "drain", "maint"]) -> None:
        """Put a server in a state by hand (what an operator does before maintenance)."""
        reply = self.command(f"set server milters/{server} state {state}").strip()
        if reply:
            raise StackError(f"haproxy: set server {server} state {state}: {reply}")

    def wait_status(self, server: str, status: str, timeout: float = 30.0) -> float:
        """Wait until *server* shows *status* (``UP``, ``DOWN``...); returns seconds waited."""
        seen: list[str] = []

        def reached() -> bool:
            stat = self.servers().get(server)
            seen.append(stat.status if stat else "?")
            return stat is not None and stat.status == status

        t0 = time.monotonic()
        if not wait_until(reached, timeout, 0.05):
            raise StackTimeoutError(f"haproxy: {server} not {status} within {timeout:g}s "
                                    f"(last: {seen[-1] if seen else '?'})")
        return time.monotonic() - t0

    def wait_all_up(self, timeout: float = 30.0) -> None:
        """Wait until every configured server is UP."""
        if not wait_until(lambda: all(s.up for s in self.servers().values())
                          and len(self.servers()) == len(self.servers_configured),
                          timeout, 0.1):
            states = {n: s.status for n, s in self.servers().items()}
            raise StackTimeoutError(f"haproxy: not every server UP within {timeout:g}s: "
                                    f"{states}\n{self.log_path.read_text()[-2000:]}")
