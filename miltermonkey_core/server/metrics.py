"""What the milter process counts: per brain and per message, for ``/metrics`` and ``status``.

The worker process restarts (a crash, an upgrade of brain code) but the
metrics endpoint must not, so the numbers live here, in the worker, as
plain counters, and the supervisor serves them: when Prometheus scrapes
(or ``/readyz`` or ``miltermonkey status`` asks) the supervisor asks its
worker for a :meth:`WorkerMetrics.snapshot` over the control socket and
turns it into Prometheus metric families (:mod:`.exposition`).  The
worker never imports the Prometheus library and never listens on a port of
its own; a counter resets when a worker is replaced, which Prometheus'
``rate()`` and ``increase()`` take in their stride.

Recording a message costs a lock and a handful of dictionary updates:
about 5 µs on the shared two-core test machine, under 1% of the ~0.5 ms
of milter CPU a message costs with the trivial brain (docs/benchmarks.md).

Labels are bounded by construction: brain names come from the
configuration, outcomes, actions and key reasons from fixed vocabularies
(anything else is counted as ``other``), and nothing per message (a queue
id, an address, a virus name) ever becomes a label.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from typing import Any

from miltermonkey_core.engine.chain import MtaDecides
from miltermonkey_core.engine.session import Decision, Session

#: Latency buckets (seconds), from an in-process brain to a slow scanner.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: What a brain's eom_process came to (``BrainResult.outcome``).
OUTCOMES = ("ran", "error", "timeout", "open", "skipped", "evaluation", "cached")
#: Verdict kinds (``Action`` values).
ACTIONS = ("continue", "accept", "reject", "tempfail", "discard", "skip")
#: The outcome of a whole message, as the MTA sees it.
MESSAGE_VERDICTS = ("accept", "reject", "tempfail", "discard", "mta", "error")
#: Why a milter key header was stripped (``milterkey.fields.Reason``), label form.
KEY_REASONS = {
    "malformed": "malformed",
    "unknown key id": "unknown_key",
    "bad MAC": "bad_mac",
    "expired": "expired",
    "expiry too far in the future": "future",
    "wrong message": "wrong_message",
    "wrong body": "wrong_body",
    "not bound to the body": "unbound",
}
_OUTCOME_SET = frozenset(OUTCOMES)
_SKIP_REASON = re.compile(r"(declined|error|key|condition:[a-z_]{1,32})\Z")


def _bump(counts: dict[Any, int], key: Any) -> None:
    counts[key] = counts.get(key, 0) + 1


def skip_reason(detail: str) -> str:
    """A skipped brain's reason as a label: ``declined``, ``key``, ``condition:<kind>``..."""
    return detail if _SKIP_REASON.match(detail) else "other"


def key_reason(reason: str) -> str:
    for text, label in KEY_REASONS.items():
        if reason.startswith(text):
            return label
    return "other"


class Histogram:
    """Counts per bucket (not cumulative), a sum and a count; JSON-friendly."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def as_json(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "sum": self.sum, "count": self.count}


class WorkerMetrics:
    """The worker's counters; every method is safe from any thread."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.sessions = 0
        self.messages: dict[str, int] = {}
        self.message_bytes = 0
        self.message_latency = Histogram()
        self.brain_outcomes: dict[tuple[str, str], int] = {}
        self.brain_verdicts: dict[tuple[str, str], int] = {}
        self.brain_evaluation: dict[tuple[str, str], int] = {}
        self.brain_skips: dict[tuple[str, str], int] = {}
        self.brain_latency: dict[str, Histogram] = {}
        self.keys: dict[str, int] = {}
        self.keys_stripped: dict[str, int] = {}

    def session_opened(self) -> None:
        with self._lock:
            self.sessions += 1

    def message_failed(self) -> None:
        """End of message raised in the core: the connection applies the daemon's policy."""
        with self._lock:
            _bump(self.messages, "error")

    def message_done(self, session: Session, decision: Decision) -> None:
        """Count one judged message (what :func:`~.eom.run_eom` returned).

        On every message's path: plain dictionaries, no regular expression
        unless a brain was skipped.
        """
        v = decision.verdict
        if v is None or not v.final:
            verdict = "accept"
        elif isinstance(v, MtaDecides):
            verdict = "mta"
        else:
            verdict = v.action.value
        msg = session.message
        size = msg.body.size if msg is not None else 0
        key = decision.key
        results = [(r.brain, r.outcome, r.action, r.seconds, r.detail) for r in decision.results]
        with self._lock:
            messages = self.messages
            messages[verdict] = messages.get(verdict, 0) + 1
            self.message_bytes += size
            self.message_latency.observe(decision.seconds)
            outcomes, latency = self.brain_outcomes, self.brain_latency
            for brain, result, action, seconds, detail in results:
                outcome = result if result in _OUTCOME_SET else "other"
                k = (brain, outcome)
                outcomes[k] = outcomes.get(k, 0) + 1
                if outcome == "ran":
                    _bump(self.brain_verdicts, (brain, action.value))
                elif outcome == "cached":  # a verdict replayed from the scan cache
                    _bump(self.brain_verdicts, (brain, action.value))
                    continue
                elif outcome == "evaluation":
                    _bump(self.brain_evaluation, (brain, action.value))
                elif outcome == "skipped":
                    _bump(self.brain_skips, (brain, skip_reason(detail)))
                    continue
                elif outcome == "open":
                    continue
                hist = latency.get(brain)
                if hist is None:
                    hist = latency[brain] = Histogram()
                hist.observe(seconds)
            if key is not None and key.checks:
                _bump(self.keys, "trusted" if key.trusted is not None else "untrusted")
                for _, _, reason in key.rejected:
                    _bump(self.keys_stripped, key_reason(reason))

    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far, as JSON-ready data (pairs as ``[a, b, n]`` lists)."""

        def pairs(c: dict[tuple[str, str], int]) -> list[list[Any]]:
            return [[a, b, n] for (a, b), n in sorted(c.items())]

        with self._lock:
            return {
                "started": self.started,
                "sessions": self.sessions,
                "messages": dict(self.messages),
                "message_bytes": self.message_bytes,
                "message_latency": self.message_latency.as_json(),
                "brain_outcomes": pairs(self.brain_outcomes),
                "brain_verdicts": pairs(self.brain_verdicts),
                "brain_evaluation": pairs(self.brain_evaluation),
                "brain_skips": pairs(self.brain_skips),
                "brain_latency": {b: h.as_json() for b, h in sorted(self.brain_latency.items())},
                "keys": dict(self.keys),
                "keys_stripped": dict(self.keys_stripped),
            }
