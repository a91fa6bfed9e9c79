"""The ``miltermonkey`` command, run as an admin runs it: a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from test_config import BROKEN, make_fake_dist

MESSAGE = b"From: alice@example.test\nTo: bob@example.test\nSubject: %s\n\nHello Bob.\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dist = make_fake_dist(tmp_path_factory.mktemp("cli_dist"))
    path = os.pathsep.join(p for p in (str(dist), os.environ.get("PYTHONPATH", "")) if p)
    e = {**os.environ, "PYTHONPATH": path}
    e.pop("MILTERMONKEY_CONFIG", None)
    return e


def mm(env: dict[str, str], *args: str | Path, cwd: Path | None = None,
       stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "miltermonkey_core", *map(str, args)],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False,
    )


def write(tmp_path: Path, text: str, name: str = "mm.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_config_locates_mistakes(env: dict[str, str], tmp_path: Path, case: str) -> None:
    text, line, key, fragment = BROKEN[case]
    path = write(tmp_path, text)
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith(f"miltermonkey: {path}:{line}: {key}: ")
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_reports_every_broken_brain(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, """
        [[brain]]
        use = "scan"
        relay_mode = "no"

        [[brain]]
        use = "trivial"
        header_name = "Bad Name"
        """)
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"miltermonkey: {path}:3: relay_mode: ")
    assert lines[1].startswith(f"miltermonkey: {path}:7: header_name: ")


def test_check_config_ok(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, """
        [miltermonkey]
        milter_key = false

        [[brain]]
        use = "trivial"

        [[brain]]
        use = "scan"
        name = "av"
        """)
    r = mm(env, "check-config", "-c", path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "OK: 2 brains: trivial, av\n", "")


def test_check_config_without_file_uses_the_default(env: dict[str, str]) -> None:
    r = mm(env, "check-config")
    assert (r.returncode, r.stdout) == (0, "OK: 1 brain: trivial\n")


def test_check_config_checks_the_machine(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, """
        [miltermonkey]
        milter_key = false
        connection = "unix:/nonexistent/dir/mm.sock"
        user = "no-such-user-mm"
        """)
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1
    assert f"{path}:3: connection: directory /nonexistent/dir does not exist" in r.stderr
    assert f"{path}:4: user: no such user 'no-such-user-mm'" in r.stderr


def test_check_config_checks_the_secret_file(env: dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "miltersecret"
    path = write(tmp_path, f"""
        [miltermonkey]
        milter_key = true
        miltersecretfile = "{secret}"
        """)
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"miltermonkey: {path}:3: miltersecretfile: ")
    assert "does not exist" in r.stderr and "miltermonkey key generate" in r.stderr
    r = mm(env, "key", "generate", "-c", path)
    assert r.returncode == 0, r.stderr
    assert mm(env, "check-config", "-c", path).stdout == "OK: 0 brains: none\n"
    secret.chmod(0o644)
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1 and "chmod 600" in r.stderr


def test_check_config_of_a_script(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "monkey.py"
    path.write_text(
        "from miltermonkey_core.script import monkey, brain, spank\n"
        "monkey(connection='inet:6609@127.0.0.1', milter_key=0)\n"
        "brain('scan', relay_mode=0)\n"
        "brain('trivial', headr_name='X')\n"
        "spank()\n"
    )
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"miltermonkey: {path}:4: headr_name: ")
    assert "did you mean 'header_name'?" in r.stderr


def test_show_config_is_a_config(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, """
        [miltermonkey]
        connection = "inet:127.0.0.1:10025"
        milter_key = false
        threads = 8

        [[brain]]
        use = "scan"
        uvscanpath = "/usr/av/bin/uvscan"
        """)
    r = mm(env, "show-config", "-c", path)
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(r.stdout)
    d = data["miltermonkey"]
    assert d["connection"] == "inet:10025@127.0.0.1" and d["threads"] == 8
    assert d["jobsperthread"] == 200 and d["defaultexpiration"] == 432000
    brain = data["brain"][0]
    assert brain["scanner_path"] == "/usr/av/bin/uvscan" and brain["relay_mode"] is False
    again = write(tmp_path, r.stdout, "again.toml")
    r2 = mm(env, "show-config", "-c", again)
    assert r2.stdout.splitlines()[2:] == r.stdout.splitlines()[2:]
    assert mm(env, "check-config", "-c", again).returncode == 0


def test_show_config_default(env: dict[str, str]) -> None:
    r = mm(env, "show-config")
    assert r.returncode == 0
    data = tomllib.loads(r.stdout)
    assert data["brain"] == [{
        "use": "trivial", "name": "trivial", "on_error": "tempfail", "timeout": 60.0,
        "mode": "enforce", "skip_if_key": False,
        "breaker_failures": 5, "breaker_window": 60.0, "breaker_cooldown": 30.0,
        "header_name": "X-MilterMonkey", "header_value": "{brain} on {host}",
    }]


def test_brains_lists_installed(env: dict[str, str]) -> None:
    r = mm(env, "brains")
    assert r.returncode == 0, r.stderr
    assert "trivial  (miltermonkey-core " in r.stdout
    assert "scan  (mm-cfgtest-brain 0.1)  mm_cfgtest_brain:ScanBrain" in r.stdout
    block = r.stdout.split("scan  (")[1].split("\n\n")[0]
    assert "hooks: eom_process" in block
    assert "relay_mode = false" in block and "test scanner" in block  # as show-config writes it


def test_errors_are_one_line(env: dict[str, str], tmp_path: Path) -> None:
    r = mm(env, "run", "-c", tmp_path / "missing.toml")
    assert r.returncode == 1
    assert r.stderr == f"miltermonkey: {tmp_path / 'missing.toml'}: cannot read: " \
                       "No such file or directory\n"
    r = mm(env, "show-config", "-c", write(tmp_path, "[miltermonkey\n"))
    assert r.returncode == 1 and "TOML syntax error" in r.stderr and ":1: " in r.stderr
    r = mm(env, "frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_config_from_environment(env: dict[str, str], tmp_path: Path) -> None:
    path = write(tmp_path, '[miltermonkey]\nmilter_key = false\n[[brain]]\nuse = "scan"\n')
    r = mm({**env, "MILTERMONKEY_CONFIG": str(path)}, "check-config")
    assert r.stdout == "OK: 1 brain: scan\n"


def test_version(env: dict[str, str]) -> None:
    r = mm(env, "--version")
    assert r.returncode == 0 and r.stdout.startswith("miltermonkey ")


# --------------------------------------------------------------------------------------
# try: the configured brains over one message, offline.
# --------------------------------------------------------------------------------------

TRY_CONFIG = """
[miltermonkey]
milter_key = false

