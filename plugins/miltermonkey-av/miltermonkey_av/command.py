"""The command-line scanner engine: the seed's ``uvscan``, or ``clamscan``/``clamdscan``.

The message is written to a file named from ``tempfile_template`` (the
seed's ``/var/tmp/av_%s``), the tool runs on it, and its exit code decides.
The file is created with ``O_EXCL`` and mode 0600, so another local user can
neither pre-create it (a symlink to a file we would then overwrite) nor read
the mail in it, and it is removed whatever happens.

Exit codes differ per tool and are the only reliable verdict, so they are
configurable; the virus name is parsed from the output with a configurable
regex.  Built-in presets, chosen by the tool's file name:

=========  =====  ========  ===================================================
tool       clean  infected  default arguments
=========  =====  ========  ===================================================
clamscan   0      1         ``--no-summary --stdout --alert-exceeds-max=yes {file}``
clamdscan  0      1         ``--no-summary --stdout --stream {file}``
uvscan     0      13        ``--secure --mime --noboot {file}``
=========  =====  ========  ===================================================

Any other exit code is an engine error (clamscan's 2, uvscan's 2/6/8/15...),
never "clean".  An "infected" answer whose only names are ClamAV's
``Heuristics.Limits.Exceeded.*`` means the tool stopped before the end of the
message: :attr:`~miltermonkey_av.result.Status.LIMITS`.  clamscan is told to
say so (``--alert-exceeds-max=yes``); clamdscan says so when its clamd runs
with ``AlertExceedsMax yes``.  ``clamdscan`` streams the file (``--stream``) because clamd
runs as another user and cannot open a 0600 file itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from miltermonkey_av.errors import EngineReportedError, EngineUnavailable, ScanTimeout
from miltermonkey_av.result import ScanResult, Status, classify_found
from miltermonkey_core import Message

#: ``/path/file: Name FOUND`` (clamscan, clamdscan).
CLAMAV_REGEX = r"^.*?: (?P<name>\S+) FOUND$"
#: McAfee uvscan: ``Found the EICAR test file NOT a virus.``,
#: ``Found the W32/Netsky.p@MM!zip virus !!!``, ``Found virus or variant W32/Sdbot !!!``.
UVSCAN_REGEX = (r"Found(?: the| (?:virus|trojan|application) or variant|:)?\s+"
                r"(?P<name>.+?)(?:\s+(?:virus|trojan|program|application)\b.*"
                r"|\s+NOT a virus.*|\s*!+|\.)?\s*$")

FILE_PLACEHOLDER = "{file}"
_SAFE_ID = re.compile(r"[^A-Za-z0-9]")


@attrs.frozen
class Preset:
    args: tuple[str, ...]
    clean_codes: tuple[int, ...]
    infected_codes: tuple[int, ...]
    regex: str


PRESETS: dict[str, Preset] = {
    "clamscan": Preset(("--no-summary", "--stdout", "--alert-exceeds-max=yes", FILE_PLACEHOLDER),
                       (0,), (1,), CLAMAV_REGEX),
    "clamdscan": Preset(("--no-summary", "--stdout", "--stream", FILE_PLACEHOLDER), (0,), (1,),
                        CLAMAV_REGEX),
    "uvscan": Preset(("--secure", "--mime", "--noboot", FILE_PLACEHOLDER), (0,), (13,),
                     UVSCAN_REGEX),
}


def preset_for(path: str) -> Preset | None:
    """The preset for a scanner path, by its file name (``/usr/av/bin/uvscan`` -> uvscan)."""
    return PRESETS.get(Path(path).name)


def check_template(template: str) -> str:
    """A tempfile template must be an absolute path with exactly one ``%s``."""
    if template.count("%s") != 1 or template.replace("%s", "").count("%") != 0:
        raise ValueError(f"tempfile_template {template!r} must contain exactly one %s "
                         "(replaced by a unique id) and no other %")
    if not template.startswith("/"):
        raise ValueError(f"tempfile_template {template!r} must be an absolute path")
    if "/" in template.split("%s", 1)[1]:
        raise ValueError(f"tempfile_template {template!r}: %s must be in the file name, "
                         "not in a directory")
    return template


def create_tempfile(template: str, tag: str = "") -> tuple[int, Path]:
    """Create a fresh file from ``template``: ``O_EXCL``, mode 0600, no symlink following.

    The unique id is a random token (plus the queue id, sanitised, for the
    admin reading ``ls``); a name collision just draws again.
    """
    safe = _SAFE_ID.sub("", tag)[:32]
    for _ in range(16):
        unique = f"{safe}.{secrets.token_hex(8)}" if safe else secrets.token_hex(8)
        path = Path(template.replace("%s", unique))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise EngineUnavailable(f"cannot create temporary file {path}: "
                                    f"{e.strerror or e}") from e
        return fd, path
    raise EngineUnavailable(f"cannot create a unique temporary file from {template!r}")


class CommandScanner:
    """Runs one external scanner per message."""

    def __init__(
        self,
        path: str,
        *,
        args: Sequence[str] | None = None,
        clean_codes: Sequence[int] | None = None,
        infected_codes: Sequence[int] | None = None,
        regex: str | re.Pattern[str] | None = None,
        tempfile_template: str = "/var/tmp/av_%s",  # noqa: S108 - O_EXCL, 0600
        timeout: float = 60.0,
    ) -> None:
        preset = preset_for(path)
        if preset is None and (clean_codes is None or infected_codes is None):
            raise ValueError(
                f"scanner {path!r} is not one of {', '.join(PRESETS)}: set "
                "scanner_clean_codes and scanner_infected_codes (and scanner_virus_regex)")
        self.path = path
        self.args = tuple(args if args is not None else
                          (preset.args if preset else (FILE_PLACEHOLDER,)))
        self.clean_codes = frozenset(clean_codes if clean_codes is not None else
                                     preset.clean_codes if preset else ())
        self.infected_codes = frozenset(infected_codes if infected_codes is not None else
                                        preset.infected_codes if preset else ())
        if self.clean_codes & self.infected_codes:
            raise ValueError(f"exit codes {sorted(self.clean_codes & self.infected_codes)} "
                             "are both clean and infected")
        pattern = regex if regex is not None else (preset.regex if preset else CLAMAV_REGEX)
        self.regex = (pattern if isinstance(pattern, re.Pattern)
                      else re.compile(pattern, re.MULTILINE))
        if "name" not in self.regex.groupindex:
            raise ValueError("scanner_virus_regex needs a (?P<name>...) group")
        self.tempfile_template = check_template(tempfile_template)
        self.timeout = timeout

    @property
    def description(self) -> str:
        return f"command {self.path}"

    def check(self) -> None:
        """Raise :class:`EngineUnavailable` if the scanner cannot be run at all."""
        if not os.access(self.path, os.X_OK):
            raise EngineUnavailable(f"scanner {self.path} is missing or not executable")

    def command_line(self, file: Path) -> list[str]:
        args = [a.replace(FILE_PLACEHOLDER, str(file)) for a in self.args]
        if not any(FILE_PLACEHOLDER in a for a in self.args):
            args.append(str(file))
        return [self.path, *args]

    def scan(self, message: Message) -> ScanResult:
        t0 = time.monotonic()
        self.check()
        fd, path = create_tempfile(self.tempfile_template, message.queue_id or "")
        try:
            with os.fdopen(fd, "wb") as f:
                for piece in message.iter_bytes():
                    f.write(piece)
            return self.scan_file(path, t0)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def scan_file(self, path: Path, t0: float | None = None) -> ScanResult:
        t0 = time.monotonic() if t0 is None else t0
        cmd = self.command_line(path)
        try:
            # Own session, so a timeout can kill the tool and anything it forked.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise EngineUnavailable(f"cannot run {self.path}: {e.strerror or e}") from e
        try:
            out, err = proc.communicate(timeout=max(0.001, self.timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ScanTimeout(f"{self.path} did not finish within {self.timeout:g} s") from e
        text = (out + b"\n" + err).decode("utf-8", "replace")
        code = proc.returncode
        seconds = time.monotonic() - t0
        if code in self.infected_codes:
            status, names = classify_found(tuple(dict.fromkeys(
                m.group("name").strip() for m in self.regex.finditer(text))))
            return ScanResult(status, names, self.description, seconds, _tail(text))
        if code in self.clean_codes:
            return ScanResult(Status.CLEAN, (), self.description, seconds, _tail(text))
        raise EngineReportedError(f"{self.path} exited {code}: {_tail(text)}")

    def close(self) -> None:
        """Nothing to release; present for the engine interface."""


def _tail(text: str, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text[-limit:]
