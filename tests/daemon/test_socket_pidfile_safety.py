"""The socket, the pid file and a worker that cannot start: what an admin's mistakes do.

Issue 13, findings 6 and 7, on real processes and sockets: a second daemon
on a UNIX socket already served must leave it alone; a socket directory
anyone can write is refused; a pid file that is a symlink or a directory
is a one-line error; a worker that keeps failing to start makes the
supervisor exit 1 with the reason.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miltermonkey_core.errors import MonkeyError
from miltermonkey_core.server.pidfile import write_pidfile
from miltermonkey_core.server.sockets import directory_problems, remove_unix_socket
from miltermonkey_core.testing.client import run_session
from miltermonkey_core.testing.daemon import MonkeyProcess, render_config

RAW = b"From: a@example.test\r\nSubject: safety\r\n\r\nhello\r\n"


def run_cli(config: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "miltermonkey_core", "run", "-c", str(config)],
                          capture_output=True, check=False, text=True, timeout=timeout,
                          env={**os.environ, **env})


def write_config(path: Path, **daemon: object) -> Path:
    path.write_text(render_config({"milter_key": False, **daemon}, [{"use": "trivial"}]))
    return path


# --- finding 6: the UNIX socket --------------------------------------------------------------


def test_a_second_daemon_on_a_served_socket_leaves_it_alone(tmp_path: Path) -> None:
    with MonkeyProcess(tmp_path / "first", unix=True) as first:
        sock = first.socket_path
        before = os.lstat(sock)
        second = run_cli(write_config(
            tmp_path / "second.toml", connection=f"unix:{sock}",
            log_target=str(tmp_path / "second.log"), pidfile=str(tmp_path / "second.pid")))
        assert second.returncode == 1
        assert f"another process is listening on {sock}" in second.stderr
        after = os.lstat(sock)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        assert run_session(first.address, [(RAW, "<a@example.test>", ["<b@example.test>"])]
                           )[0].accepted
        assert first.alive()


def test_a_socket_in_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    run = run_cli(write_config(tmp_path / "mm.toml", connection=f"unix:{shared}/mm.sock",
                               log_target=str(tmp_path / "mm.log")))
    assert run.returncode == 1
    assert (f"unix socket {shared}/mm.sock: {shared} is writable by every user (mode 0777)"
            in run.stderr)
    assert "Traceback" not in run.stderr
    assert not (shared / "mm.sock").exists()


def test_a_socket_in_a_sticky_world_writable_directory_is_warned_about(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    cfg = write_config(tmp_path / "mm.toml", connection=f"unix:{sticky}/mm.sock",
                       log_target=str(tmp_path / "mm.log"))
    with (tmp_path / "stderr").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "miltermonkey_core", "run", "-c",
                                 str(cfg)], stderr=err)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and "is serving" not in _read(tmp_path / "mm.log"):
            assert proc.poll() is None, _read(tmp_path / "stderr")
            time.sleep(0.05)
        log = _read(tmp_path / "mm.log")
        assert f"{sticky} is world-writable (mode 1777, sticky)" in log
        assert run_session(str(sticky / "mm.sock"),
                           [(RAW, "<a@example.test>", ["<b@example.test>"])])[0].accepted
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_directory_owners_and_groups_are_judged(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    refusals, warnings = directory_problems(str(theirs / "mm.sock"), uid=0, gid=0)
    assert refusals == [] and any("owned by" in w for w in warnings)
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o775)
    os.chown(group, 0, 65534)
    refusals, warnings = directory_problems(str(group / "mm.sock"), uid=0, gid=0)
    assert refusals == [] and any("writable by group" in w for w in warnings)
    # the daemon's own group may write there
    assert directory_problems(str(group / "mm.sock"), uid=0, gid=65534) == ([], [])
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o750)
    assert directory_problems(str(ours / "mm.sock"), uid=0, gid=0) == ([], [])


def test_only_a_socket_we_bound_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "mm.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        st = os.lstat(path)
        assert not remove_unix_socket(str(path), None)  # never bound by us: kept
        assert not remove_unix_socket(str(path), (st.st_dev, st.st_ino + 1))  # a successor's
        assert path.exists()
        assert remove_unix_socket(str(path), (st.st_dev, st.st_ino))
        assert not path.exists()


# --- finding 7: the pid file -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink to a file", "directory"])
def test_a_pid_file_that_is_no_file_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    pid = tmp_path / "mm.pid"
    target = tmp_path / "target"
    if kind == "directory":
        pid.mkdir()
        expected = f"pid file {pid} is a directory"
    else:
        if kind == "symlink to a file":
            target.write_text("precious\n")
        pid.symlink_to(target)
        expected = f"pid file {pid} is a symbolic link (to {target}"
    run = run_cli(write_config(tmp_path / "mm.toml", connection="inet:1@127.0.0.1",
                               pidfile=str(pid), log_target=str(tmp_path / "mm.log")))
    assert run.returncode == 1
    assert run.stderr.startswith(f"miltermonkey: {expected}"), run.stderr
    assert "Traceback" not in run.stderr
    if kind == "symlink to a file":
        assert target.read_text() == "precious\n"


def test_write_pidfile_replaces_a_stale_file_and_refuses_a_live_one(tmp_path: Path) -> None:
    pid = tmp_path / "mm.pid"
    pid.write_text("999999999\n")  # no such process
    write_pidfile(str(pid))
    assert pid.read_text() == f"{os.getpid()}\n"
    pid.write_text(f"{os.getppid()}\n")
    with pytest.raises(MonkeyError, match="already runs as pid"):
        write_pidfile(str(pid))


# --- finding 7: a worker that cannot start ---------------------------------------------------


def vanishing_brain(site: Path) -> None:
    """A brain package installed on ``site`` only (removed by deleting the directory)."""
    (site / "mm_vanish").mkdir(parents=True)
    (site / "mm_vanish" / "__init__.py").write_text(
        "from miltermonkey_core import Brain\n\n\nclass Vanish(Brain):\n    pass\n")
    info = site / "mm_vanish-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mm-vanish\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[miltermonkey.brains]\nvanish = mm_vanish:Vanish\n")


def _worker_pid(m: MonkeyProcess) -> int:
    return int(re.findall(r"started worker pid (\d+)", m.log())[-1])


@pytest.mark.parametrize("attempts", [2, 0])
def test_a_worker_that_cannot_start_makes_the_supervisor_give_up(tmp_path: Path,
                                                                 attempts: int) -> None:
    site = tmp_path / "site"
    vanishing_brain(site)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    m = MonkeyProcess(tmp_path / "mm", [{"use": "vanish"}], {"restart_attempts": attempts},
                      env={"PYTHONPATH": pythonpath})
    m.start()
    try:
        for p in sorted(site.rglob("*"), reverse=True):  # "pip uninstall"
            p.unlink() if p.is_file() else p.rmdir()
        os.kill(_worker_pid(m), signal.SIGKILL)
        assert m.proc is not None
        if attempts:
            assert m.proc.wait(30) == 1
            out = m.output()
            assert re.search(r"miltermonkey: worker pid \d+ failed to start \(exit status 1\): "
                             r"no brain called 'vanish' is installed.*; 2 failed starts in a "
                             r"row \(restart_attempts = 2\): giving up", out), out
        else:
            end = time.monotonic() + 30
            while time.monotonic() < end and m.log().count("failed to start") < 3:
                assert m.alive(), m.output()
                time.sleep(0.1)
            assert m.log().count("failed to start") >= 3 and m.alive()
            assert m.stop() == 0
    finally:
        m.stop()