[[brain]]
use = "scan"
on_error = "tempfail"

[[brain]]
use = "trivial"
header_value = "seen"
"""


@pytest.fixture
def try_config(tmp_path: Path) -> Path:
    return write(tmp_path, TRY_CONFIG)


def eml(tmp_path: Path, subject: str) -> Path:
    p = tmp_path / f"{subject}.eml"
    p.write_bytes(MESSAGE % subject.encode())
    return p


def test_try_clean_message(env: dict[str, str], tmp_path: Path, try_config: Path) -> None:
    r = mm(env, "try", eml(tmp_path, "hello"), "-c", try_config, "--from", "alice@example.test",
           "--to", "bob@example.test", "--macro", "i=4XyZ", "--show-message")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("verdict: continue")
    assert "  1. scan: add header X-Scanned: clean\n" in out
    assert "  2. trivial: add header X-MilterMonkey: seen\n" in out
    message = out.split("--- message ---\n", 1)[1]
    assert message.startswith("From: alice@example.test\n")
    assert "X-Scanned: clean\nX-MilterMonkey: seen\n\nHello Bob.\n" in message


def test_try_rejected_message(env: dict[str, str], tmp_path: Path, try_config: Path) -> None:
    r = mm(env, "try", eml(tmp_path, "VIRUS"), "-c", try_config)
    assert r.returncode == 5, r.stdout + r.stderr
    assert r.stdout.startswith("verdict: reject 550 5.7.1 virus found")
    assert "[by scan]" in r.stdout
    assert "edits: none" in r.stdout


def test_try_failing_brain_tempfails(env: dict[str, str], tmp_path: Path,
                                     try_config: Path) -> None:
    r = mm(env, "try", eml(tmp_path, "CRASH"), "-c", try_config)
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stdout.startswith("verdict: tempfail 451")


def test_try_from_stdin_and_missing_file(env: dict[str, str], tmp_path: Path) -> None:
    r = mm(env, "try", "-", stdin=MESSAGE % b"hi")
    assert r.returncode == 0 and "trivial: add header X-MilterMonkey" in r.stdout
    r = mm(env, "try", tmp_path / "nope.eml")
    assert r.returncode == 1 and r.stderr.startswith("miltermonkey: ")
    r = mm(env, "try", "-", "--macro", "novalue", stdin=b"")
    assert r.returncode == 2 and "NAME=VALUE" in r.stderr


def test_check_config_reports_every_problem(env: dict[str, str], tmp_path: Path) -> None:
    """One run shows every mistake: the daemon table's do not hide the brains'."""
    path = write(tmp_path, """
        [miltermonkey]
        milter_key = false
        threads = "many"
        colour = "blue"

        [[brain]]
        use = "patterned"
        subject = "("
        limit = 0

        [[brain]]
        use = "scan"
        scanner_pth = "/x"
        """)
    r = mm(env, "check-config", "-c", path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"miltermonkey: {path}:3: threads: expected an integer, got 'many'"
    text = r.stderr
    assert f"{path}:4: colour: unknown key" in text
    assert f"{path}:8: subject: error: missing ), unterminated subpattern" in text
    assert f"{path}:9: limit: " in text
    assert f"{path}:13: scanner_pth: unknown option" in text
    assert "did you mean 'scanner_path'" in text
    assert len(lines) == 5, text


def test_brains_shows_defaults_as_the_config_writes_them(env: dict[str, str]) -> None:
    r = mm(env, "brains")
    block = r.stdout.split("patterned  (")[1].split("\n\n")[0]
    assert 'subject = "^spam"' in block  # the pattern, not re.compile('^spam')


def test_try_does_not_list_edits_of_a_refused_message(
        env: dict[str, str], tmp_path: Path) -> None:
    config = write(tmp_path, """
        [miltermonkey]
        milter_key = false
        [[brain]]
        use = "trivial"
        [[brain]]
        use = "scan"
        """)
    r = mm(env, "try", eml(tmp_path, "VIRUS"), "-c", config)
    assert r.returncode == 5
    assert "edits: none applied (the message is not delivered)" in r.stdout
    assert "add header X-MilterMonkey" not in r.stdout
