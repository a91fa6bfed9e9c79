"""Start a real MilterMonkey daemon for a test, on a free loopback port or a UNIX socket.

The daemon runs as a separate process (``python -m miltermonkey_core run``)
exactly as in production, so tests exercise libmilter, the socket and the
worker pool, not a simulation of them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miltermonkey_core.testing.process import free_port, stop_popen


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def render_config(daemon: Mapping[str, Any], brains: Sequence[Mapping[str, Any]]) -> str:
    """A TOML config from plain dicts, so tests state only what they care about."""
    lines = ["[miltermonkey]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in daemon.items()]
    for b in brains:
        lines += ["", "[[brain]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"


class MonkeyProcess:
    """A running daemon; use as a context manager.

    ``brains`` is a list of ``[[brain]]`` tables (``{"use": "trivial"}``);
    ``daemon`` holds extra ``[miltermonkey]`` keys.  ``unix=True`` listens on a
    UNIX socket in ``workdir`` instead of TCP.
    """

    def __init__(
        self,
        workdir: Path,
        brains: Sequence[Mapping[str, Any]] = ({"use": "trivial"},),
        daemon: Mapping[str, Any] | None = None,
        *,
        unix: bool = False,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "monkey",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.unix = unix
        self.port = 0 if unix else (port or free_port())
        # The MTA runs as another user (postfix): the socket's directory must be
        # traversable by it, which pytest's 0700 tmp dirs are not.
        self._sockdir = Path(tempfile.mkdtemp(prefix="mm-sock-")) if unix else None
        if self._sockdir is not None:
            self._sockdir.chmod(0o755)
        self.socket_path = (self._sockdir or self.workdir) / f"{name}.sock"
        d: dict[str, Any] = {
            "connection": f"unix:{self.socket_path}" if unix else f"inet:{self.port}@127.0.0.1",
            "log_target": str(self.workdir / f"{name}.log"),
            "debug_level": 60,
            "milter_key": False,
            "pidfile": str(self.workdir / f"{name}.pid"),
        }
        if unix:
            d["socket_mode"] = "0666"
        d.update(daemon or {})
        self.daemon_options = d
        self.brains = list(brains)
        self.config_path = self.workdir / f"{name}.toml"
        self.config_path.write_text(render_config(d, self.brains))
        self.log_path = Path(d["log_target"])
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    # --- addresses --------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """What :class:`~miltermonkey_core.testing.client.MilterClient` connects to."""
        return str(self.socket_path) if self.unix else ("127.0.0.1", self.port)

    @property
    def postfix_spec(self) -> str:
        """The value for Postfix's ``smtpd_milters``."""
        return f"unix:{self.socket_path}" if self.unix else f"inet:127.0.0.1:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> MonkeyProcess:
        env = {**os.environ, **self.env}
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "miltermonkey_core", "run", "-c", str(self.config_path)],
                stdout=err, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"miltermonkey exited {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if self._listening() and self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"miltermonkey did not listen within {timeout} s:\n{self.output()}")

    def _ready(self) -> bool:
        """The socket can listen before the worker has built its brains."""
        if self.env.get("MILTERMONKEY_NO_SUPERVISOR") == "1":
            return True
        return "is serving" in self.log()

    def _listening(self) -> bool:
        if self.unix:
            if not self.socket_path.exists():
                return False
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = str(self.socket_path)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = ("127.0.0.1", self.port)
        try:
            s.settimeout(0.5)
            s.connect(target)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        status = stop_popen(self.proc, timeout)
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
        return status

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> MonkeyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it said ----------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        out = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return out + self.log()

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the monkey's log:\n{self.output()[-4000:]}")
