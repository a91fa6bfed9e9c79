"""What a milter answers, as the MTA side reads it: replies, dispositions, negotiation.

A :class:`Reply` is one answer to one protocol step; its :class:`Disposition`
is what an MTA makes of it (a 5xx reply code counts as a reject, as libmilter
pairs them).  :class:`Negotiated` is the outcome of SMFIC_OPTNEG.  Where a
real MTA would log a milter bug and fall back to its default action, the
client raises the errors defined here, so that the bug fails the test that
provoked it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Final

import attrs

from miltermonkey_core.milter.protocol import (
    SMFIC_ABORT,
    SMFIC_BODY,
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HEADER,
    SMFIC_HELO,
    SMFIC_MACRO,
    SMFIC_MAIL,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIC_QUIT_NC,
    SMFIC_RCPT,
    SMFIC_UNKNOWN,
    SMFIP_HDR_LEADSPC,
    SMFIR_ACCEPT,
    SMFIR_ADDHEADER,
    SMFIR_ADDRCPT,
    SMFIR_ADDRCPT_PAR,
    SMFIR_CHGFROM,
    SMFIR_CHGHEADER,
    SMFIR_CONN_FAIL,
    SMFIR_CONTINUE,
    SMFIR_DELRCPT,
    SMFIR_DISCARD,
    SMFIR_INSHEADER,
    SMFIR_PROGRESS,
    SMFIR_QUARANTINE,
    SMFIR_REJECT,
    SMFIR_REPLBODY,
    SMFIR_REPLYCODE,
    SMFIR_SHUTDOWN,
    SMFIR_SKIP,
    SMFIR_TEMPFAIL,
    MilterProtocolError,
    describe_actions,
    describe_protocol,
)

__all__ = [
    "Disposition",
    "Negotiated",
    "NegotiationError",
    "PostfixIncompatibleError",
    "Reply",
    "SmtpReply",
    "Stage",
    "UnnegotiatedActionError",
]


# ==========================================================================
# Errors
# ==========================================================================


class NegotiationError(MilterProtocolError):
    """The OPTNEG reply asks for a version, actions or protocol bits we did not offer.

    libmilter itself never does this (it clips fakeable bits and aborts otherwise),
    but a hand-written milter can, and a real MTA would drop the connection.
    """


class UnnegotiatedActionError(MilterProtocolError):
    """The milter requested a modification whose SMFIF_* flag was not negotiated."""


class PostfixIncompatibleError(MilterProtocolError):
    """The milter did something libmilter allows but Postfix refuses.

    Currently: interleaving ``SMFIR_REPLBODY`` chunks with other modification
    requests (Postfix's cleanup server cannot resume a body replacement, logs
    "body replacement requests can't currently be mixed with other requests"
    and tempfails the message).  Disable with ``MilterClient(postfix_strict=False)``.
    """


# ==========================================================================
# Replies
# ==========================================================================


class Disposition(enum.Enum):
    """The fate of a message (or recipient) as decided by the milter."""

    ACCEPT = "accept"
    CONTINUE = "continue"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"


class Stage(enum.Enum):
    """Protocol step at which a reply was received (for results and messages)."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOM = "eom"
    UNKNOWN = "unknown"


_REPLY_LINE_RE: Final = re.compile(r"^([45][0-9][0-9])([ -])(.*)$", re.DOTALL)
_ENHANCED_RE: Final = re.compile(r"^([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")


