"""A pure-Python MTA side of the milter protocol (version 6), for tests.

Why this exists: a brain (or the whole MilterMonkey milter) is only really
tested when it is driven over a real socket by something that behaves like
Postfix: same packet order, same macros, same handling of the negotiated
"no reply"/"no step" bits, same interpretation of the end-of-message edits.
Spinning up Postfix in every unit test is too slow and too fragile, and the
GPL'd ``miltertest`` package cannot be a dependency, so this module is our
own, small, strict implementation.

Strictness is the point.  Where a real MTA would log a milter bug and fall
back to its default action, this client raises (:class:`MilterProtocolError`
and subclasses) so that the bug fails the test that provoked it.

Layers, from low to high:

* :class:`MilterClient` step methods (``connect``, ``helo``, ``mail`` ...)
  send exactly one protocol step each, honouring the negotiated
  ``SMFIP_NO*`` (skip the step) and ``SMFIP_NR_*`` (do not wait for a reply)
  bits, and return the milter's :class:`Reply` (or ``None``).
* :meth:`MilterClient.eom` collects every modification request into an
  :class:`EomResult`, whose :meth:`EomResult.apply` replays them the way
  Postfix's cleanup server edits the queue file.
* :meth:`MilterClient.send_message` runs one whole SMTP transaction the way
  Postfix's smtpd + cleanup do (macros included) and returns a
  :class:`SessionResult`; :func:`run_session` wraps connect, negotiate,
  several messages and quit.

How header values travel (this mirrors Postfix ``milter8.c``, which in turn
mirrors Sendmail 8):

* The value is the text after the colon.  Unless ``SMFIP_HDR_LEADSPC`` was
  negotiated, exactly one leading *space* (not tab) is removed; with it, the
  value is sent as-is, leading whitespace included.
* Folded headers are **not** unfolded: continuation lines are joined with a
  bare ``"\\n"`` (LF, never CRLF) and keep their leading whitespace, e.g.
  ``"first part\\n\\tsecond part"``.
* The body is sent with CRLF line endings in chunks of at most 65535 bytes
  (``MILTER_CHUNK_SIZE``), packed across line boundaries like Postfix does.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeAlias

import attrs

from miltermonkey_core.testing.milterproto import (
    ALL_V6_ACTIONS,
    ALL_V6_PROTOCOL_BITS,
    MACRO_STAGE_COMMANDS,
    MILTER_CHUNK_SIZE,
    SMFI_PROT_VERSION,
    SMFI_V1_ACTS,
    SMFI_V1_PROT,
    SMFIA_INET,
    SMFIA_INET6,
    SMFIA_UNIX,
    SMFIA_UNKNOWN,
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
    SMFIF_ADDHDRS,
    SMFIF_ADDRCPT,
    SMFIF_ADDRCPT_PAR,
    SMFIF_CHGBODY,
    SMFIF_CHGFROM,
    SMFIF_CHGHDRS,
    SMFIF_DELRCPT,
    SMFIF_QUARANTINE,
    SMFIM_CONNECT,
    SMFIM_DATA,
    SMFIM_ENVFROM,
    SMFIM_ENVRCPT,
    SMFIM_EOH,
    SMFIM_EOM,
    SMFIM_HELO,
    SMFIP_HDR_LEADSPC,
    SMFIP_SKIP,
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
    STEP_FLAGS,
    FramingError,
    MilterProtocolError,
    describe_actions,
    describe_protocol,
    encode_macros,
    encode_strings,
    read_packet,
    send_packet,
    split_nul_strings,
)

__all__ = [
    "ALL_V6_ACTIONS",
    "ALL_V6_PROTOCOL_BITS",
    "AddHeader",
    "AddRecipient",
    "AddRecipientPar",
    "AppliedMessage",
    "ChangeFrom",
    "ChangeHeader",
    "ConnectInfo",
    "DeleteRecipient",
    "Disposition",
    "EomAction",
    "EomResult",
    "FramingError",
    "InsertHeader",
    "MessageSpec",
    "MilterAddress",
    "MilterClient",
    "MilterProtocolError",
    "Negotiated",
    "NegotiationError",
    "ParsedMessage",
    "PostfixIncompatibleError",
    "Quarantine",
    "ReplaceBody",
    "Reply",
    "SessionResult",
    "SmtpReply",
    "Stage",
    "UnnegotiatedActionError",
    "parse_message",
    "run_session",
]

#: Where to reach a milter: ``("127.0.0.1", port)``, a UNIX socket path, or a
#: libmilter/Postfix style spec string (``"inet:PORT@HOST"``, ``"inet6:PORT@HOST"``,
#: ``"unix:/path"``, ``"local:/path"``).
MilterAddress: TypeAlias = "tuple[str, int] | str | os.PathLike[str]"

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_HELO: Final = "client.example.test"
DEFAULT_MTA_HOSTNAME: Final = "mx.example.test"
#: What Postfix puts in the ``v`` macro (``$mail_name $mail_version``).
DEFAULT_MTA_VERSION: Final = "Postfix 3.7.0"


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
            _DISPOSITION_OF_CODE.get(self.code)
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
        name = _REPLY_NAMES.get(self.code, repr(self.code))
        return name if self.smtp is None else f"{name} {self.smtp.raw!r}"


_DISPOSITION_OF_CODE: Final[Mapping[str, Disposition]] = {
    SMFIR_ACCEPT: Disposition.ACCEPT,
    SMFIR_CONTINUE: Disposition.CONTINUE,
    SMFIR_REJECT: Disposition.REJECT,
    SMFIR_TEMPFAIL: Disposition.TEMPFAIL,
    SMFIR_DISCARD: Disposition.DISCARD,
    SMFIR_SHUTDOWN: Disposition.TEMPFAIL,
    SMFIR_CONN_FAIL: Disposition.TEMPFAIL,
}

_REPLY_NAMES: Final[Mapping[str, str]] = {
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

_COMMAND_NAMES: Final[Mapping[str, str]] = {
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


# ==========================================================================
# EOM actions and their application
# ==========================================================================


@attrs.frozen
class AddHeader:
    """SMFIR_ADDHEADER: append a header at the end of the headers."""

    name: str
    value: str


@attrs.frozen
class InsertHeader:
    """SMFIR_INSHEADER: insert a header before the header at ``index`` (0 = top)."""

    index: int
    name: str
    value: str


@attrs.frozen
class ChangeHeader:
    """SMFIR_CHGHEADER: replace the ``index``-th header called ``name`` (1-based).

    An empty value means delete.  Index 0 is treated as 1 (Sendmail compatibility).
    """

    index: int
    name: str
    value: str

    @property
    def is_delete(self) -> bool:
        return self.value == ""


@attrs.frozen
class ReplaceBody:
    """SMFIR_REPLBODY: one chunk of the new body (the chunks concatenate)."""

    chunk: bytes


@attrs.frozen
class AddRecipient:
    """SMFIR_ADDRCPT: add an envelope recipient."""

    recipient: str


@attrs.frozen
class AddRecipientPar:
    """SMFIR_ADDRCPT_PAR: add an envelope recipient with ESMTP arguments."""

    recipient: str
    esmtp_args: str


@attrs.frozen
class DeleteRecipient:
    """SMFIR_DELRCPT: remove an envelope recipient (all its occurrences)."""

    recipient: str


@attrs.frozen
class ChangeFrom:
    """SMFIR_CHGFROM: replace the envelope sender (ESMTP args may be empty)."""

    sender: str
    esmtp_args: str


@attrs.frozen
class Quarantine:
    """SMFIR_QUARANTINE: put the message on hold with a reason."""

    reason: str


EomAction: TypeAlias = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | ReplaceBody
    | AddRecipient
    | AddRecipientPar
    | DeleteRecipient
    | ChangeFrom
    | Quarantine
)


def _bare_address(address: str) -> str:
    """``<a@b>`` -> ``a@b``: Postfix compares internalized addresses for delrcpt."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


