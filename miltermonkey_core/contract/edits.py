"""The edits a brain can record, in the MTA's terms, and the checks that keep
mail data from turning into new headers.

Edits are values: recorded at end of message by the context, applied once by
the milter layer in brain order, replayed offline by ``miltermonkey try``
and the test kit.  Each knows the capability (libmilter's SMFIF_* flag) the
MTA must have granted for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import attrs

from miltermonkey_core.errors import ActionNotNegotiated

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII without ':' or space


class Capability:
    """Names of the MTA actions an edit needs (libmilter's SMFIF_* flags)."""

    ADD_HEADERS = "add_headers"
    CHANGE_HEADERS = "change_headers"
    CHANGE_BODY = "change_body"
    ADD_RCPT = "add_rcpt"
    ADD_RCPT_PAR = "add_rcpt_par"
    DEL_RCPT = "del_rcpt"
    QUARANTINE = "quarantine"
    CHANGE_FROM = "change_from"

    ALL = frozenset(
        {ADD_HEADERS, CHANGE_HEADERS, CHANGE_BODY, ADD_RCPT, ADD_RCPT_PAR, DEL_RCPT,
         QUARANTINE, CHANGE_FROM}
    )


def safe_header_value(value: str) -> str:
    """Make a header value that cannot start a new header or break the message.

    A line break must be followed by whitespace to stay a continuation line;
    where mail data supplied one without it, a tab is inserted.  NUL and CR
    are dropped (the MTA adds CRs itself).
    """
    if "\n" not in value and "\r" not in value and "\x00" not in value:
        return value.rstrip("\t ")  # the common case: nothing to neutralise
    value = value.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    value = re.sub(r"\n(?![ \t])", "\n\t", value)
    return value.rstrip("\n\t ")


def check_header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


# --- the recorded operations, in the MTA's terms ------------------------------------


@attrs.frozen
class AddHeader:
    name: str
    value: str
    brain: str
    capability = Capability.ADD_HEADERS


@attrs.frozen
class InsertHeader:
    """Insert at ``index`` (0 = top) of the header list as it stands."""

    index: int
    name: str
    value: str
    brain: str
    capability = Capability.ADD_HEADERS


@attrs.frozen
class ChangeHeader:
    """Change the ``index``-th (1-based) header called ``name``; ``None`` deletes it."""

    name: str
    index: int
    value: str | None
    brain: str
    capability = Capability.CHANGE_HEADERS


@attrs.frozen
class ReplaceBody:
    """New body, as bytes or a file path (a notice, a defanged copy)."""

    source: bytes | Path
    brain: str
    capability = Capability.CHANGE_BODY

    def chunks(self, size: int = 65535) -> Iterable[bytes]:
        if isinstance(self.source, bytes):
            for i in range(0, len(self.source), size):
                yield self.source[i : i + size]
            return
        with self.source.open("rb") as f:
            while piece := f.read(size):
                yield piece


@attrs.frozen
class AddRcpt:
    address: str
    params: str | None
    brain: str

    @property
    def capability(self) -> str:
        return Capability.ADD_RCPT_PAR if self.params else Capability.ADD_RCPT


@attrs.frozen
class DelRcpt:
    address: str
    brain: str
    capability = Capability.DEL_RCPT


@attrs.frozen
class ChangeFrom:
    address: str
    params: str | None
    brain: str
    capability = Capability.CHANGE_FROM


@attrs.frozen
class Quarantine:
    reason: str
    brain: str
    capability = Capability.QUARANTINE


Edit = AddHeader | InsertHeader | ChangeHeader | ReplaceBody | AddRcpt | DelRcpt | ChangeFrom
EDIT_TYPES = (AddHeader, InsertHeader, ChangeHeader, ReplaceBody, AddRcpt, DelRcpt, ChangeFrom)


def check_allowed(edit: Edit | Quarantine, allowed: frozenset[str]) -> None:
    """Raise if an edit needs a capability outside ``allowed`` (used by the adapter)."""
    if edit.capability not in allowed:
        raise ActionNotNegotiated(
            f"{type(edit).__name__} from brain {edit.brain!r} needs {edit.capability!r}"
        )
