"""Verdicts a brain can give, and SMTP replies that are safe to send.

A reply text often carries data from the mail (a virus name, a sender), so
everything here assumes it is hostile: CR/LF cannot start a new reply line or
header, ``%`` is doubled for the MTA's formatter, and codes are checked
against the disposition (a 5xx code on a tempfail would turn a retry into a
bounce).
"""

from __future__ import annotations

import enum
import re

import attrs

from miltermonkey_core.errors import ReplyError

#: libmilter's limits (smfi.c MAXREPLYLEN / MAXREPLIES).
MAX_REPLY_LINE = 980
MAX_REPLY_LINES = 32

_XCODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CTRL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Action(enum.Enum):
    """What should happen to the message (or, before DATA, the session)."""

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    #: The brain is done: do not call it again for this message (or, when
    #: returned from ``connect``/``helo``, for this session).  Not a verdict on mail.
    SKIP = "skip"

    @property
    def final(self) -> bool:
        """Final verdicts stop the brain chain; the first one wins."""
        return self in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD)


def sanitize_reply_text(text: str) -> list[str]:
    """Turn untrusted text into reply lines an MTA takes verbatim.

    Control characters (including CR and LF) become spaces, so mail data can
    never inject a reply line; explicit multi-line replies are passed as a
    list of lines instead.  ``%`` is doubled: Sendmail uses a milter's reply
    as a format string, and Postfix, for the same reason, turns ``%%`` back
    into ``%`` and drops a lone one.
    """
    clean = _CTRL.sub(" ", text).replace("\t", " ").strip()
    clean = clean.replace("%", "%%")
    if not clean:
        clean = "Message refused"
    return [clean[i : i + MAX_REPLY_LINE] for i in range(0, len(clean), MAX_REPLY_LINE)]


@attrs.frozen
class Reply:
    """An SMTP reply: ``code`` (4xx/5xx), enhanced ``xcode`` and text lines."""

    code: int
    xcode: str
    lines: tuple[str, ...]

    @classmethod
    def build(cls, code: int, xcode: str | None, text: str | list[str]) -> Reply:
        if not 400 <= code <= 599:
            raise ReplyError(f"SMTP reply code {code} is not 4xx or 5xx")
        if xcode is None:
            xcode = f"{code // 100}.7.1"
        if not _XCODE.match(xcode):
            raise ReplyError(f"enhanced status code {xcode!r} is not of the form X.Y.Z")
        if xcode[0] != str(code)[0]:
            raise ReplyError(f"enhanced code {xcode} does not match SMTP code {code}")
        raw_lines = [text] if isinstance(text, str) else list(text)
        lines: list[str] = []
        for line in raw_lines:
            lines.extend(sanitize_reply_text(line))
        if len(lines) > MAX_REPLY_LINES:
            lines = [*lines[:MAX_REPLY_LINES - 1], "(reply truncated)"]
        return cls(code=code, xcode=xcode, lines=tuple(lines))

    @property
    def text(self) -> str:
        """The reply as one string, un-doubling ``%``, for logs and tests."""
        return " / ".join(line.replace("%%", "%") for line in self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.xcode} {self.text}"


@attrs.frozen
class Verdict:
    """A brain's decision.  Build one with the class methods."""

    action: Action
    reply: Reply | None = None
    reason: str = ""
    brain: str | None = None

    @property
    def final(self) -> bool:
        return self.action.final

    @classmethod
    def continue_(cls) -> Verdict:
        return cls(Action.CONTINUE)

    @classmethod
    def skip(cls, reason: str = "") -> Verdict:
        return cls(Action.SKIP, reason=reason)

    @classmethod
    def accept(cls, reason: str = "") -> Verdict:
        return cls(Action.ACCEPT, reason=reason)

    @classmethod
    def discard(cls, reason: str = "") -> Verdict:
        return cls(Action.DISCARD, reason=reason)

    @classmethod
    def reject(
        cls,
        code: int = 550,
        xcode: str | None = "5.7.1",
        text: str | list[str] = "Message refused",
        reason: str = "",
    ) -> Verdict:
        if code // 100 != 5:
            raise ReplyError(f"reject needs a 5xx code, got {code}")
        return cls(Action.REJECT, Reply.build(code, xcode, text), reason=reason)

    @classmethod
    def tempfail(
        cls,
        code: int = 451,
        xcode: str | None = "4.7.1",
        text: str | list[str] = "Try again later",
        reason: str = "",
    ) -> Verdict:
        if code // 100 != 4:
            raise ReplyError(f"tempfail needs a 4xx code, got {code}")
        return cls(Action.TEMPFAIL, Reply.build(code, xcode, text), reason=reason)

    def by(self, brain: str) -> Verdict:
        """The same verdict, signed with the brain that gave it (for logs and the key)."""
        return attrs.evolve(self, brain=brain)

    def describe(self) -> str:
        parts = [self.action.value]
        if self.reply:
            parts.append(str(self.reply))
        if self.reason:
            parts.append(f"({self.reason})")
        return " ".join(parts)
