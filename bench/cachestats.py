"""What a MilterMonkey daemon's scan cache did during a measurement, from its ``/metrics``.

A row with the cache on is only worth reading with its hits beside it: a
rate that doubled because every message was replayed says something else
than one that doubled on unique mail.  The daemon counts lookups by result
(``miltermonkey_cache_lookups_total``), per brain what each call came to
(``miltermonkey_brain_results_total{outcome="cached"}`` is a replay), and
messages by what the MTA was told (``miltermonkey_messages_total``, where
the retry workload's 4xx show).  The supervisor serves them when
``metrics = "127.0.0.1:PORT"`` is set; the benchmark reads them before and
after a measurement and keeps the difference.
"""

from __future__ import annotations

import contextlib
import re
import urllib.request
from typing import Any

import attrs

from miltermonkey_core.testing.daemon import MonkeyProcess

_SAMPLE = re.compile(r'^miltermonkey_(?P<name>\w+?)_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$',
                     re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@attrs.frozen
class CacheCounts:
    """Counters of one daemon at one moment (or the difference of two moments)."""

    #: lookups by result: hit, miss, forged, error
    lookups: dict[str, int] = attrs.field(factory=dict)
    #: replays per brain (outcome "cached")
    replays: dict[str, int] = attrs.field(factory=dict)
    #: messages by what the MTA was told: accept, tempfail, reject, ...
    messages: dict[str, int] = attrs.field(factory=dict)

    @property
    def hits(self) -> int:
        return self.lookups.get("hit", 0)

    @property
    def total_lookups(self) -> int:
        return sum(self.lookups.values())

    def __sub__(self, earlier: CacheCounts) -> CacheCounts:
        def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) - b.get(k, 0) for k in sorted({*a, *b})}

        return CacheCounts(minus(self.lookups, earlier.lookups),
                           minus(self.replays, earlier.replays),
                           minus(self.messages, earlier.messages))


def parse(text: str) -> CacheCounts:
    """The counters this module cares about, from a Prometheus text exposition."""
    lookups: dict[str, int] = {}
    replays: dict[str, int] = {}
    msgs: dict[str, int] = {}
    for m in _SAMPLE.finditer(text):
        labels = dict(_LABEL.findall(m["labels"]))
        value = int(float(m["value"]))
        if m["name"] == "cache_lookups" and "result" in labels:
            lookups[labels["result"]] = value
        elif m["name"] == "brain_results" and labels.get("outcome") == "cached":
            replays[labels.get("brain", "?")] = value
        elif m["name"] == "messages" and "verdict" in labels:
            msgs[labels["verdict"]] = value
    return CacheCounts(lookups, replays, msgs)


def cache_setting(monkey: MonkeyProcess) -> str:
    """The daemon's ``cache`` option as configured ("memory" when not set: the default)."""
    return str(monkey.daemon_options.get("cache", "memory"))


def snapshot(monkey: MonkeyProcess | None) -> CacheCounts | None:
    """The daemon's counters now; None without a metrics endpoint or when it does not answer."""
    if monkey is None:
        return None
    address = monkey.daemon_options.get("metrics")
    if not address:
        return None
    with contextlib.suppress(OSError, ValueError), \
            urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return parse(resp.read().decode("utf-8", "replace"))
    return None


def row_fields(monkey: MonkeyProcess | None, before: CacheCounts | None) -> dict[str, Any]:
    """A row's cache figures: ``cache`` ("off", "hits/lookups" or "on"), the counts, replays.

    ``before`` is :func:`snapshot` taken when the measurement started.
    """
    if monkey is None:
        return {"cache": None}
    off = cache_setting(monkey) == "off"
    after = snapshot(monkey)
    if before is None or after is None:  # no metrics endpoint: the hits are not known
        return {"cache": "off" if off else "on"}
    d = after - before
    return {"cache": "off" if off else f"{d.hits}/{d.total_lookups}", "cache_hits": d.hits,
            "cache_lookups": d.total_lookups, "cache_replays": d.replays,
            "cache_results": d.lookups, "verdicts": d.messages}
