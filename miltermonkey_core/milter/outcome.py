"""A message's outcome, answered: the log line for it and the packets the MTA gets.

:mod:`.connection` follows the protocol's order of commands; this is what
happens once the engine has decided, at the end of one message.
"""

from __future__ import annotations

import logging
import threading

from miltermonkey_core.contract.verdict import Verdict
from miltermonkey_core.engine.chain import MtaDecides
from miltermonkey_core.engine.session import Decision, Session, run_after_accept
from miltermonkey_core.errors import ActionNotNegotiated
from miltermonkey_core.logs import ROOT, SUMMARY_LEVEL, MessageOutcome
from miltermonkey_core.milter.generation import Generation
from miltermonkey_core.milter.replies import decision_packets, verdict_packet

log = logging.getLogger(f"{ROOT}.milter")


def answer(session: Session, decision: Decision, allowed: frozenset[str],
           gen: Generation | None) -> bytes | None:
    """The edits in brain order, then quarantine, then the verdict."""
    v = decision.verdict
    qid = session.qid

    def brains() -> str:
        return " ".join(f"{r.brain}={r.outcome}:{r.action.value}" for r in decision.results)

    if isinstance(v, MtaDecides):
        log.warning("%s: no verdict: %s, in %.1f ms [%s]; dropping the milter connection so "
                    "the MTA applies its default action", qid, v.reason,
                    decision.seconds * 1000, brains(),
                    extra=MessageOutcome(session, decision, "mta").extra())
        raise ConnectionAbortedError(v.reason)
    if v is not None and v.final:
        log.info("%s: %s by %s in %.1f ms [%s]", qid, v.describe(), v.brain,
                 decision.seconds * 1000, brains(),
                 extra=MessageOutcome(session, decision, v.action.value).extra())
        if v.action.value == "discard" and decision.ctx.after_accept_jobs:
            _after_accept(decision, qid)
        return verdict_packet(v)
    try:
        packets = decision_packets(decision, allowed)
    except ActionNotNegotiated as e:
        log.error("%s: the MTA did not negotiate an edit (%s); tempfail so nothing is "
                  "half-applied", qid, e)
        return verdict_packet(Verdict.tempfail(451, "4.3.0",
                                               "Temporary failure in mail filter"))
    if gen is not None and gen.daemon.debug_level >= SUMMARY_LEVEL:
        log.info("%s: accept in %.1f ms, %d edit(s)%s [%s]", qid,
                 decision.seconds * 1000, len(decision.ctx.edits),
                 " quarantined" if decision.ctx.quarantine_request else "", brains(),
                 extra=MessageOutcome(session, decision, "accept").extra())
    if decision.ctx.after_accept_jobs:
        _after_accept(decision, qid)
    return packets


def _after_accept(decision: Decision, qid: str) -> None:
    """Run brains' after-accept jobs (notices) on their own thread: the MTA
    need not wait for a sendmail process to hear that the message is accepted."""
    threading.Thread(target=run_after_accept, args=(decision.ctx, qid),
                     name="mm-after-accept", daemon=True).start()
