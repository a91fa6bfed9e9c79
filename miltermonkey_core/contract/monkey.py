"""The monkey: the utility handle every brain gets.

The seed handed brains "a handle to Sendmail::Milter::Monkey utility
functions, so that your monkey brain can control its monkey".  Here that is
logging at the configured debug level (tagged with brain and queue id),
temporary files where the admin wants them, sending a notice mail, and the
milter key.  Each brain gets its own view so its log lines name it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from miltermonkey_core.logs import ROOT, LevelLogger

if TYPE_CHECKING:
    from tempfile import TemporaryDirectory

    from miltermonkey_core.contract.model import Message

log = logging.getLogger(f"{ROOT}.monkey")


class NoticeError(RuntimeError):
    """A notice mail could not be handed to the MTA."""


class Monkey:
    """Daemon-wide services, viewed through one brain (``brain``)."""

    def __init__(
        self,
        *,
        miltername: str = "MilterMonkey",
        hostname: str | None = None,
        debug_level: int = 10,
        tmpdir: str | None = None,
        sendmail_path: str = "/usr/sbin/sendmail",
        notify_smtp: str | None = None,
        config: Any = None,
        brain: str = "core",
    ) -> None:
        self.miltername = miltername
        self.hostname = hostname or socket.getfqdn()
        self.debug_level = debug_level
        self.tmpdir = tmpdir
        self.sendmail_path = sendmail_path
        self.notify_smtp = notify_smtp
        self.config = config
        self.brain = brain
        self.log = LevelLogger(f"{ROOT}.brain.{brain}" if brain != "core" else ROOT, debug_level)
        #: The milter key service when ``milter_key`` is on (see ``milterkey``).
        self.key: Any = None

    @classmethod
    def from_config(cls, daemon: Any, config: Any = None) -> Monkey:
        return cls(
            miltername=daemon.miltername,
            hostname=daemon.hostname,
            debug_level=daemon.debug_level,
            tmpdir=daemon.tmpdir,
            sendmail_path=daemon.sendmail_path,
            notify_smtp=daemon.notify_smtp,
            config=config,
        )

    def for_brain(self, brain: str) -> Monkey:
        """The same services with log lines naming ``brain``."""
        m = Monkey(
            miltername=self.miltername,
            hostname=self.hostname,
            debug_level=self.debug_level,
            tmpdir=self.tmpdir,
            sendmail_path=self.sendmail_path,
            notify_smtp=self.notify_smtp,
            config=self.config,
            brain=brain,
        )
        m.key = self.key
        return m

    # --- files ----------------------------------------------------------------

    # tempfile, smtplib and subprocess are imported where they are used: tempfile
    # brings shutil, bz2 and lzma, smtplib brings ssl and email (about 8 MiB
    # together), and a daemon whose brains send no notices never needs them.

    def tempfile(self, prefix: str = "mm-", suffix: str = "") -> IO[bytes]:
        """A named temporary file in the configured tmpdir, removed on close."""
        import tempfile  # noqa: PLC0415 - memory, see above

        return tempfile.NamedTemporaryFile(prefix=prefix, suffix=suffix, dir=self.tmpdir)

    def tempdir(self, prefix: str = "mm-") -> TemporaryDirectory[str]:
        import tempfile  # noqa: PLC0415 - memory, see above

        return tempfile.TemporaryDirectory(prefix=prefix, dir=self.tmpdir)

    # --- the milter key ---------------------------------------------------------

    def key_says_ran(self, message: Message, brain: str | None = None) -> bool:
        """True when a trusted milter key on ``message`` says ``brain`` already ran."""
        if self.key is None:
            return False
        result = message.notes.get("_mm_key")
        if result is None:
            return False
        return bool(result.says_ran(brain or self.brain))

    # --- notices ----------------------------------------------------------------

    def send_mail(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        sendmail_path: str | None = None,
    ) -> None:
        """Hand a notice to the MTA, by SMTP if ``notify_smtp`` is set, else sendmail.

        Notices re-enter the MTA and pass the milters again: they must be
        clean and short.  Raises :class:`NoticeError` on failure so the brain
        can log it with the queue id.
        """
        rcpts = [r.strip().removeprefix("<").removesuffix(">") for r in recipients]
        env_from = sender.strip().removeprefix("<").removesuffix(">")
        if not rcpts:
            raise NoticeError("notice has no recipients")
        sendmail = sendmail_path or self.sendmail_path
        if self.notify_smtp and not sendmail_path:
            import smtplib  # noqa: PLC0415 - memory, see tempfile above

            host, _, port = self.notify_smtp.rpartition(":")
            try:
                with smtplib.SMTP(host or "127.0.0.1", int(port), timeout=30) as s:
                    s.sendmail(env_from, rcpts, message)
            except (OSError, smtplib.SMTPException) as e:
                raise NoticeError(f"SMTP {self.notify_smtp}: {e}") from e
            return
        if not os.access(sendmail, os.X_OK):
            raise NoticeError(f"sendmail_path {sendmail} is not executable")
        import subprocess  # noqa: PLC0415 - memory, see tempfile above

        try:
            proc = subprocess.run(
                [sendmail, "-i", "-f", env_from or "<>", "--", *rcpts],
                input=message,
                capture_output=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NoticeError(f"{sendmail}: {e}") from e
        if proc.returncode != 0:
            raise NoticeError(
                f"{sendmail} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