@attrs.frozen
class SmtpReply:
    """An SMTP reply sent by the milter via ``smfi_setreply``/``smfi_setmlreply``.

    ``raw`` is the text exactly as received; ``text`` is what Postfix would send
    to the client: per-line texts joined with ``"\\n"``, enhanced code removed,
    and ``%%`` collapsed to ``%`` (Postfix undoes Sendmail's format-string
    doubling, see milter8.c).
    """

    code: int
    enhanced_code: str | None
    text: str
    raw: str

    @classmethod
    def parse(cls, raw: str) -> SmtpReply:
        """Validate and parse a reply the way Postfix's milter8_valid_smtp_reply does.

        Each line must match ``^[45]dd[- ]``, non-final lines use ``-`` and end in
        CRLF, and an enhanced code's class must agree with the reply code.
        """
        if not raw or "\0" in raw:
            raise MilterProtocolError(f"malformed SMFIR_REPLYCODE {raw!r}")
        lines = raw.split("\r\n")
        code: int | None = None
        enhanced: str | None = None
        texts: list[str] = []
        for number, line in enumerate(lines):
            final = number == len(lines) - 1
            match = _REPLY_LINE_RE.match(line)
            if (
                match is None
                or "\r" in line
                or "\n" in line
                or match.group(2) != (" " if final else "-")
            ):
                raise MilterProtocolError(f"malformed SMFIR_REPLYCODE {raw!r}")
            line_code, _, rest = match.groups()
            if rest[:1].isdigit() and rest[0] != line_code[0]:
                raise MilterProtocolError(
                    f"SMFIR_REPLYCODE enhanced code class differs from reply code: {raw!r}"
                )
            if code is None:
                code = int(line_code)
            ext = _ENHANCED_RE.match(rest)
            if ext is not None:
                if enhanced is None:
                    enhanced = ext.group(1)
                rest = rest[ext.end() :]
            texts.append(rest)
        assert code is not None
        return cls(
            code=code,
            enhanced_code=enhanced,
            text="\n".join(texts).replace("%%", "%"),
            raw=raw,
        )

    def __str__(self) -> str:
        return self.raw


_FINAL_CODES: Final = frozenset(
    {
        SMFIR_ACCEPT,
        SMFIR_REJECT,
        SMFIR_TEMPFAIL,
        SMFIR_DISCARD,
        SMFIR_REPLYCODE,
        SMFIR_SHUTDOWN,
        SMFIR_CONN_FAIL,
    }
)


@attrs.frozen
class Reply:
    """One answer of the milter to one protocol step.

    ``code`` is the SMFIR_* letter (``"c"``, ``"a"``, ``"r"``, ``"t"``, ``"d"``,
    ``"y"``, ``"s"`` ...); ``smtp`` is filled for ``SMFIR_REPLYCODE`` only.
    """

    code: str
    smtp: SmtpReply | None = None

    @property
    def is_final(self) -> bool:
        """True for answers that end the message (or recipient) before EOM."""
        return self.code in _FINAL_CODES

    @property
    def is_continue(self) -> bool:
        return self.code == SMFIR_CONTINUE

    @property
    def is_skip(self) -> bool:
        return self.code == SMFIR_SKIP

    @property
    def disposition(self) -> Disposition | None:
        """ACCEPT/CONTINUE/REJECT/TEMPFAIL/DISCARD; ``None`` for SKIP.

        A replycode counts as REJECT for 5xx and TEMPFAIL for 4xx, exactly the
        pairing libmilter enforces (it only sends the text with a matching code).
        SHUTDOWN and CONN_FAIL, which libmilter never sends, count as TEMPFAIL.
        """
        return (
            DISPOSITION_OF_CODE.get(self.code)
            if self.code != SMFIR_REPLYCODE
            else (
                Disposition.REJECT
                if self.smtp is not None and self.smtp.code >= 500
                else Disposition.TEMPFAIL
            )
        )

    @property
    def smtp_code(self) -> int | None:
        return None if self.smtp is None else self.smtp.code

    @property
    def text(self) -> str | None:
        return None if self.smtp is None else self.smtp.text

    def __str__(self) -> str:
        name = REPLY_NAMES.get(self.code, repr(self.code))
        return name if self.smtp is None else f"{name} {self.smtp.raw!r}"


