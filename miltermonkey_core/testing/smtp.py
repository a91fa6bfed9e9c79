"""An SMTP client for tests that reports what it saw instead of raising.

Tests assert on the server's answer ("550 5.7.1 ..." at end of data), so
:func:`send_mail` returns every 4xx/5xx as a :class:`SmtpResult` naming the
command it came at.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
from collections.abc import Mapping, Sequence
from typing import Literal

import attrs

__all__ = ["SmtpResult", "SmtpStage", "send_mail"]

SmtpStage = Literal["connect", "helo", "mail", "rcpt", "data"]


@attrs.frozen
class SmtpResult:
    """What an SMTP client saw for one message.

    ``code``/``text`` are the final reply (``text`` includes the enhanced
    status code, e.g. ``"5.7.1 Message rejected"``; lines of a multi-line
    reply are joined with newlines).  ``stage`` names the command that failed,
    or is None when the message was accepted.
    """

    code: int
    text: str
    stage: SmtpStage | None = None
    #: Recipients refused while others were accepted: address -> (code, text).
    refused: Mapping[str, tuple[int, str]] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        """True when the server accepted the message."""
        return self.stage is None and 200 <= self.code < 300

    @property
    def reply(self) -> str:
        """Code and text as the server sent them, e.g. ``"550 5.7.1 Rejected"``."""
        return f"{self.code} {self.text}"

    @property
    def queue_id(self) -> str | None:
        """Postfix's queue id from ``250 2.0.0 Ok: queued as ID``, if any."""
        match = re.search(r"queued as ([0-9A-Za-z]+)", self.text)
        return match.group(1) if match and self.ok else None

    def __str__(self) -> str:
        where = f" at {self.stage}" if self.stage else ""
        return f"{self.reply}{where}"


def _reply(code: int, raw: bytes | str) -> tuple[int, str]:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return code, text


def send_mail(
    port: int,
    raw: bytes,
    sender: str,
    recipients: Sequence[str],
    host: str = "127.0.0.1",
    helo: str = "client.test",
    timeout: float = 120.0,
    source: str | None = None,
) -> SmtpResult:
    """Send *raw* over SMTP and report the outcome instead of raising.

    Tests assert on what the client saw ("550 5.7.1 ..." at end of data), so
    4xx/5xx replies are returned as data.  Bare LF line endings in *raw* are
    sent as CRLF, as SMTP requires.  ``source`` is the client's own address
    (any 127.x.y.z works on loopback), for tests of what the MTA and the
    brains make of where mail comes from.
    """
    payload = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    if isinstance(recipients, str):
        recipients = [recipients]
    try:
        client = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout,
                              source_address=(source, 0) if source else None)
    except smtplib.SMTPConnectError as exc:
        return SmtpResult(*_reply(exc.smtp_code, exc.smtp_error), stage="connect")
    except (OSError, smtplib.SMTPException) as exc:
        return SmtpResult(0, f"cannot connect to {host}:{port}: {exc}", stage="connect")
    stage: SmtpStage = "helo"
    try:
        code, text = _reply(*client.ehlo(helo))
        if not 200 <= code < 300:
            code, text = _reply(*client.helo(helo))
            if not 200 <= code < 300:
                return SmtpResult(code, text, stage="helo")
        options = []
        if any(byte > 0x7F for byte in payload) and client.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        stage = "mail"
        code, text = _reply(*client.mail(sender, options))
        if not 200 <= code < 300:
            return SmtpResult(code, text, stage="mail")
        stage = "rcpt"
        refused: dict[str, tuple[int, str]] = {}
        for rcpt in recipients:
            code, text = _reply(*client.rcpt(rcpt))
            if not 200 <= code < 300:
                refused[rcpt] = (code, text)
        if len(refused) == len(recipients):
            code, text = refused[recipients[-1]] if recipients else (0, "no recipients")
            return SmtpResult(code, text, stage="rcpt", refused=refused)
        stage = "data"
        try:
            code, text = _reply(*client.data(payload))
        except smtplib.SMTPDataError as exc:  # the DATA command itself was refused
            return SmtpResult(*_reply(exc.smtp_code, exc.smtp_error), "data", refused)
        # smtplib returns the reply to the final dot instead of raising.
        final_stage: SmtpStage | None = None if 200 <= code < 300 else "data"
        return SmtpResult(code, text, stage=final_stage, refused=refused)
    except smtplib.SMTPResponseException as exc:
        return SmtpResult(*_reply(exc.smtp_code, exc.smtp_error), stage=stage)
    except (smtplib.SMTPException, OSError) as exc:
        return SmtpResult(0, f"connection failed: {exc}", stage=stage)
    finally:
        # Not "with client": its QUIT may raise after the message was accepted.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()
