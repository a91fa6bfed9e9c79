"""The command-line engine: real clamscan/clamdscan, and scripts that act like uvscan."""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
from av_helpers import SIGNATURES, RecordingMonkey, make_brain, run
from miltermonkey_av.command import (
    UVSCAN_REGEX,
    CommandScanner,
    check_template,
    create_tempfile,
)
from miltermonkey_av.errors import EngineReportedError, EngineUnavailable, ScanTimeout
from miltermonkey_av.result import Status
from miltermonkey_av.testing import Clamd
from miltermonkey_av.testing import samples as av_samples

from miltermonkey_core.contract.model import message_from_bytes
from miltermonkey_core.contract.verdict import Action

CLAMSCAN = shutil.which("clamscan")
CLAMDSCAN = shutil.which("clamdscan")
needs_clamscan = pytest.mark.skipif(CLAMSCAN is None, reason="clamscan not installed "
                                    "(Debian package clamav)")
needs_clamdscan = pytest.mark.skipif(CLAMDSCAN is None, reason="clamdscan not installed "
                                     "(Debian package clamdscan)")


def script(tmp_path: Path, name: str, body: str) -> str:
    """A fake scanner: a shell script called ``name`` (so presets apply by name)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan is reaped by init, maybe late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def only_our_files(template: str) -> list[str]:
    return sorted(os.listdir(Path(template).parent))


# --- real ClamAV tools --------------------------------------------------------------------


@needs_clamscan
@pytest.mark.parametrize("sample", av_samples.SAMPLES, ids=lambda s: s.name)
def test_clamscan_every_sample(sample: av_samples.Sample, tempdir_template: str) -> None:
    assert CLAMSCAN is not None
    scanner = CommandScanner(CLAMSCAN, args=("--no-summary", "--stdout", "-d", str(SIGNATURES),
                                             "{file}"), tempfile_template=tempdir_template)
    result = scanner.scan(message_from_bytes(sample.raw, queue_id="4XyzQ1D"))
    if sample.expect is None:
        assert result.status is Status.CLEAN
    else:
        assert result.status is Status.INFECTED
        assert result.viruses == (sample.expect,)
    assert only_our_files(tempdir_template) == []  # removed after the scan


@needs_clamdscan
@pytest.mark.engines
@pytest.mark.parametrize("name", ["clean-multipart", "eicar-zip", "alpha-nested", "qp-text"])
def test_clamdscan_streams_to_clamd(clamd: Clamd, name: str, tempdir_template: str) -> None:
    assert CLAMDSCAN is not None
    sample = av_samples.sample(name)
    scanner = CommandScanner(CLAMDSCAN, args=(f"--config-file={clamd.config_path}",
                                              "--no-summary", "--stdout", "--stream", "{file}"),
                             tempfile_template=tempdir_template)
    result = scanner.scan(message_from_bytes(sample.raw))
    assert (result.viruses[0] if result.viruses else None) == sample.expect


@needs_clamscan
def test_clamscan_error_exit_is_an_engine_error(tempdir_template: str) -> None:
    assert CLAMSCAN is not None
    scanner = CommandScanner(CLAMSCAN, args=("-d", "/nonexistent/db", "{file}"),
                             tempfile_template=tempdir_template)
    with pytest.raises(EngineReportedError, match="exited 2"):
        scanner.scan(message_from_bytes(av_samples.sample("clean-plain").raw))
    assert only_our_files(tempdir_template) == []


@needs_clamscan
def test_brain_with_command_engine_relay_and_notify(tempdir_template: str) -> None:
    assert CLAMSCAN is not None
    args = ["--no-summary", "--stdout", "-d", str(SIGNATURES), "{file}"]
    relay = make_brain(scanner_path=CLAMSCAN, scanner_args=args,
                       tempfile_template=tempdir_template)
    assert relay.engine.description == f"command {CLAMSCAN}"
    r = run(relay, av_samples.sample("eicar-zip").raw)
    assert r.action is Action.REJECT
    assert r.verdict is not None and r.verdict.reply is not None
    assert av_samples.NAME_EICAR in r.verdict.reply.text
    notify = make_brain(scanner_path=CLAMSCAN, scanner_args=args, relay_mode=False,
                        tempfile_template=tempdir_template)
    r = run(notify, av_samples.sample("alpha-zip").raw)
    assert r.header("X-Virus-Status") == f"Infected ({av_samples.NAME_ALPHA})"
    assert run(notify, av_samples.sample("clean-zip").raw).header("X-Virus-Status") == "Clean"
    assert only_our_files(tempdir_template) == []


# --- the temporary file -------------------------------------------------------------------


def test_tempfile_is_exclusive_private_and_removed(tmp_path: Path,
                                                   tempdir_template: str) -> None:
    # The fake scanner reports the mode of the file (its last argument), then "finds" nothing.
    fake = script(tmp_path, "clamscan", 'for f; do :; done; stat -c "%a %n" "$f"; exit 0\n')
    scanner = CommandScanner(fake, tempfile_template=tempdir_template)
    msg = message_from_bytes(av_samples.sample("clean-plain").raw, queue_id="Q../1\n")
    result = scanner.scan(msg)
    mode, path = result.detail.split(" ", 1)
    assert mode == "600"
    assert re.fullmatch(re.escape(tempdir_template).replace("%s", r"Q1\.[0-9a-f]{16}"), path)
    assert only_our_files(tempdir_template) == []


def test_tempfile_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    template = str(tmp_path / "av_%s")
    fd, path = create_tempfile(template, "Q1")
    os.close(fd)
    path.unlink()
    path.symlink_to(victim)  # an attacker guessing this exact name gets nowhere:
    fd2, path2 = create_tempfile(template, "Q1")  # a fresh random name
    os.close(fd2)
    assert path2 != path
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(path2.stat().st_mode) == 0o600


def test_tempfile_dir_missing_is_engine_unavailable(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="cannot create temporary file"):
        create_tempfile(str(tmp_path / "missing" / "av_%s"))


@pytest.mark.parametrize("template", ["/var/tmp/av_%s", "/tmp/x/%s.eml"])
def test_good_templates(template: str) -> None:
    assert check_template(template) == template


# --- exit codes and names (uvscan-like scripts) --------------------------------------------


UVSCAN_LINES = [
    ("        Found the EICAR test file NOT a virus.", "EICAR test file"),
    ("/var/tmp/av_x/document.zip/document.scr ... Found the W32/Netsky.p@MM!zip virus !!!",
     "W32/Netsky.p@MM!zip"),
    ("/var/tmp/av_x Found virus or variant W32/Sdbot !!!", "W32/Sdbot"),
    ("/var/tmp/av_x ... Found: W32/Mydoom.o@MM.", "W32/Mydoom.o@MM"),
    ("   Found the Exploit-MIME.gen.exe trojan !!!", "Exploit-MIME.gen.exe"),
]


@pytest.mark.parametrize(("line", "name"), UVSCAN_LINES)
def test_uvscan_regex(line: str, name: str) -> None:
    m = re.compile(UVSCAN_REGEX, re.MULTILINE).search(line)
    assert m is not None and m.group("name") == name


def test_uvscan_preset_exit_13_is_infected(tmp_path: Path, tempdir_template: str) -> None:
    out = "\\n".join(line for line, _ in UVSCAN_LINES[:2])
    fake = script(tmp_path, "uvscan", f'printf "%s\\n" "$@" > {tmp_path}/args\n'
                                      f'printf "{out}\\n"; exit 13\n')
    scanner = CommandScanner(fake, tempfile_template=tempdir_template)
    result = scanner.scan(message_from_bytes(b"Subject: x\r\n\r\nhi\r\n"))
    assert result.status is Status.INFECTED
    assert result.viruses == ("EICAR test file", "W32/Netsky.p@MM!zip")
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:3] == ["--secure", "--mime", "--noboot"]
    assert args[3].startswith(tempdir_template.replace("%s", ""))


@pytest.mark.parametrize(("code", "expect"), [(0, Status.CLEAN), (13, Status.INFECTED),
                                              (2, None), (6, None), (8, None), (19, None)])
def test_uvscan_codes(tmp_path: Path, tempdir_template: str, code: int,
                      expect: Status | None) -> None:
    fake = script(tmp_path, "uvscan", f"exit {code}\n")
    scanner = CommandScanner(fake, tempfile_template=tempdir_template)
    msg = message_from_bytes(b"Subject: x\r\n\r\nhi\r\n")
    if expect is None:  # every other code is a failure, never "clean"
        with pytest.raises(EngineReportedError, match=f"exited {code}"):
            scanner.scan(msg)
    else:
        r = scanner.scan(msg)
        assert r.status is expect
        if expect is Status.INFECTED:
            assert r.name == "unknown"  # infected without a parsable name is still infected


def test_custom_scanner_codes_and_regex(tmp_path: Path, tempdir_template: str) -> None:
    fake = script(tmp_path, "kavscan", 'echo "detected Trojan.Win32.Foo in $1"; exit 20\n')
    scanner = CommandScanner(fake, clean_codes=[0], infected_codes=[20, 21],
                             regex=r"detected (?P<name>\S+)", tempfile_template=tempdir_template)
    r = scanner.scan(message_from_bytes(b"Subject: x\r\n\r\nhi\r\n"))
    assert r.viruses == ("Trojan.Win32.Foo",)


def test_scanner_timeout_kills_it(tmp_path: Path, tempdir_template: str) -> None:
    pidfile = tmp_path / "pid"
    fake = script(tmp_path, "clamscan", f"sleep 30 & echo $! > {pidfile}; wait\n")
    scanner = CommandScanner(fake, tempfile_template=tempdir_template, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(ScanTimeout):
        scanner.scan(message_from_bytes(b"Subject: x\r\n\r\nhi\r\n"))
    assert time.monotonic() - t0 < 3
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the whole process group died, not just the script
    assert only_our_files(tempdir_template) == []


def test_missing_scanner_stops_the_brain_at_start(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="not executable"):
        make_brain(RecordingMonkey(), scanner_path=str(tmp_path / "uvscan"),
                   tempfile_template=str(tmp_path / "av_%s"))


def test_unknown_scanner_needs_codes() -> None:
    with pytest.raises(ValueError, match="scanner_clean_codes"):
        CommandScanner("/opt/x/kavscan")


def test_scanner_vanishing_later_tempfails(tmp_path: Path, tempdir_template: str) -> None:
    fake = script(tmp_path, "clamscan", "exit 0\n")
    brain = make_brain(scanner_path=fake, tempfile_template=tempdir_template)
    Path(fake).unlink()
    result = run(brain, av_samples.sample("clean-plain").raw)
    assert result.action is Action.TEMPFAIL
