"""The milter's answers on the wire: verdicts, SMTP reply texts and end-of-message edits.

Everything the MTA receives from the daemon is built here, from values the
engine decided: a verdict becomes one reply packet (with its SMTP reply
text when it has one), and a decision at end of message becomes its edits,
in brain order, then its quarantine request, then the verdict.  Text from
mail data has been made safe by the contract (no CR/LF or NUL can start a
new header or reply line); this module only encodes it.
"""

from __future__ import annotations

from typing import Final

from miltermonkey_core.contract.edits import (
    AddHeader,
    AddRcpt,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    Edit,
    InsertHeader,
    ReplaceBody,
    check_allowed,
)
from miltermonkey_core.contract.verdict import Action, Verdict
from miltermonkey_core.engine.session import Decision
from miltermonkey_core.milter import protocol as p

_FINAL_CODES: Final = {
    Action.REJECT: p.SMFIR_REJECT,
    Action.TEMPFAIL: p.SMFIR_TEMPFAIL,
    Action.DISCARD: p.SMFIR_DISCARD,
    Action.ACCEPT: p.SMFIR_ACCEPT,
    Action.CONTINUE: p.SMFIR_CONTINUE,
    Action.SKIP: p.SMFIR_CONTINUE,
}

#: Where an appended header is inserted.  Sendmail's SMFIR_ADDHEADER puts a
#: header *above* the first one of the same name (headers.c ``addheader``),
#: which reverses config order for brains adding the same header and puts an
#: added header above the message's own copy; an insert past the last header
#: appends on Sendmail and on Postfix alike, so every brain's header lands
#: below the ones before it, in config order, whichever MTA applies it.
APPEND_INDEX: Final = 1 << 24

CONTINUE: Final = p.encode_packet(p.SMFIR_CONTINUE)
ACCEPT: Final = p.encode_packet(p.SMFIR_ACCEPT)
PROGRESS: Final = p.encode_packet(p.SMFIR_PROGRESS)


def _c(text: str) -> bytes:
    """A C string for the MTA: UTF-8, no lone surrogates, no NUL, NUL-terminated."""
    return text.encode("utf-8", "replace").replace(b"\0", b"") + b"\0"


def reply_text(verdict: Verdict) -> str | None:
    """The SMTP reply libmilter's ``smfi_setmlreply`` would send for ``verdict``.

    Only a reject with a 5xx text or a tempfail with a 4xx text carries one;
    the MTA uses its own text otherwise.
    """
    r = verdict.reply
    if r is None:
        return None
    first = str(r.code)[0]
    if not ((verdict.action is Action.REJECT and first == "5")
            or (verdict.action is Action.TEMPFAIL and first == "4")):
        return None
    last = len(r.lines) - 1
    return "\r\n".join(f"{r.code}{' ' if i == last else '-'}{r.xcode} {line}"
                       for i, line in enumerate(r.lines))


def verdict_packet(verdict: Verdict | None) -> bytes:
    """One reply packet for a step's verdict (``None``: continue)."""
    if verdict is None:
        return CONTINUE
    text = reply_text(verdict)
    if text is not None:
        return p.encode_packet(p.SMFIR_REPLYCODE, _c(text))
    return p.encode_packet(_FINAL_CODES[verdict.action])


def edit_packets(edit: Edit) -> bytes:
    """The modification packets of one recorded edit."""
    if isinstance(edit, AddHeader):
        return p.encode_packet(p.SMFIR_INSHEADER, APPEND_INDEX.to_bytes(4, "big")
                               + _c(edit.name) + _c(edit.value))
    if isinstance(edit, InsertHeader):
        return p.encode_packet(p.SMFIR_INSHEADER, edit.index.to_bytes(4, "big")
                               + _c(edit.name) + _c(edit.value))
    if isinstance(edit, ChangeHeader):
        value = b"\0" if edit.value is None else _c(edit.value)
        return p.encode_packet(p.SMFIR_CHGHEADER, edit.index.to_bytes(4, "big")
                               + _c(edit.name) + value)
    if isinstance(edit, ReplaceBody):
        return b"".join(p.encode_packet(p.SMFIR_REPLBODY, chunk)
                        for chunk in edit.chunks(p.MILTER_CHUNK_SIZE))
    if isinstance(edit, AddRcpt):
        if edit.params:
            return p.encode_packet(p.SMFIR_ADDRCPT_PAR, _c(edit.address) + _c(edit.params))
        return p.encode_packet(p.SMFIR_ADDRCPT, _c(edit.address))
    if isinstance(edit, DelRcpt):
        return p.encode_packet(p.SMFIR_DELRCPT, _c(edit.address))
    if isinstance(edit, ChangeFrom):
        params = _c(edit.params) if edit.params else b""
        return p.encode_packet(p.SMFIR_CHGFROM, _c(edit.address) + params)
    raise TypeError(f"no packet for edit {edit!r}")


def decision_packets(decision: Decision, allowed: frozenset[str]) -> bytes:
    """Edits in brain order, the quarantine request, then ACCEPT.

    Raises :class:`~miltermonkey_core.errors.ActionNotNegotiated` when an
    edit needs a capability the MTA did not grant: the caller tempfails
    rather than half-apply the decision.
    """
    ctx = decision.ctx
    out = bytearray()
    for edit in ctx.edits:
        check_allowed(edit, allowed)
        out += edit_packets(edit)
    q = ctx.quarantine_request
    if q is not None:
        check_allowed(q, allowed)
        out += p.encode_packet(p.SMFIR_QUARANTINE, _c(q.reason))
    out += ACCEPT
    return bytes(out)