DISPOSITION_OF_CODE: Final[Mapping[str, Disposition]] = {
    SMFIR_ACCEPT: Disposition.ACCEPT,
    SMFIR_CONTINUE: Disposition.CONTINUE,
    SMFIR_REJECT: Disposition.REJECT,
    SMFIR_TEMPFAIL: Disposition.TEMPFAIL,
    SMFIR_DISCARD: Disposition.DISCARD,
    SMFIR_SHUTDOWN: Disposition.TEMPFAIL,
    SMFIR_CONN_FAIL: Disposition.TEMPFAIL,
}

REPLY_NAMES: Final[Mapping[str, str]] = {
    SMFIR_ACCEPT: "SMFIR_ACCEPT",
    SMFIR_CONTINUE: "SMFIR_CONTINUE",
    SMFIR_REJECT: "SMFIR_REJECT",
    SMFIR_TEMPFAIL: "SMFIR_TEMPFAIL",
    SMFIR_DISCARD: "SMFIR_DISCARD",
    SMFIR_REPLYCODE: "SMFIR_REPLYCODE",
    SMFIR_SKIP: "SMFIR_SKIP",
    SMFIR_PROGRESS: "SMFIR_PROGRESS",
    SMFIR_SHUTDOWN: "SMFIR_SHUTDOWN",
    SMFIR_CONN_FAIL: "SMFIR_CONN_FAIL",
    SMFIR_ADDHEADER: "SMFIR_ADDHEADER",
    SMFIR_INSHEADER: "SMFIR_INSHEADER",
    SMFIR_CHGHEADER: "SMFIR_CHGHEADER",
    SMFIR_REPLBODY: "SMFIR_REPLBODY",
    SMFIR_ADDRCPT: "SMFIR_ADDRCPT",
    SMFIR_ADDRCPT_PAR: "SMFIR_ADDRCPT_PAR",
    SMFIR_DELRCPT: "SMFIR_DELRCPT",
    SMFIR_CHGFROM: "SMFIR_CHGFROM",
    SMFIR_QUARANTINE: "SMFIR_QUARANTINE",
}

COMMAND_NAMES: Final[Mapping[str, str]] = {
    SMFIC_ABORT: "SMFIC_ABORT",
    SMFIC_BODY: "SMFIC_BODY",
    SMFIC_CONNECT: "SMFIC_CONNECT",
    SMFIC_MACRO: "SMFIC_MACRO",
    SMFIC_BODYEOB: "SMFIC_BODYEOB",
    SMFIC_HELO: "SMFIC_HELO",
    SMFIC_QUIT_NC: "SMFIC_QUIT_NC",
    SMFIC_HEADER: "SMFIC_HEADER",
    SMFIC_MAIL: "SMFIC_MAIL",
    SMFIC_EOH: "SMFIC_EOH",
    SMFIC_OPTNEG: "SMFIC_OPTNEG",
    SMFIC_QUIT: "SMFIC_QUIT",
    SMFIC_RCPT: "SMFIC_RCPT",
    SMFIC_DATA: "SMFIC_DATA",
    SMFIC_UNKNOWN: "SMFIC_UNKNOWN",
}


# ==========================================================================
# Negotiation
# ==========================================================================


@attrs.frozen
class Negotiated:
    """Outcome of SMFIC_OPTNEG: what we offered and what the milter chose.

    ``macro_lists`` maps an SMFIM_* stage to the macro names the milter asked
    for with ``smfi_setsymlist``; for such a stage an MTA sends only those
    macros (Postfix looks each one up, whatever its main.cf list says).
    """

    version: int
    actions: int
    protocol: int
    offered_version: int
    offered_actions: int
    offered_protocol: int
    macro_lists: Mapping[int, tuple[str, ...]] = attrs.field(factory=dict)

    def has_action(self, flag: int) -> bool:
        return bool(self.actions & flag)

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol & bit)

    @property
    def action_names(self) -> list[str]:
        return describe_actions(self.actions)

    @property
    def protocol_names(self) -> list[str]:
        return describe_protocol(self.protocol)

    @property
    def header_leading_space(self) -> bool:
        return self.has_protocol(SMFIP_HDR_LEADSPC)