@attrs.frozen
class AppliedMessage:
    """The message after the milter's EOM edits, as Postfix would queue it.

    ``headers`` use the milter's representation of values (see the module
    docstring): no leading space unless ``header_leading_space``, folded lines
    joined with ``"\\n"``.  ``body`` is CRLF text, as it went over the wire.
    """

    headers: list[tuple[str, str]]
    body: bytes
    sender: str
    sender_esmtp_args: str
    recipients: list[str]
    quarantine_reason: str | None
    header_leading_space: bool = False

    def header_values(self, name: str) -> list[str]:
        """All values of headers called ``name`` (case-insensitive), in order."""
        lname = name.lower()
        return [value for hname, value in self.headers if hname.lower() == lname]

    def as_bytes(self) -> bytes:
        """Render RFC 5322 bytes (CRLF) the way Postfix writes edited headers.

        Postfix stores ``name + ":" + (" " unless HDR_LEADSPC) + value`` and turns
        the ``"\\n"`` of folded values into line breaks.
        """
        sep = "" if self.header_leading_space else " "
        out = bytearray()
        for name, value in self.headers:
            line = f"{name}:{sep}{value}".replace("\r\n", "\n").replace("\n", "\r\n")
            out += line.encode("utf-8", "surrogateescape") + b"\r\n"
        out += b"\r\n"
        out += self.body
        return bytes(out)


@attrs.define
class _HeaderEntry:
    name: str
    value: str
    hidden: bool = False


@attrs.frozen
class EomResult:
    """Everything the milter said in reply to SMFIC_BODYEOB.

    ``actions`` keeps the order of the modification requests because the
    header edits depend on it (each one sees the effect of the previous ones).
    ``final`` is the raw final :class:`Reply`.
    """

    disposition: Disposition
    reply: SmtpReply | None
    actions: list[EomAction]
    progress_count: int
    quarantine_reason: str | None
    final: Reply
    header_leading_space: bool = False

    def actions_of(self, kind: type[EomAction]) -> list[EomAction]:
        """The actions of one type, e.g. ``result.actions_of(AddHeader)``."""
        return [action for action in self.actions if isinstance(action, kind)]

    @property
    def replaced_body(self) -> bytes | None:
        """Concatenated SMFIR_REPLBODY chunks, or ``None`` if the body was kept."""
        chunks = [a.chunk for a in self.actions if isinstance(a, ReplaceBody)]
        return b"".join(chunks) if chunks else None

    def apply(
        self,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        sender: str,
        recipients: Sequence[str],
        *,
        mta_headers: Sequence[tuple[str, str]] = (),
    ) -> AppliedMessage:
        """Replay the edits like Postfix's cleanup server (cleanup_milter.c).

        ``headers`` is the header list the milter saw.  The header list is live:

        * ``ChangeHeader(index=N)`` targets the N-th header with that name
          (case-insensitive) in the *current* list: headers deleted earlier no
          longer count, headers added or inserted earlier in this EOM do.  Index 0
          means 1.  If there is no such header a change appends a new header and a
          delete does nothing.
        * ``InsertHeader(index=N)`` inserts before the header at position N of
          the current list (0 = top); past the end it appends.
        * ``AddHeader`` appends.
        * Body: replaced by the concatenation of all REPLBODY chunks, if any.
        * Recipients: ADDRCPT(_PAR) appends, DELRCPT removes every recipient whose
          address (without ``<>``) matches.  CHGFROM replaces the sender.

        ``mta_headers`` are headers the MTA put on top that the milter never saw
        (Postfix's own ``Received:``).  They are hidden from name lookups but do
        count as positions for inserts - which is why, with Postfix, ``insheader``
        index 0 lands *above* Postfix's Received header and index 1 just below it.
        They are returned as part of ``headers``.
        """
        entries = [_HeaderEntry(n, v, hidden=True) for n, v in mta_headers]
        entries += [_HeaderEntry(n, v) for n, v in headers]
        new_body: list[bytes] | None = None
        new_sender = sender
        sender_args = ""
        rcpts = list(recipients)
        reason = self.quarantine_reason

        for action in self.actions:
            if isinstance(action, AddHeader):
                entries.append(_HeaderEntry(action.name, action.value))
            elif isinstance(action, InsertHeader):
                position = min(max(action.index, 0), len(entries))
                entries.insert(position, _HeaderEntry(action.name, action.value))
            elif isinstance(action, ChangeHeader):
                self._change_header(entries, action)
            elif isinstance(action, ReplaceBody):
                if new_body is None:
                    new_body = []
                new_body.append(action.chunk)
            elif isinstance(action, AddRecipient | AddRecipientPar):
                rcpts.append(action.recipient)
            elif isinstance(action, DeleteRecipient):
                target = _bare_address(action.recipient)
                rcpts = [r for r in rcpts if _bare_address(r) != target]
            elif isinstance(action, ChangeFrom):
                new_sender = action.sender
                sender_args = action.esmtp_args
            else:
                reason = action.reason

        return AppliedMessage(
            headers=[(e.name, e.value) for e in entries],
            body=body if new_body is None else b"".join(new_body),
            sender=new_sender,
            sender_esmtp_args=sender_args,
            recipients=rcpts,
            quarantine_reason=reason,
            header_leading_space=self.header_leading_space,
        )

    @staticmethod
    def _change_header(entries: list[_HeaderEntry], action: ChangeHeader) -> None:
        wanted = max(action.index, 1)
        lname = action.name.lower()
        for position, entry in enumerate(entries):
            if entry.hidden or entry.name.lower() != lname:
                continue
            wanted -= 1
            if wanted == 0:
                if action.is_delete:
                    del entries[position]
                else:
                    # Postfix rewrites the whole header, so the name takes the
                    # milter's spelling too.
                    entries[position] = _HeaderEntry(action.name, action.value)
                return
        if not action.is_delete:
            entries.append(_HeaderEntry(action.name, action.value))


