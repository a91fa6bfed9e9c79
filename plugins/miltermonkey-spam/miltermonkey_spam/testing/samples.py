"""Test mail for the spam brain: GTUBE, which SpamAssassin always flags, and plain ham."""

from __future__ import annotations

import email.utils
import zlib

__all__ = ["GTUBE", "ham", "spam"]

#: SpamAssassin's GTUBE test string; Debian's shipped rules score it 1000.
GTUBE: bytes = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def spam(subject: str = "buy now", extra_headers: str = "", body: bytes = b"") -> bytes:
    """A message carrying GTUBE: Debian's shipped rules score it 1000."""
    return (f"From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{zlib.crc32(subject.encode()):08x}.gtube@example.com>\r\n{extra_headers}"
            "\r\n").encode() + b"Hello,\r\n" + GTUBE + b"\r\n" + body


def ham(subject: str = "lunch", extra_headers: str = "", body: bytes = b"") -> bytes:
    """A plain, short personal message: scores well below 5."""
    return (f"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{zlib.crc32(subject.encode()):08x}.ham@example.com>\r\n{extra_headers}"
            "\r\n").encode() + (body or b"Shall we have lunch tomorrow at noon?\r\n\r\nBob\r\n")
