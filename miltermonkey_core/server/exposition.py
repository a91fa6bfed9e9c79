"""The supervisor's view of the daemon as Prometheus metric families, and when it is ready.

The supervisor outlives its workers, so it serves ``/metrics``: at each
scrape :class:`MonkeyCollector` asks the worker for its counters
(:mod:`.metrics`) and adds what only the supervisor knows (reloads, worker
restarts, uptime, readiness).  Every metric is listed with its labels in
the docs (``docs/monitoring.md``); the label values are bounded (see
:mod:`.metrics`).

Readiness (``/readyz``, and ``miltermonkey_ready``) is one rule, so a
balancer and a dashboard never disagree: the host is ready when

* the configuration is loaded and a worker is serving it and answers,
* it is not stopping (SIGTERM turns it not-ready first, for the whole
  ``drain_period``), and
* no brain whose failure policy refuses mail (``on_error`` tempfail, reject
  or mta) has its circuit breaker open: such a brain's engine is failing
  and every message sent here would be refused, where another host may
  still scan it.  A brain whose policy lets mail through (accept, tag)
  never makes the host not-ready: mail is better delivered tagged than
  refused by every host at once.  An open breaker turns half-open after
  its cool-down, the host is ready again, and the next message probes the
  engine.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from miltermonkey_core import __version__
from miltermonkey_core.server.health import BREAKER_STATES, SupervisorFacts, not_ready_reasons
from miltermonkey_core.server.metrics import LATENCY_BUCKETS, OUTCOMES

PREFIX = "miltermonkey"


#: Failure policies that refuse mail while the brain's engine is down.
def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), buckets, strict=False):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return out


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def supervisor_families(facts: SupervisorFacts, ready: bool) -> Iterator[Metric]:
    info = _gauge("build_info", "Version of the running MilterMonkey core (always 1)",
                  ["version", "python"])
    info.add_metric([__version__, platform.python_version()], 1)
    yield info
    yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds",
                            "When the supervisor started (Unix time)", value=facts.started)
    yield GaugeMetricFamily(f"{PREFIX}_ready", "1 when /readyz answers 200", value=int(ready))
    yield GaugeMetricFamily(f"{PREFIX}_draining",
                            "1 from SIGTERM until exit (the balancer should stop sending)",
                            value=int(facts.stopping))
    yield GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while a worker process serves",
                            value=int(facts.worker_serving))
    if facts.worker_started is not None:
        yield GaugeMetricFamily(f"{PREFIX}_worker_start_time_seconds",
                                "When the serving worker started (Unix time)",
                                value=facts.worker_started)
    c = _counter("worker_restarts", "Workers started again after one died")
    c.add_metric([], facts.restarts)
    yield c
    c = _counter("worker_start_failures", "Workers that exited before they were ready")
    c.add_metric([], facts.start_failures)
    yield c
    c = _counter("reloads", "SIGHUP reloads by result (refused: the old configuration stays)",
                 ["result"])
    c.add_metric(["ok"], facts.reloads_ok)
    c.add_metric(["refused"], facts.reloads_refused)
    yield c
    if facts.last_reload is not None:
        yield GaugeMetricFamily(f"{PREFIX}_last_reload_success",
                                "1 when the last reload was applied, 0 when it was refused",
                                value=int(bool(facts.last_reload_ok)))
        yield GaugeMetricFamily(f"{PREFIX}_last_reload_timestamp_seconds",
                                "When the last reload ended (Unix time)",
                                value=facts.last_reload)


def worker_families(s: Mapping[str, Any]) -> Iterator[Metric]:
    """The worker's counters (``WorkerMetrics.snapshot`` plus what the worker adds)."""
    brains = s.get("brains", [])
    names = [b["name"] for b in brains]
    yield GaugeMetricFamily(f"{PREFIX}_config_generation",
                            "Configuration generation the worker serves (1 at its start)",
                            value=s.get("generation") or 0)
    c = _counter("sessions", "SMTP sessions (MTA connections' sessions) started")
    c.add_metric([], s.get("sessions", 0))
    yield c
    yield GaugeMetricFamily(f"{PREFIX}_sessions_open", "Sessions open now",
                            value=s.get("sessions_open", 0))
    c = _counter("messages", "Messages judged at end of message, by what the MTA was told",
                 ["verdict"])
    for verdict, n in sorted(s.get("messages", {}).items()):
        c.add_metric([verdict], n)
    yield c
    yield GaugeMetricFamily(f"{PREFIX}_messages_in_flight",
                            "Messages between MAIL FROM and end of message now",
                            value=s.get("in_flight", 0))
    c = _counter("message_bytes", "Body bytes of judged messages")
    c.add_metric([], s.get("message_bytes", 0))
    yield c
    lat = s.get("message_latency")
    if lat:
        h = HistogramMetricFamily(f"{PREFIX}_message_duration_seconds",
                                  "Time from end of message to the verdict")
        h.add_metric([], _cumulative(lat["buckets"]), lat["sum"])
        yield h
    c = _counter("milter_keys", "Messages carrying milter key headers, by whether one was "
                 "trusted", ["result"])
    for result in ("trusted", "untrusted"):
        c.add_metric([result], s.get("keys", {}).get(result, 0))
    yield c
    c = _counter("milter_keys_stripped", "Key headers not trusted and removed, by reason",
                 ["reason"])
    for reason, n in sorted(s.get("keys_stripped", {}).items()):
        c.add_metric([reason], n)
    yield c
    yield from _connection_families(s)
    yield from _cache_families(s)
    yield from _brain_families(s, names, brains)


