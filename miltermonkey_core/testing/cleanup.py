"""The message as Postfix's cleanup server sees and edits it, for the MTA-side client.

A milter's end-of-message modification requests arrive as a list of edit
records (:class:`AddHeader`, :class:`ChangeHeader`, :class:`ReplaceBody` ...);
:meth:`EomResult.apply` replays them the way ``cleanup_milter.c`` edits the
queue file and gives the :class:`AppliedMessage` Postfix would queue.
:func:`parse_message` splits a raw message into the header fields and body
a milter is sent, the way Postfix's MIME state machine does.

How header values travel (this mirrors Postfix ``milter8.c``, which in turn
mirrors Sendmail 8):

* The value is the text after the colon.  Unless ``SMFIP_HDR_LEADSPC`` was
  negotiated, exactly one leading *space* (not tab) is removed; with it, the
  value is sent as-is, leading whitespace included.
* Folded headers are **not** unfolded: continuation lines are joined with a
  bare ``"\\n"`` (LF, never CRLF) and keep their leading whitespace, e.g.
  ``"first part\\n\\tsecond part"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, TypeAlias

import attrs

from miltermonkey_core.testing.replies import Disposition, Reply, SmtpReply

__all__ = [
    "AddHeader",
    "AddRecipient",
    "AddRecipientPar",
    "AppliedMessage",
    "ChangeFrom",
    "ChangeHeader",
    "DeleteRecipient",
    "EomAction",
    "EomResult",
    "InsertHeader",
    "ParsedMessage",
    "Quarantine",
    "ReplaceBody",
    "parse_message",
]


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


def bare_address(address: str) -> str:
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
                target = bare_address(action.recipient)
                rcpts = [r for r in rcpts if bare_address(r) != target]
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


def decode_wire(raw: bytes) -> str:
    """Text of header fields and protocol strings; bytes that are not UTF-8 survive a round trip."""
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
        raw_headers=[(decode_wire(name), decode_wire(value)) for name, value in headers],
        body=body,
    )

