"""The milter context brains write to: it records edits and verdicts, applies nothing.

Recording instead of sending edits to the MTA at once buys three things: edits are
applied once, at end of message, in brain order; a brain that fails can be
rolled back as if it never ran; and the same code runs offline (``try``, the
test runner, evaluation mode).

Header indexes follow the MTA's live list (what Postfix's cleanup server and
Sendmail do): ``change_header(name, v, index=2)`` means the second header of
that name *as the message stands after earlier edits*, including headers
earlier brains added and excluding ones they deleted.  The context keeps that
view itself, so each recorded operation carries the index the MTA will need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import attrs

from miltermonkey_core.contract.edits import (
    AddHeader,
    AddRcpt,
    Capability,
    ChangeFrom,
    ChangeHeader,
    DelRcpt,
    Edit,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    check_header_name,
    safe_header_value,
)
from miltermonkey_core.contract.model import Address, Header, Headers, Message
from miltermonkey_core.contract.verdict import Action, Verdict
from miltermonkey_core.logs import ROOT

log = logging.getLogger(f"{ROOT}.context")


@attrs.define
class _Mark:
    """Where a brain started, so its edits can be rolled back."""

    brain: str
    n_edits: int
    view: list[Header]
    recipients: list[str]
    quarantine: Quarantine | None
    verdict: Verdict | None
    n_after: int
    unchecked: dict[str, str]


class MilterContext:
    """What a brain uses at end of message to edit the message and give a verdict.

    One context serves the whole brain chain of one message; the dispatcher
    tells it which brain is speaking.  ``allowed`` is the set of capabilities
    negotiated with the MTA; anything else is refused with a log line.
    """

    def __init__(self, message: Message, allowed: frozenset[str] = Capability.ALL) -> None:
        self.message = message
        self.allowed = allowed
        self.edits: list[Edit] = []
        self.refused: list[str] = []
        self.quarantine_request: Quarantine | None = None
        self._verdict: Verdict | None = None
        self._view: list[Header] = list(message.headers)
        self._recipients: list[str] = [r.address for r in message.envelope.recipients]
        self._brain = "core"
        self._mark: _Mark | None = None
        #: Work to do once the MTA has been told to accept (notices): (brain, fn).
        self.after_accept_jobs: list[tuple[str, Callable[[], None]]] = []
        #: Brains that let the message pass without judging it, and why.
        self.unchecked_brains: dict[str, str] = {}

    # --- driven by the dispatcher -----------------------------------------------

    @property
    def brain(self) -> str:
        """The brain currently speaking (edits are attributed to it)."""
        return self._brain

    def begin(self, brain: str) -> None:
        self._brain = brain
        self._mark = _Mark(brain, len(self.edits), list(self._view), list(self._recipients),
                           self.quarantine_request, self._verdict, len(self.after_accept_jobs),
                           dict(self.unchecked_brains))

    def rollback(self) -> list[Edit]:
        """Undo everything the current brain recorded; return what was undone."""
        m = self._mark
        if m is None:
            return []
        undone = self.edits[m.n_edits :]
        del self.edits[m.n_edits :]
        self._view = m.view
        self._recipients = m.recipients
        self.quarantine_request = m.quarantine
        self._verdict = m.verdict
        del self.after_accept_jobs[m.n_after :]
        self.unchecked_brains = m.unchecked
        return undone

    def end(self) -> None:
        self._mark = None
        self._brain = "core"

    # --- what brains read -----------------------------------------------------

    @property
    def headers(self) -> Headers:
        """The headers as they stand after the edits recorded so far."""
        return Headers(self._view)

    @property
    def recipients(self) -> list[str]:
        return list(self._recipients)

    @property
    def verdict(self) -> Verdict | None:
        return self._verdict

    # --- recording ------------------------------------------------------------

    def _allow(self, capability: str, what: str) -> bool:
        if capability in self.allowed:
            return True
        msg = (
            f"brain {self._brain!r}: {what} refused: the MTA did not negotiate "
            f"{capability!r} (declare it in the brain's needs, or the MTA is too old)"
        )
        self.refused.append(msg)
        log.error("%s: %s", self.message.id, msg)
        return False

    def add_header(self, name: str, value: str) -> None:
        """Append a header at the end of the header block."""
        name, value = check_header_name(name), safe_header_value(value)
        if self._allow(Capability.ADD_HEADERS, f"add_header({name})"):
            self.edits.append(AddHeader(name, value, self._brain))
            self._view.append(Header.from_str(name, value))

    def insert_header(self, index: int, name: str, value: str) -> None:
        """Insert a header at ``index`` (0 = very top) of the current list."""
        name, value = check_header_name(name), safe_header_value(value)
        index = max(0, min(index, len(self._view)))
        if self._allow(Capability.ADD_HEADERS, f"insert_header({name})"):
            self.edits.append(InsertHeader(index, name, value, self._brain))
            self._view.insert(index, Header.from_str(name, value))

    def _positions(self, name: str) -> list[int]:
        low = name.lower()
        return [i for i, h in enumerate(self._view) if h.name.lower() == low]

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        """Set the ``index``-th header called ``name``; appends if there is none."""
        name, value = check_header_name(name), safe_header_value(value)
        if index < 1:
            raise ValueError("header index is 1-based")
        if not self._allow(Capability.CHANGE_HEADERS, f"change_header({name})"):
            return
        pos = self._positions(name)
        self.edits.append(ChangeHeader(name, index, value, self._brain))
        if index <= len(pos):
            self._view[pos[index - 1]] = Header.from_str(self._view[pos[index - 1]].name, value)
        else:
            self._view.append(Header.from_str(name, value))

    def delete_header(self, name: str, index: int = 1) -> None:
        """Remove the ``index``-th header called ``name``; a no-op if absent."""
        check_header_name(name)
        pos = self._positions(name)
        if index < 1 or index > len(pos):
            return
        if self._allow(Capability.CHANGE_HEADERS, f"delete_header({name})"):
            self.edits.append(ChangeHeader(name, index, None, self._brain))
            del self._view[pos[index - 1]]

    def delete_where(self, name: str, doomed: Callable[[Header, int], bool]) -> int:
        """Remove, in one pass, each ``name`` header for which ``doomed(header, n)`` is true.

        ``n`` is the header's 1-based position among its namesakes before any of
        these removals.  Each removal is recorded with the live index the MTA
        will see at that point, so a message with thousands of forged copies
        costs one walk of the header list, not one per copy.
        """
        check_header_name(name)
        if not self._allow(Capability.CHANGE_HEADERS, f"delete_header({name})"):
            return 0
        kept: list[Header] = []
        n = live = removed = 0
        low = name.lower()
        for h in self._view:
            if h.name.lower() == low:
                n += 1
                live += 1
                if doomed(h, n):
                    self.edits.append(ChangeHeader(name, live, None, self._brain))
                    live -= 1
                    removed += 1
                    continue
            kept.append(h)
        self._view = kept
        return removed

    def delete_all(self, name: str) -> int:
        """Remove every header called ``name``; returns how many were removed."""
        return self.delete_where(name, lambda _h, _n: True)

    def replace_header(self, name: str, value: str) -> None:
        """Leave exactly one ``name`` header with ``value`` (e.g. X-Spam-Status).

        Forged or stale copies from outside are removed, so downstream filters
        never see two answers.
        """
        n = len(self._positions(name))
        if n == 0:
            self.add_header(name, value)
            return
        self.change_header(name, value, 1)
        for _ in range(n - 1):
            self.delete_header(name, 2)

    def replace_body(self, body: bytes | Path) -> None:
        if self._allow(Capability.CHANGE_BODY, "replace_body"):
            self.edits.append(ReplaceBody(body, self._brain))

    def add_rcpt(self, address: str, params: str | None = None) -> None:
        cap = Capability.ADD_RCPT_PAR if params else Capability.ADD_RCPT
        if self._allow(cap, f"add_rcpt({address})"):
            self.edits.append(AddRcpt(address, params, self._brain))
            self._recipients.append(address)

    def del_rcpt(self, address: str) -> None:
        if self._allow(Capability.DEL_RCPT, f"del_rcpt({address})"):
            self.edits.append(DelRcpt(address, self._brain))
            want = Address(address).bare.lower()
            self._recipients = [r for r in self._recipients if Address(r).bare.lower() != want]

    def change_from(self, address: str, params: str | None = None) -> None:
        if self._allow(Capability.CHANGE_FROM, f"change_from({address})"):
            self.edits.append(ChangeFrom(address, params, self._brain))

    def quarantine(self, reason: str) -> None:
        """Ask the MTA to hold the message (Postfix hold queue, Sendmail quarantine)."""
        reason = " ".join(reason.split()) or "quarantined"
        if self._allow(Capability.QUARANTINE, "quarantine"):
            self.quarantine_request = Quarantine(reason, self._brain)

    def unchecked(self, reason: str) -> None:
        """Say this brain let the message through without judging it.

        Its edits (an "Unchecked" status header, say) still apply, but the
        milter key will not claim the brain ran, so the next hop checks the
        message itself instead of trusting a scan that never happened.
        """
        self.unchecked_brains[self._brain] = " ".join(reason.split()) or "unchecked"

    def after_accept(self, job: Callable[[], None]) -> None:
        """Run ``job`` only once the client's transaction succeeded (the message is
        accepted or discarded, never rejected or tempfailed), outside the MTA's wait.

        For side effects such as notices: sent from ``eom_process`` directly, a
        notice would go out even when a later brain tempfails the message, and
        again on every retry.
        """
        self.after_accept_jobs.append((self._brain, job))

    # --- verdicts -------------------------------------------------------------

    def set_verdict(self, verdict: Verdict) -> None:
        self._verdict = verdict.by(self._brain)

    def accept(self, reason: str = "") -> None:
        """Say this brain is happy with the message; the chain goes on."""
        self.set_verdict(Verdict.accept(reason))

    def reject(
        self,
        code: int = 550,
        xcode: str | None = "5.7.1",
        text: str | list[str] = "Message refused",
        reason: str = "",
    ) -> None:
        """Refuse the message with a 5xx reply; stops the chain."""
        self.set_verdict(Verdict.reject(code, xcode, text, reason))

    def tempfail(
        self,
        code: int = 451,
        xcode: str | None = "4.7.1",
        text: str | list[str] = "Try again later",
        reason: str = "",
    ) -> None:
        """Ask the client to retry later with a 4xx reply; stops the chain."""
        self.set_verdict(Verdict.tempfail(code, xcode, text, reason))

    def discard(self, reason: str = "") -> None:
        """Accept the message and silently drop it; stops the chain."""
        self.set_verdict(Verdict.discard(reason))

    @property
    def final(self) -> bool:
        return self._verdict is not None and self._verdict.final

    @property
    def action(self) -> Action:
        return self._verdict.action if self._verdict else Action.CONTINUE

    def summary(self) -> list[str]:
        """Human-readable lines for ``miltermonkey try`` and logs."""
        out = [f"{type(e).__name__} {attrs.asdict(e)}" for e in self.edits]
        if self.quarantine_request:
            out.append(f"Quarantine {self.quarantine_request.reason!r}")
        return out
