"""systemd: the readiness datagrams a real daemon sends, and the unit file the core ships.

The notify socket here is a datagram socket the test binds itself and hands
to the daemon as ``$NOTIFY_SOCKET``, exactly as systemd does for a
``Type=notify`` service.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from miltermonkey_core.cli.systemd import DEFAULT_BIN, DEFAULT_CONFIG, sample_config, unit_text
from miltermonkey_core.server.notify import Notifier, monotonic_usec
from miltermonkey_core.testing.daemon import MonkeyProcess


class NotifySocket:
    """What systemd listens on: one datagram per notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def until(self, key: str, timeout: float = 20.0) -> list[dict[str, str]]:
        """Datagrams up to and including the first carrying ``key``."""
        seen = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            seen.append(self.next(end - time.monotonic()))
            if key in seen[-1]:
                return seen
        raise AssertionError(f"no {key} in {seen}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_ready_reloading_and_stopping_reach_the_notify_socket(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    m = MonkeyProcess(tmp_path, [{"use": "trivial"}],
                      env={"NOTIFY_SOCKET": str(notify_socket.path)})
    m.start()
    try:
        ready = notify_socket.until("READY")[-1]
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving")
        before = monotonic_usec()
        m.signal(signal.SIGHUP)
        reloading = notify_socket.until("RELOADING")[-1]
        assert reloading["RELOADING"] == "1"
        # MONOTONIC_USEC is CLOCK_MONOTONIC, which systemd compares with its own
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        done = notify_socket.until("READY")[-1]
        assert "reloaded" in done["STATUS"]
        m.signal(signal.SIGTERM)
        stopping = notify_socket.until("STOPPING")[-1]
        assert stopping["STOPPING"] == "1" and "SIGTERM" in stopping["STATUS"]
        assert m.proc is not None and m.proc.wait(20) == 0
    finally:
        m.stop()


def test_a_refused_reload_still_ends_with_ready(tmp_path: Path,
                                                notify_socket: NotifySocket) -> None:
    with MonkeyProcess(tmp_path, [{"use": "trivial"}],
                       env={"NOTIFY_SOCKET": str(notify_socket.path)}) as m:
        notify_socket.until("READY")
        m.config_path.write_text(m.config_path.read_text() + "\n[[brain]]\nuse = \"nope\"\n")
        m.signal(signal.SIGHUP)
        notify_socket.until("RELOADING")
        after = notify_socket.until("READY")[-1]
        assert "reload refused" in after["STATUS"]


def test_the_notifier_speaks_to_abstract_sockets_and_is_silent_without_one() -> None:
    name = f"mm-notify-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        assert Notifier(f"@{name}").stopping("stopping (SIGTERM)")
        assert s.recv(4096) == b"STOPPING=1\nSTATUS=stopping (SIGTERM)"
    assert not Notifier("").enabled and not Notifier("").ready("x")
    assert not Notifier("relative/path").enabled


def test_a_vanished_notify_socket_is_warned_about_once(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "gone.sock"))
    assert not n.ready("a") and not n.ready("b")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_the_printed_unit_is_the_shipped_one_with_the_paths_filled_in() -> None:
    out = subprocess.run([sys.executable, "-m", "miltermonkey_core", "systemd-unit"],
                         capture_output=True, text=True, check=True).stdout
    assert out == unit_text()
    assert f"ExecStart={DEFAULT_BIN} run -c {DEFAULT_CONFIG}" in out
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed",
                 "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "RuntimeDirectory=miltermonkey"):
        assert line in out.splitlines(), line
    sample = subprocess.run([sys.executable, "-m", "miltermonkey_core", "systemd-unit",
                             "--sample-config"], capture_output=True, text=True,
                            check=True).stdout
    assert sample == sample_config()


def test_the_sample_configuration_checks(tmp_path: Path) -> None:
    cfg = tmp_path / "miltermonkey.toml"
    # /run/miltermonkey is made by systemd (RuntimeDirectory=); here, a directory of ours
    cfg.write_text(sample_config().replace("/run/miltermonkey/", f"{tmp_path}/"))
    run = subprocess.run([sys.executable, "-m", "miltermonkey_core", "check-config", "-c",
                          str(cfg)], capture_output=True, check=False, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("OK: 1 brain: trivial")


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    binary = Path(sys.executable).with_name("miltermonkey")
    if not binary.exists():
        pytest.skip(f"no miltermonkey command beside {sys.executable}")
    unit = tmp_path / "miltermonkey.service"
    unit.write_text(unit_text(str(binary), str(tmp_path / "miltermonkey.toml")))
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, check=False,
                         text=True)
    complaints = [ln for ln in run.stderr.splitlines() if str(unit) in ln or "miltermonkey"
                  in ln]
    assert run.returncode == 0 and not complaints, run.stderr