def _connection_families(s: Mapping[str, Any]) -> Iterator[Metric]:
    st = s.get("listener", {})
    c = _counter("connections_accepted", "MTA connections accepted")
    c.add_metric([], st.get("accepted", 0))
    yield c
    c = _counter("connections_refused", "MTA connections closed at once: over max_connections",
                 ["reason"])
    c.add_metric(["over_cap"], st.get("refused_over_cap", 0))
    yield c
    c = _counter("connections_evicted",
                 "Connections closed because too many had not negotiated yet")
    c.add_metric([], st.get("evicted_unnegotiated", 0))
    yield c
    c = _counter("fd_exhaustion", "Times accepting found no file descriptor left")
    c.add_metric([], st.get("out_of_files", 0))
    yield c
    yield GaugeMetricFamily(f"{PREFIX}_connections_open", "MTA connections open now",
                            value=s.get("connections_open", 0))
    yield GaugeMetricFamily(f"{PREFIX}_connections_max", "The connection cap in force",
                            value=s.get("max_connections", 0))


def _cache_families(s: Mapping[str, Any]) -> Iterator[Metric]:
    """The scan cache's lookups (labels: a fixed set of results)."""
    st = s.get("cache")
    if not st:
        return
    c = _counter("cache_lookups", "Scan cache lookups by result (forged: a bad signature; "
                 "error: the backend failed: both are misses)", ["result"])
    for result in ("hits", "misses", "forged", "errors"):
        c.add_metric([result.rstrip("s") if result != "misses" else "miss"], st.get(result, 0))
    yield c
    c = _counter("cache_stores", "Results stored in the scan cache")
    c.add_metric([], st.get("stores", 0))
    yield c


def _brain_families(s: Mapping[str, Any], names: list[str],
                    brains: list[Mapping[str, Any]]) -> Iterator[Metric]:
    outcomes: dict[tuple[str, str], int] = {(b, o): n for b, o, n in s.get("brain_outcomes", [])}
    info = _gauge("brain_info", "Configured brains (always 1), in chain order",
                  ["brain", "use", "mode", "on_error"])
    for b in brains:
        info.add_metric([b["name"], b.get("use", ""), b.get("mode", "enforce"),
                         b.get("on_error", "")], 1)
    yield info
    calls = _counter("brain_calls", "eom_process calls (ran, error, timeout, evaluation)",
                     ["brain"])
    errors = _counter("brain_errors", "eom_process calls that raised", ["brain"])
    timeouts = _counter("brain_timeouts", "eom_process calls past the brain's timeout",
                        ["brain"])
    for name in names:
        calls.add_metric([name], sum(outcomes.get((name, o), 0)
                                     for o in ("ran", "error", "timeout", "evaluation")))
        errors.add_metric([name], outcomes.get((name, "error"), 0))
        timeouts.add_metric([name], outcomes.get((name, "timeout"), 0))
    yield calls
    yield errors
    yield timeouts
    results = _counter("brain_results", "What each brain's eom_process came to, by outcome ("
                       + ", ".join(OUTCOMES) + ")", ["brain", "outcome"])
    for (brain, outcome), n in sorted(outcomes.items()):
        results.add_metric([brain, outcome], n)
    yield results
    for key, name, doc in (
            ("brain_verdicts", "brain_verdicts",
             "Verdicts of brains that ran or were replayed from the scan cache, by kind"),
            ("brain_evaluation", "brain_evaluation_verdicts",
             "Would-be verdicts of brains in evaluation mode (never applied)")):
        c = _counter(name, doc, ["brain", "verdict"])
        for brain, verdict, n in s.get(key, []):
            c.add_metric([brain, verdict], n)
        yield c
    c = _counter("brain_skips", "Brains not called, by reason (declined, error, key, "
                 "condition:<kind>)", ["brain", "reason"])
    for brain, reason, n in s.get("brain_skips", []):
        c.add_metric([brain, reason], n)
    yield c
    h = HistogramMetricFamily(f"{PREFIX}_brain_duration_seconds",
                              "Time in eom_process per call", labels=["brain"])
    for brain, lat in s.get("brain_latency", {}).items():
        h.add_metric([brain], _cumulative(lat["buckets"]), lat["sum"])
    yield h
    state = _gauge("brain_breaker_state", "Circuit breaker: 1 for the state it is in",
                   ["brain", "state"])
    opened = _counter("brain_breaker_opened", "Times the circuit breaker opened", ["brain"])
    for b in brains:
        for st in BREAKER_STATES:
            state.add_metric([b["name"], st], int(b.get("breaker") == st))
        opened.add_metric([b["name"]], b.get("breaker_opened", 0))
    yield state
    yield opened


class MonkeyCollector(Collector):
    """Collects at scrape time: the supervisor's facts and, when it answers, the worker's."""

    def __init__(self, facts: Callable[[], SupervisorFacts],
                 stats: Callable[[], Mapping[str, Any] | None]) -> None:
        self._facts = facts
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        facts = self._facts()
        snapshot = self._stats() if facts.worker_serving else None
        ready = not not_ready_reasons(facts, snapshot)
        yield from supervisor_families(facts, ready)
        if snapshot is not None:
            yield from worker_families(snapshot)