# ==========================================================================
# Message parsing
# ==========================================================================

_HEADER_NAME_RE: Final = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@attrs.frozen
class ParsedMessage:
    """A raw message split the way Postfix's MIME state machine splits it.

    ``raw_headers`` keeps each value exactly as after the colon (leading
    whitespace included, folded lines joined by ``"\\n"``); :meth:`milter_headers`
    gives what goes on the wire for a given HDR_LEADSPC setting.  ``body`` is the
    body with CRLF line endings, always ending in CRLF when non-empty (an SMTP
    client cannot send anything else).
    """

    raw_headers: list[tuple[str, str]]
    body: bytes

    def milter_headers(self, leading_space: bool) -> list[tuple[str, str]]:
        """Header values as a milter sees them (one leading space eaten unless LEADSPC)."""
        if leading_space:
            return list(self.raw_headers)
        return [(name, value.removeprefix(" ")) for name, value in self.raw_headers]


def parse_message(raw: bytes | str) -> ParsedMessage:
    """Split ``raw`` into headers and body without the ``email`` package.

    Why not ``email``: it re-folds, normalises and decodes, and we need the
    bytes Postfix would forward.  Rules (Postfix mime_state with MIME disabled):
    the header section ends at the first empty line (which is not part of the
    body) or at the first line that is neither a header nor a continuation line
    (which *is* the first body line).  LF and CRLF input are both accepted.
    """
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [line.removesuffix(b"\r") for line in lines]

    headers: list[list[bytes]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line == b"":
            index += 1
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += b"\n" + line
            index += 1
            continue
        match = _HEADER_NAME_RE.match(line)
        if match is None:
            break
        headers.append([match.group(1), line[match.end() :]])
        index += 1

    body = b"".join(line + b"\r\n" for line in lines[index:])
    return ParsedMessage(
        raw_headers=[(_decode(name), _decode(value)) for name, value in headers],
        body=body,
    )


# ==========================================================================
# Session results
# ==========================================================================


@attrs.frozen
class ConnectInfo:
    """What the MTA knows about the SMTP client (SMFIC_CONNECT + connect macros).

    ``family`` defaults from ``address``: SMFIA_INET6 if it contains ``:``,
    otherwise SMFIA_INET.  A ``hostname`` of ``"unknown"`` is sent as
    ``"[address]"``, as Postfix does for clients without a verified PTR name.
    """

    hostname: str = "client.example.test"
    address: str = "192.0.2.10"
    port: int = 40000
    family: str | None = None

    @property
    def smfia_family(self) -> str:
        if self.family is not None:
            return self.family
        return SMFIA_INET6 if ":" in self.address else SMFIA_INET

    @property
    def milter_hostname(self) -> str:
        if self.hostname == "unknown" and self.address != "unknown":
            return f"[{self.address}]"
        return self.hostname


@attrs.frozen
class MessageSpec:
    """One message for :func:`run_session`."""

    raw: bytes | str
    sender: str
    recipients: Sequence[str]
    macros: Mapping[str, Mapping[str, str]] | None = None
    mail_args: Sequence[str] = ()
    rcpt_args: Sequence[str] = ()
    #: Postfix's queue id for the message (macro ``i``); random when None.
    queue_id: str | None = None


@attrs.define
class SessionResult:
    """What happened to one message sent with :meth:`MilterClient.send_message`.

    ``disposition``/``reply``/``decided_at`` give the overall outcome; the
    per-step replies and the full ordered ``replies`` log are there for tests
    that care about the details.  ``applied`` is the message as it would be
    queued (edits applied) when the outcome is ACCEPT or CONTINUE, else None.

    Recipient rejection is per recipient (as in SMTP): a rejected RCPT drops
    that recipient only.  If no recipient survives, the message fails with
    REJECT (TEMPFAIL if any of them was tempfailed) at stage RCPT.
    """

    sender: str
    recipients: list[str]
    headers: list[tuple[str, str]]
    body: bytes
    negotiated: Negotiated
    queue_id: str
    disposition: Disposition = Disposition.CONTINUE
    decided_at: Stage | None = None
    reply: SmtpReply | None = None
    replies: list[tuple[Stage, Reply]] = attrs.field(factory=list)
    connect_reply: Reply | None = None
    helo_reply: Reply | None = None
    mail_reply: Reply | None = None
    rcpt_replies: dict[str, Reply | None] = attrs.field(factory=dict)
    accepted_recipients: list[str] = attrs.field(factory=list)
    rejected_recipients: dict[str, Reply] = attrs.field(factory=dict)
    data_reply: Reply | None = None
    eoh_reply: Reply | None = None
    eom: EomResult | None = None
    applied: AppliedMessage | None = None

    @property
    def accepted(self) -> bool:
        """True if the message would be queued (possibly edited or quarantined)."""
        return self.disposition in (Disposition.ACCEPT, Disposition.CONTINUE)

    @property
    def rejected(self) -> bool:
        return self.disposition is Disposition.REJECT

    @property
    def tempfailed(self) -> bool:
        return self.disposition is Disposition.TEMPFAIL

    @property
    def discarded(self) -> bool:
        return self.disposition is Disposition.DISCARD


# ==========================================================================
# The client
# ==========================================================================

_STAGE_MACRO_INDEX: Final[Mapping[str, int]] = {
    SMFIC_CONNECT: SMFIM_CONNECT,
    SMFIC_HELO: SMFIM_HELO,
    SMFIC_MAIL: SMFIM_ENVFROM,
    SMFIC_RCPT: SMFIM_ENVRCPT,
    SMFIC_DATA: SMFIM_DATA,
    SMFIC_HEADER: SMFIM_EOH,  # Postfix sends the end-of-header macros with each header
    SMFIC_EOH: SMFIM_EOH,
    SMFIC_BODY: SMFIM_EOM,  # ... and the end-of-data macros with each body chunk
    SMFIC_BODYEOB: SMFIM_EOM,
}

_STAGE_NAMES: Final[Mapping[str, str]] = {
    "connect": SMFIC_CONNECT,
    "helo": SMFIC_HELO,
    "mail": SMFIC_MAIL,
    "envfrom": SMFIC_MAIL,
    "rcpt": SMFIC_RCPT,
    "envrcpt": SMFIC_RCPT,
    "data": SMFIC_DATA,
    "eoh": SMFIC_EOH,
    "eom": SMFIC_BODYEOB,
    "unknown": SMFIC_UNKNOWN,
}

_EOM_ACTION_FLAGS: Final[Mapping[str, int]] = {
    SMFIR_ADDHEADER: SMFIF_ADDHDRS,
    SMFIR_INSHEADER: SMFIF_ADDHDRS,
    SMFIR_CHGHEADER: SMFIF_CHGHDRS,
    SMFIR_REPLBODY: SMFIF_CHGBODY,
    SMFIR_ADDRCPT: SMFIF_ADDRCPT,
    SMFIR_ADDRCPT_PAR: SMFIF_ADDRCPT_PAR,
    SMFIR_DELRCPT: SMFIF_DELRCPT,
    SMFIR_CHGFROM: SMFIF_CHGFROM,
    SMFIR_QUARANTINE: SMFIF_QUARANTINE,
}

_INDEX = struct.Struct("!I")
_PORT = struct.Struct("!H")


def _macro_name_variants(name: str) -> tuple[str, ...]:
    """``i`` and ``{i}`` name the same macro (Postfix canonicalises both ways)."""
    if name.startswith("{") and name.endswith("}"):
        return (name, name[1:-1])
    return (name, "{" + name + "}")


def _open_socket(address: MilterAddress, timeout: float) -> socket.socket:
    """Connect to ``address``; why a helper: it accepts the libmilter spec strings too."""
    if isinstance(address, tuple):
        host, port = address
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    spec = os.fspath(address)
    for prefix in ("inet:", "inet6:"):
        if spec.startswith(prefix):
            port_text, _, host = spec[len(prefix) :].partition("@")
            return _open_socket((host or "127.0.0.1", int(port_text)), timeout)
    for prefix in ("unix:", "local:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix) :]
            break
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(spec)
    except BaseException:
        sock.close()
        raise
    return sock


class MilterClient:
    """The MTA end of one milter connection.

    Usage::

        with MilterClient(("127.0.0.1", port)) as client:
            client.negotiate()
            result = client.send_message(raw, "<a@example.org>", ["<b@example.net>"])
            client.quit()

    Every blocking read uses ``timeout`` (seconds), so a milter that does not
    answer fails the test with :class:`TimeoutError` instead of hanging it.

    ``transcript`` records ``(">" | "<", command, data length)`` for every packet
    (``>`` = sent by us), which is the quickest way to see what happened.
    ``progress_count`` counts every SMFIR_PROGRESS seen on this connection.
    """

    def __init__(
        self,
        address: MilterAddress | None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        postfix_strict: bool = True,
        mta_hostname: str = DEFAULT_MTA_HOSTNAME,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.postfix_strict = postfix_strict
        self.mta_hostname = mta_hostname
        self.negotiated: Negotiated | None = None
        self.transcript: list[tuple[str, str, int]] = []
        self.progress_count = 0
        self._sock: socket.socket | None = (
            _open_socket(address, timeout) if address is not None else None
        )
        # Connection-level state used by send_message.
        self._connect_sent = False
        self._helo_sent = False
        self._connection_decision: tuple[Stage, Reply] | None = None
        self._connection_macros: dict[str, str] = {}

    # ------------------------------------------------------------------ plumbing

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        postfix_strict: bool = True,
        mta_hostname: str = DEFAULT_MTA_HOSTNAME,
    ) -> MilterClient:
        """Wrap an already connected socket (e.g. one end of ``socket.socketpair()``).

        For in-process milters and for testing this client against scripted
        peers; the client takes ownership and closes it.
        """
        client = cls(None, timeout, postfix_strict=postfix_strict, mta_hostname=mta_hostname)
        sock.settimeout(timeout)
        client._sock = sock
        return client

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket without saying goodbye (as Postfix does after errors)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise MilterProtocolError("the milter connection is closed")
        return self._sock

    def _send(self, cmd: str, data: bytes = b"") -> None:
        send_packet(self._socket(), cmd, data)
        self.transcript.append((">", cmd, len(data)))

    def _recv(self) -> tuple[str, bytes]:
        cmd, data = read_packet(self._socket())
        self.transcript.append(("<", cmd, len(data)))
        return cmd, data

    def _require_negotiated(self) -> Negotiated:
        if self.negotiated is None:
            raise MilterProtocolError("call negotiate() before any other protocol step")
        return self.negotiated

    # ------------------------------------------------------------------ negotiation

    def negotiate(
        self,
        actions: int = ALL_V6_ACTIONS,
        protocol: int = ALL_V6_PROTOCOL_BITS,
        version: int = SMFI_PROT_VERSION,
    ) -> Negotiated:
        """Send SMFIC_OPTNEG offering ``actions``/``protocol`` and parse the reply.

        The defaults offer everything protocol version 6 defines, which is what
        Postfix (``milter_protocol = 6``) offers too.  An offer of 0 means the
        version 1 defaults (SMFI_V1_ACTS / SMFI_V1_PROT), as libmilter reads it.
        The milter's reply must be a subset of the offer: otherwise
        :class:`NegotiationError`, because an MTA could not honour it.  The
        optional tail of the reply (setsymlist) is parsed into
        :attr:`Negotiated.macro_lists`.
        """
        if self.negotiated is not None:
            raise MilterProtocolError("negotiate() may only be called once per connection")
        self._send(
            SMFIC_OPTNEG, _INDEX.pack(version) + _INDEX.pack(actions) + _INDEX.pack(protocol)
        )
        cmd, data = self._recv()
        if cmd != SMFIC_OPTNEG:
            raise NegotiationError(f"expected an SMFIC_OPTNEG reply, got {cmd!r}")
        if len(data) < 12:
            raise NegotiationError(f"SMFIC_OPTNEG reply too short ({len(data)} bytes)")
        m_version, m_actions, m_protocol = struct.unpack("!III", data[:12])
        # libmilter reads an offer of 0 as "protocol version 1 defaults"
        # (st_optionneg), so that is what the milter may legitimately pick from.
        effective_actions = actions or SMFI_V1_ACTS
        effective_protocol = protocol or SMFI_V1_PROT
        if m_version > version or m_version < 2:
            raise NegotiationError(
                f"milter answered protocol version {m_version}, we offered {version}"
            )
        extra_actions = m_actions & ~effective_actions
        if extra_actions:
            raise NegotiationError(
                "milter requested actions that were not offered: "
                + ", ".join(describe_actions(extra_actions))
            )
        extra_protocol = m_protocol & ~effective_protocol
        if extra_protocol:
            raise NegotiationError(
                "milter requested protocol bits that were not offered: "
                + ", ".join(describe_protocol(extra_protocol))
            )
        self.negotiated = Negotiated(
            version=m_version,
            actions=m_actions,
            protocol=m_protocol,
            offered_version=version,
            offered_actions=actions,
            offered_protocol=protocol,
            macro_lists=self._parse_symlists(data[12:]),
        )
        return self.negotiated

    @staticmethod
    def _parse_symlists(tail: bytes) -> dict[int, tuple[str, ...]]:
        lists: dict[int, tuple[str, ...]] = {}
        offset = 0
        while offset < len(tail):
            if offset + 4 > len(tail):
                raise NegotiationError("truncated macro list in SMFIC_OPTNEG reply")
            (stage,) = _INDEX.unpack_from(tail, offset)
            offset += 4
            end = tail.find(b"\0", offset)
            if end < 0:
                raise NegotiationError("unterminated macro list in SMFIC_OPTNEG reply")
            if stage not in MACRO_STAGE_COMMANDS:
                raise NegotiationError(f"unknown macro stage {stage} in SMFIC_OPTNEG reply")
            names = _decode(tail[offset:end]).replace(",", " ").split()
            lists[stage] = tuple(names)
            offset = end + 1
        return lists

    # ------------------------------------------------------------------ reply reading

    def _read_reply(self, cmd: str) -> Reply:
        """Read the answer to a non-EOM step; SMFIR_PROGRESS is counted and skipped."""
        while True:
            rcmd, data = self._recv()
            if rcmd == SMFIR_PROGRESS:
                self._expect_empty(rcmd, data)
                self.progress_count += 1
                continue
            if rcmd == SMFIR_REPLYCODE:
                return Reply(rcmd, SmtpReply.parse(_decode(data.rstrip(b"\0"))))
            if rcmd in _DISPOSITION_OF_CODE:
                self._expect_empty(rcmd, data)
                return Reply(rcmd)
            if rcmd == SMFIR_SKIP:
                self._expect_empty(rcmd, data)
                if not self._require_negotiated().has_protocol(SMFIP_SKIP):
                    raise MilterProtocolError(
                        f"milter sent SMFIR_SKIP after {_COMMAND_NAMES[cmd]} "
                        "but SMFIP_SKIP was not negotiated"
                    )
                return Reply(rcmd)
            raise MilterProtocolError(
                f"unexpected {_REPLY_NAMES.get(rcmd, repr(rcmd))} in reply to "
                f"{_COMMAND_NAMES.get(cmd, repr(cmd))}"
                + (
                    " (modifications are only allowed at end of message)"
                    if rcmd in _EOM_ACTION_FLAGS
                    else ""
                )
            )

    @staticmethod
    def _expect_empty(rcmd: str, data: bytes) -> None:
        if data:
            raise MilterProtocolError(
                f"{_REPLY_NAMES.get(rcmd, repr(rcmd))} carried {len(data)} unexpected bytes"
            )

    def _step(self, cmd: str, data: bytes = b"") -> Reply | None:
        """Send one step unless SMFIP_NO* says skip; wait for a reply unless SMFIP_NR_*."""
        negotiated = self._require_negotiated()
        no_bit, nr_bit = STEP_FLAGS[cmd]
        if negotiated.protocol & no_bit:
            return None
        self._send(cmd, data)
        if negotiated.protocol & nr_bit:
            return None
        return self._read_reply(cmd)

    def step_skipped(self, cmd: str) -> bool:
        """True if the negotiated SMFIP_NO* bit makes the MTA skip step ``cmd``."""
        return bool(self._require_negotiated().protocol & STEP_FLAGS[cmd][0])

    def step_unanswered(self, cmd: str) -> bool:
        """True if the negotiated SMFIP_NR_* bit means no reply is read for ``cmd``."""
        return bool(self._require_negotiated().protocol & STEP_FLAGS[cmd][1])

    # ------------------------------------------------------------------ steps

    def macros(
        self,
        stage_cmd: str,
        mapping: Mapping[str, str] | None = None,
        /,
        **macros: str,
    ) -> None:
        """SMFIC_MACRO: define macros for the step ``stage_cmd`` (e.g. SMFIC_CONNECT).

        Names with braces do not fit in keyword arguments, hence the optional
        positional mapping: ``client.macros(SMFIC_CONNECT, {"{daemon_name}": "mx"})``.
        Never answered; sent even when the step itself is skipped (like Postfix).
        """
        self._require_negotiated()
        merged = dict(mapping or {})
        merged.update(macros)
        self._send(SMFIC_MACRO, encode_macros(stage_cmd, merged))

    def connect(
        self, hostname: str, family: str = SMFIA_INET, port: int = 0, address: str = ""
    ) -> Reply | None:
        """SMFIC_CONNECT: client ``hostname``, SMFIA_* ``family``, ``port``, ``address``."""
        data = encode_strings(hostname) + family.encode("ascii")
        if family != SMFIA_UNKNOWN:
            if family == SMFIA_UNIX:
                port = 0
            data += _PORT.pack(port) + encode_strings(address)
        return self._step(SMFIC_CONNECT, data)

    def helo(self, name: str) -> Reply | None:
        """SMFIC_HELO with the HELO/EHLO argument."""
        return self._step(SMFIC_HELO, encode_strings(name))

    def mail(self, sender: str, *esmtp_args: str) -> Reply | None:
        """SMFIC_MAIL: sender as in ``MAIL FROM:`` (with ``<>``), then ESMTP args."""
        return self._step(SMFIC_MAIL, encode_strings(sender, *esmtp_args))

    def rcpt(self, recipient: str, *esmtp_args: str) -> Reply | None:
        """SMFIC_RCPT: recipient as in ``RCPT TO:`` (with ``<>``), then ESMTP args."""
        return self._step(SMFIC_RCPT, encode_strings(recipient, *esmtp_args))

    def data(self) -> Reply | None:
        """SMFIC_DATA (the SMTP DATA command, before any content)."""
        return self._step(SMFIC_DATA)

    def header(self, name: str, value: str) -> Reply | None:
        """SMFIC_HEADER.  ``value`` is the text after the colon as in the message.

        Like Postfix: unless SMFIP_HDR_LEADSPC was negotiated, one leading space
        is removed; with it, the value goes out as-is.  So ``header("Subject",
        " hi")`` and ``header("Subject", "hi")`` both send ``hi`` by default.
        """
        if not self._require_negotiated().header_leading_space:
            value = value.removeprefix(" ")
        return self._step(SMFIC_HEADER, encode_strings(name, value))

    def eoh(self) -> Reply | None:
        """SMFIC_EOH (end of headers)."""
        return self._step(SMFIC_EOH)

    def body(self, chunk: bytes) -> Reply | None:
        """SMFIC_BODY with one chunk of at most MILTER_CHUNK_SIZE (65535) bytes."""
        if len(chunk) > MILTER_CHUNK_SIZE:
            raise ValueError(
                f"body chunk of {len(chunk)} bytes exceeds MILTER_CHUNK_SIZE ({MILTER_CHUNK_SIZE})"
            )
        return self._step(SMFIC_BODY, chunk)

    def unknown(self, cmd: str) -> Reply | None:
        """SMFIC_UNKNOWN with the SMTP command line the MTA did not recognise."""
        return self._step(SMFIC_UNKNOWN, encode_strings(cmd))

    def abort(self) -> None:
        """SMFIC_ABORT: end the current transaction (never answered)."""
        self._require_negotiated()
        self._send(SMFIC_ABORT)

    def quit(self) -> None:
        """SMFIC_QUIT, then close the socket (never answered)."""
        if self._sock is not None:
            try:
                self._send(SMFIC_QUIT)
            finally:
                self.close()

    def quit_nc(self) -> None:
        """SMFIC_QUIT_NC: end this SMTP connection, a new one follows on this socket.

        The next step must be ``connect`` again (libmilter calls the close
        callback and then waits for SMFIC_CONNECT); negotiation is *not* repeated.
        """
        self._require_negotiated()
        self._send(SMFIC_QUIT_NC)
        self._connect_sent = False
        self._helo_sent = False
        self._connection_decision = None
        self._connection_macros = {}

    def eom(self) -> EomResult:
        """SMFIC_BODYEOB, then collect modifications until the final reply.

        Each modification is checked against the negotiated SMFIF_* flags
        (:class:`UnnegotiatedActionError` otherwise).  SMFIR_PROGRESS is counted.
        SMFIR_SKIP and setsymlist are invalid here and raise.
        """
        negotiated = self._require_negotiated()
        self._send(SMFIC_BODYEOB)
        actions: list[EomAction] = []
        progress = 0
        quarantine: str | None = None
        body_done = False  # a REPLBODY run ended; Postfix refuses another one
        in_body = False
        while True:
            rcmd, data = self._recv()
            if rcmd == SMFIR_PROGRESS:
                self._expect_empty(rcmd, data)
                progress += 1
                self.progress_count += 1
                continue
            if rcmd in _EOM_ACTION_FLAGS:
                flag = _EOM_ACTION_FLAGS[rcmd]
                if not negotiated.actions & flag:
                    raise UnnegotiatedActionError(
                        f"milter sent {_REPLY_NAMES[rcmd]} but {describe_actions(flag)[0]} "
                        f"was not negotiated (negotiated: {negotiated.action_names})"
                    )
                if rcmd == SMFIR_REPLBODY:
                    if body_done and self.postfix_strict:
                        raise PostfixIncompatibleError(
                            "SMFIR_REPLBODY chunks interleaved with other modification "
                            "requests: Postfix cannot resume a body replacement"
                        )
                    in_body = True
                elif in_body:
                    in_body = False
                    body_done = True
                action = self._parse_action(rcmd, data)
                if isinstance(action, Quarantine):
                    quarantine = action.reason
                actions.append(action)
                continue
            if rcmd == SMFIR_REPLYCODE:
                final = Reply(rcmd, SmtpReply.parse(_decode(data.rstrip(b"\0"))))
            elif rcmd in (
                SMFIR_ACCEPT,
                SMFIR_CONTINUE,
                SMFIR_REJECT,
                SMFIR_TEMPFAIL,
                SMFIR_DISCARD,
            ):
                self._expect_empty(rcmd, data)
                final = Reply(rcmd)
            else:
                raise MilterProtocolError(
                    f"unexpected {_REPLY_NAMES.get(rcmd, repr(rcmd))} in reply to SMFIC_BODYEOB"
                )
            disposition = final.disposition
            assert disposition is not None
            return EomResult(
                disposition=disposition,
                reply=final.smtp,
                actions=actions,
                progress_count=progress,
                quarantine_reason=quarantine,
                final=final,
                header_leading_space=negotiated.header_leading_space,
            )

    @staticmethod
    def _parse_action(rcmd: str, data: bytes) -> EomAction:
        """Decode one modification request (layouts from libmilter smfi.c)."""
        try:
            if rcmd in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
                (index,) = _INDEX.unpack_from(data)
                name, value = split_nul_strings(data[4:])
                cls = InsertHeader if rcmd == SMFIR_INSHEADER else ChangeHeader
                return cls(index=index, name=_decode(name), value=_decode(value))
            if rcmd == SMFIR_REPLBODY:
                return ReplaceBody(data)
            strings = [_decode(s) for s in split_nul_strings(data)]
            if rcmd == SMFIR_ADDHEADER:
                name_s, value_s = strings
                return AddHeader(name=name_s, value=value_s)
            if rcmd == SMFIR_ADDRCPT:
                (rcpt,) = strings
                return AddRecipient(rcpt)
            if rcmd == SMFIR_DELRCPT:
                (rcpt,) = strings
                return DeleteRecipient(rcpt)
            if rcmd == SMFIR_ADDRCPT_PAR:
                rcpt, *rest = strings
                return AddRecipientPar(rcpt, " ".join(rest))
            if rcmd == SMFIR_CHGFROM:
                sender, *rest = strings
                return ChangeFrom(sender, " ".join(rest))
            (reason,) = strings
            return Quarantine(reason)
        except (ValueError, struct.error) as exc:
            raise MilterProtocolError(
                f"malformed {_REPLY_NAMES.get(rcmd, repr(rcmd))} data {data[:80]!r}"
            ) from exc

    # ------------------------------------------------------------------ whole messages

    def _send_stage_macros(
        self, cmd: str, stage_values: Mapping[str, str], known: Mapping[str, str]
    ) -> None:
        """Send the macros for step ``cmd`` the way Postfix chooses them.

        Without a setsymlist for the stage: the stage's own list (``stage_values``).
        With one: exactly the requested names, looked up in everything known so
        far, because Postfix resolves a milter's list against all its macros.
        """
        negotiated = self._require_negotiated()
        wanted = negotiated.macro_lists.get(_STAGE_MACRO_INDEX.get(cmd, -1))
        if wanted is None:
            values = dict(stage_values)
        else:
            values = {}
            for name in wanted:
                for variant in _macro_name_variants(name):
                    if variant in known:
                        values[name] = known[variant]
                        break
        if values:
            self.macros(cmd, values)

    def send_message(
        self,
        raw: bytes | str,
        sender: str,
        recipients: Sequence[str],
        *,
        macros: Mapping[str, Mapping[str, str]] | None = None,
        connect_info: ConnectInfo | None = None,
        helo: str | None = DEFAULT_HELO,
        mail_args: Sequence[str] = (),
        rcpt_args: Sequence[str] = (),
        queue_id: str | None = None,
    ) -> SessionResult:
        """Run one SMTP transaction through the milter, as Postfix would.

        On the first call of a connection this also sends CONNECT (with
        ``connect_info``) and HELO (if ``helo`` is not None); later calls reuse
        them, so several calls make several messages on one connection.

        Order and macros (Postfix defaults, overridable per stage through
        ``macros={"connect": {...}, "helo": {...}, "mail": {...}, "rcpt": {...},
        "data": {...}, "eoh": {...}, "eom": {...}}``): connect gets ``j``,
        ``{daemon_name}``, ``{daemon_addr}``, ``v``, ``_``, ``{client_addr}``,
        ``{client_name}``, ``{client_port}``; mail ``i``, ``{mail_addr}``; each rcpt
        ``i``, ``{rcpt_addr}``; data/eoh/eom ``i``.  Header packets carry the eoh
        macros and body packets the eom macros, as Postfix sends them.

        Early final replies are honoured like Postfix: REJECT/TEMPFAIL at RCPT
        drops that recipient only; ACCEPT before EOM stops talking to the milter
        about this message (it is accepted unchanged); at CONNECT/HELO a final
        reply decides every later message of this connection.  After the
        transaction SMFIC_ABORT is sent, as Postfix's smtpd does after every
        message (libmilter ignores it after a completed EOM).
        """
        negotiated = self._require_negotiated()
        parsed = parse_message(raw)
        headers = parsed.milter_headers(negotiated.header_leading_space)
        qid = queue_id if queue_id is not None else secrets.token_hex(5).upper()
        user = {
            _STAGE_NAMES.get(stage, stage): dict(values) for stage, values in (macros or {}).items()
        }
        result = SessionResult(
            sender=sender,
            recipients=list(recipients),
            headers=headers,
            body=parsed.body,
            negotiated=negotiated,
            queue_id=qid,
        )

        def decide(stage: Stage, reply: Reply, disposition: Disposition | None = None) -> None:
            result.decided_at = stage
            result.disposition = disposition or reply.disposition or Disposition.CONTINUE
            result.reply = reply.smtp

        def record(stage: Stage, reply: Reply | None) -> Reply | None:
            if reply is not None:
                result.replies.append((stage, reply))
            return reply

        def finish_unchanged() -> SessionResult:
            if result.accepted:
                result.applied = AppliedMessage(
                    headers=list(headers),
                    body=parsed.body,
                    sender=sender,
                    sender_esmtp_args="",
                    recipients=list(result.accepted_recipients),
                    quarantine_reason=None,
                    header_leading_space=negotiated.header_leading_space,
                )
            return result

        # ---- connection level (once per connection) -------------------------
        if self._connection_decision is None and not self._connect_sent:
            info = connect_info or ConnectInfo()
            conn_macros = {
                "j": self.mta_hostname,
                "{daemon_name}": self.mta_hostname,
                "{daemon_addr}": "127.0.0.1",
                "v": DEFAULT_MTA_VERSION,
                "_": f"{info.hostname} [{info.address}]",
                "{client_addr}": info.address,
                "{client_name}": info.hostname,
                "{client_port}": str(info.port),
            }
            conn_macros.update(user.get(SMFIC_CONNECT, {}))
            self._connection_macros.update(conn_macros)
            self._send_stage_macros(SMFIC_CONNECT, conn_macros, self._connection_macros)
            reply = record(
                Stage.CONNECT,
                self.connect(info.milter_hostname, info.smfia_family, info.port, info.address),
            )
            result.connect_reply = reply
            self._connect_sent = True
            if reply is not None and reply.is_final and reply.code != SMFIR_DISCARD:
                self._connection_decision = (Stage.CONNECT, reply)
        if self._connection_decision is None and not self._helo_sent and helo is not None:
            helo_macros = dict(user.get(SMFIC_HELO, {}))
            self._connection_macros.update(helo_macros)
            self._send_stage_macros(SMFIC_HELO, helo_macros, self._connection_macros)
            reply = record(Stage.HELO, self.helo(helo))
            result.helo_reply = reply
            self._helo_sent = True
            if reply is not None and reply.is_final and reply.code != SMFIR_DISCARD:
                self._connection_decision = (Stage.HELO, reply)
        if self._connection_decision is not None:
            # Postfix stops talking to this milter for the rest of the SMTP
            # connection and applies its decision to every message.
            stage, reply = self._connection_decision
            decide(stage, reply)
            result.accepted_recipients = list(recipients)
            return finish_unchanged()

        # ---- envelope ------------------------------------------------------
        known: dict[str, str] = dict(self._connection_macros)

        def stage_macros(cmd: str, defaults: Mapping[str, str]) -> dict[str, str]:
            values = dict(defaults)
            values.update(user.get(cmd, {}))
            known.update(values)
            return values

        def transaction() -> SessionResult:
            mail_macros = stage_macros(SMFIC_MAIL, {"i": qid, "{mail_addr}": _bare_address(sender)})
            self._send_stage_macros(SMFIC_MAIL, mail_macros, known)
            reply = record(Stage.MAIL, self.mail(sender, *mail_args))
            result.mail_reply = reply
            if reply is not None and reply.is_final:
                decide(Stage.MAIL, reply)
                if result.accepted or result.discarded:
                    # The MTA goes on with the transaction without this milter.
                    result.accepted_recipients = list(recipients)
                return finish_unchanged()

            message_accepted = False  # SMFIR_ACCEPT: no more events for this message
            discard = False
            failures: list[Reply] = []
            for rcpt in recipients:
                if message_accepted or discard:
                    result.rcpt_replies[rcpt] = None
                    result.accepted_recipients.append(rcpt)
                    continue
                rcpt_macros = stage_macros(
                    SMFIC_RCPT, {"i": qid, "{rcpt_addr}": _bare_address(rcpt)}
                )
                self._send_stage_macros(SMFIC_RCPT, rcpt_macros, known)
                reply = record(Stage.RCPT, self.rcpt(rcpt, *rcpt_args))
                result.rcpt_replies[rcpt] = reply
                disposition = None if reply is None else reply.disposition
                if disposition in (Disposition.REJECT, Disposition.TEMPFAIL):
                    assert reply is not None
                    result.rejected_recipients[rcpt] = reply
                    failures.append(reply)
                    continue
                result.accepted_recipients.append(rcpt)
                if disposition is Disposition.ACCEPT:
                    assert reply is not None
                    message_accepted = True
                    decide(Stage.RCPT, reply)
                elif disposition is Disposition.DISCARD:
                    assert reply is not None
                    discard = True
                    decide(Stage.RCPT, reply)

            if not result.accepted_recipients:
                last = failures[-1]
                tempfail = any(r.disposition is Disposition.TEMPFAIL for r in failures)
                decide(
                    Stage.RCPT,
                    last,
                    Disposition.TEMPFAIL if tempfail else Disposition.REJECT,
                )
                return finish_unchanged()
            if message_accepted or discard:
                return finish_unchanged()

            # ---- content -------------------------------------------------------
            data_macros = stage_macros(SMFIC_DATA, {"i": qid})
            self._send_stage_macros(SMFIC_DATA, data_macros, known)
            reply = record(Stage.DATA, self.data())
            result.data_reply = reply
            if reply is not None and reply.is_final:
                decide(Stage.DATA, reply)
                return finish_unchanged()

            eoh_macros = stage_macros(SMFIC_EOH, {"i": qid})
            eom_macros = stage_macros(SMFIC_BODYEOB, {"i": qid})

            for name, value in headers:
                self._send_stage_macros(SMFIC_HEADER, eoh_macros, known)
                # ``headers`` are already in wire form; bypass header()'s space rule.
                reply = record(Stage.HEADER, self._step(SMFIC_HEADER, encode_strings(name, value)))
                if reply is not None and reply.is_final:
                    decide(Stage.HEADER, reply)
                    return finish_unchanged()
                if reply is not None and reply.is_skip:
                    break

            self._send_stage_macros(SMFIC_EOH, eoh_macros, known)
            reply = record(Stage.EOH, self.eoh())
            result.eoh_reply = reply
            if reply is not None and reply.is_final:
                decide(Stage.EOH, reply)
                return finish_unchanged()

            for start in range(0, len(parsed.body), MILTER_CHUNK_SIZE):
                self._send_stage_macros(SMFIC_BODY, eom_macros, known)
                reply = record(
                    Stage.BODY, self.body(parsed.body[start : start + MILTER_CHUNK_SIZE])
                )
                if reply is not None and reply.is_final:
                    decide(Stage.BODY, reply)
                    return finish_unchanged()
                if reply is not None and reply.is_skip:
                    break

            self._send_stage_macros(SMFIC_BODYEOB, eom_macros, known)
            eom = self.eom()
            result.eom = eom
            result.replies.append((Stage.EOM, eom.final))
            decide(Stage.EOM, eom.final)
            if result.accepted:
                result.applied = eom.apply(headers, parsed.body, sender, result.accepted_recipients)
            return result

        outcome = transaction()
        # Postfix's smtpd calls milter_abort() from mail_reset() after every
        # transaction, whatever its outcome.
        self.abort()
        return outcome


def _coerce_spec(message: MessageSpec | tuple[bytes | str, str, Sequence[str]]) -> MessageSpec:
    if isinstance(message, MessageSpec):
        return message
    raw, sender, recipients = message
    return MessageSpec(raw=raw, sender=sender, recipients=recipients)


def _merge_macros(
    base: Mapping[str, Mapping[str, str]] | None,
    extra: Mapping[str, Mapping[str, str]] | None,
) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {k: dict(v) for k, v in (base or {}).items()}
    for stage, values in (extra or {}).items():
        merged.setdefault(stage, {}).update(values)
    return merged


def run_session(
    address: MilterAddress,
    messages: Iterable[MessageSpec | tuple[bytes | str, str, Sequence[str]]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    actions: int = ALL_V6_ACTIONS,
    protocol: int = ALL_V6_PROTOCOL_BITS,
    version: int = SMFI_PROT_VERSION,
    connect_info: ConnectInfo | None = None,
    helo: str | None = DEFAULT_HELO,
    macros: Mapping[str, Mapping[str, str]] | None = None,
    postfix_strict: bool = True,
) -> list[SessionResult]:
    """Connect, negotiate, send every message on one connection, quit.

    ``messages`` are :class:`MessageSpec` or ``(raw, sender, recipients)``
    tuples.  Per-message macros are merged over the session-wide ``macros``.
    Returns one :class:`SessionResult` per message, in order.
    """
    results: list[SessionResult] = []
    with MilterClient(address, timeout, postfix_strict=postfix_strict) as client:
        client.negotiate(actions=actions, protocol=protocol, version=version)
        for message in messages:
            spec = _coerce_spec(message)
            results.append(
                client.send_message(
                    spec.raw,
                    spec.sender,
                    spec.recipients,
                    macros=_merge_macros(macros, spec.macros),
                    connect_info=connect_info,
                    helo=helo,
                    mail_args=spec.mail_args,
                    rcpt_args=spec.rcpt_args,
                    queue_id=spec.queue_id,
                )
            )
        client.quit()
    return results
