"""``miltermonkey status``: the running daemon at a glance, read from its metrics endpoint.

The numbers are the ones Prometheus scrapes (``/metrics``) plus ``/readyz``,
so the command needs the ``metrics`` option set; it finds the address in
the same configuration ``run`` uses (``-c``), or takes ``--url``.  What it
prints follows ``md-mx-ctrl status`` and ``rspamc stat``: a few lines about
the daemon (ready or not and why, uptime, configuration generation, the
last reload), the message and connection totals, then one row per brain:
calls, verdicts, answers from the scan cache, skips, errors, timeouts,
p50/p99 latency (estimated from
the histogram buckets, as Prometheus' ``histogram_quantile`` does) and the
circuit breaker's state.

Exit status: 0 ready, 3 running but not ready (the reasons are printed),
1 not reachable or ``metrics`` not set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from miltermonkey_core.cli.common import EXIT_ERROR, config_option, err, load

EXIT_NOT_READY = 3

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One scrape of ``/metrics``, indexed by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, dict[Labels, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[s.name][tuple(sorted(s.labels.items()))] = s.value

    def value(self, name: str, default: float = 0.0, **labels: str) -> float:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())), default)

    def has(self, name: str) -> bool:
        return bool(self.samples.get(name))

    def by(self, name: str, label: str, **where: str) -> dict[str, float]:
        """``{value of label: sample}`` for the samples of ``name`` matching ``where``."""
        out: dict[str, float] = {}
        for labels, v in self.samples.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == w for k, w in where.items()) and label in d:
                out[d[label]] = out.get(d[label], 0.0) + v
        return out

    def brains(self) -> list[dict[str, str]]:
        """The configured brains in chain order, from ``miltermonkey_brain_info``."""
        return [dict(labels) for labels in self.samples.get("miltermonkey_brain_info", {})]


def quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """The q-quantile from cumulative histogram buckets (``le`` -> count); None if empty.

    Linear interpolation inside the bucket holding the rank, like
    Prometheus' ``histogram_quantile``; in the +Inf bucket, the highest
    finite bound (the value is "above that").
    """
    bounds = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.0f}s"
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds * 1000:.1f}ms" if seconds < 0.1 else f"{seconds * 1000:.0f}ms"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s}s" if minutes else f"{s}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _n(v: float) -> str:
    return str(int(v))


def brain_rows(m: Scrape) -> list[dict[str, str]]:
    rows = []
    for info in m.brains():
        name = info["brain"]
        verdicts = m.by("miltermonkey_brain_verdicts_total", "verdict", brain=name)
        would = m.by("miltermonkey_brain_evaluation_verdicts_total", "verdict", brain=name)
        skips = m.by("miltermonkey_brain_skips_total", "reason", brain=name)
        results = m.by("miltermonkey_brain_results_total", "outcome", brain=name)
        buckets = m.by("miltermonkey_brain_duration_seconds_bucket", "le", brain=name)
        state = [s for s, v in m.by("miltermonkey_brain_breaker_state", "state",
                                    brain=name).items() if v == 1]
        evaluating = info.get("mode") == "evaluate"
        shown = would if evaluating else verdicts
        rows.append({
            "BRAIN": name + (" (eval)" if evaluating else ""),
            "CALLS": _n(m.value("miltermonkey_brain_calls_total", brain=name)),
            "PASS": _n(shown.get("continue", 0) + shown.get("accept", 0)),
            "REJECT": _n(shown.get("reject", 0)),
            "TEMPFAIL": _n(shown.get("tempfail", 0)),
            "DISCARD": _n(shown.get("discard", 0)),
            "CACHED": _n(results.get("cached", 0)),
            "SKIPPED": _n(sum(skips.values())),
            "ERRORS": _n(m.value("miltermonkey_brain_errors_total", brain=name)),
            "TIMEOUTS": _n(m.value("miltermonkey_brain_timeouts_total", brain=name)),
            "OPEN": _n(results.get("open", 0)),
            "P50": _ms(quantile(0.5, buckets)),
            "P99": _ms(quantile(0.99, buckets)),
            "BREAKER": state[0] if state else "-",
        })
    return rows


def table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    if not rows:
        return ["no brains configured"]
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    right = {c for c in cols if c not in ("BRAIN", "BREAKER")}

    def line(cells: Mapping[str, str]) -> str:
        return "  ".join(cells[c].rjust(width[c]) if c in right else cells[c].ljust(width[c])
                         for c in cols).rstrip()

    return [line({c: c for c in cols}), *(line(r) for r in rows)]


def render(m: Scrape, url: str, reasons: list[str], now: float | None = None) -> str:
    now = time.time() if now is None else now
    version = next(iter(m.by("miltermonkey_build_info", "version")), "?")
    ready = not reasons
    out = [f"MilterMonkey {version} at {url}: "
           + ("ready" if ready else "NOT READY: " + "; ".join(reasons))]
    started = m.value("miltermonkey_start_time_seconds")
    wstart = m.value("miltermonkey_worker_start_time_seconds")
    worker = (f"worker up {_ago(now - wstart)}, configuration generation "
              f"{_n(m.value('miltermonkey_config_generation'))}"
              if m.value("miltermonkey_worker_up") else "no worker serving")
    out.append(f"Uptime: {_ago(now - started)}; {worker}; worker restarts "
               f"{_n(m.value('miltermonkey_worker_restarts_total'))}, failed starts "
               f"{_n(m.value('miltermonkey_worker_start_failures_total'))}")
    ok = m.value("miltermonkey_reloads_total", result="ok")
    refused = m.value("miltermonkey_reloads_total", result="refused")
    if m.has("miltermonkey_last_reload_timestamp_seconds"):
        at = m.value("miltermonkey_last_reload_timestamp_seconds")
        stamp = datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")
        last = ("applied" if m.value("miltermonkey_last_reload_success") else
                "REFUSED (the running configuration stayed; see the log)")
        out.append(f"Reloads: {_n(ok)} applied, {_n(refused)} refused; last {last} at "
                   f"{stamp} ({_ago(now - at)} ago)")
    else:
        out.append("Reloads: none since start")
    verdicts = m.by("miltermonkey_messages_total", "verdict")
    total = sum(verdicts.values())
    shares = ", ".join(f"{k} {_n(v)} ({100 * v / total:.1f}%)"
                       for k, v in sorted(verdicts.items(), key=lambda kv: -kv[1])) if total \
        else "none yet"
    out.append(f"Messages: {_n(total)}: {shares}; "
               f"{_n(m.value('miltermonkey_messages_in_flight'))} in flight; "
               f"{_size(m.value('miltermonkey_message_bytes_total'))} of body")
    mbuckets = m.by("miltermonkey_message_duration_seconds_bucket", "le")
    out.append(f"Sessions: {_n(m.value('miltermonkey_sessions_total'))} "
               f"({_n(m.value('miltermonkey_sessions_open'))} open); message time p50 "
               f"{_ms(quantile(0.5, mbuckets))}, p99 {_ms(quantile(0.99, mbuckets))}")
    out.append(f"Connections: {_n(m.value('miltermonkey_connections_open'))} open of "
               f"{_n(m.value('miltermonkey_connections_max'))}; "
               f"{_n(m.value('miltermonkey_connections_accepted_total'))} accepted, "
               f"{_n(m.value('miltermonkey_connections_refused_total', reason='over_cap'))} "
               f"refused over the cap, "
               f"{_n(m.value('miltermonkey_connections_evicted_total'))} evicted, "
               f"{_n(m.value('miltermonkey_fd_exhaustion_total'))} out of descriptors")
    keys = m.by("miltermonkey_milter_keys_total", "result")
    stripped = m.by("miltermonkey_milter_keys_stripped_total", "reason")
    out.append(f"Milter keys: {_n(keys.get('trusted', 0))} trusted, "
               f"{_n(keys.get('untrusted', 0))} untrusted; stripped: "
               + (", ".join(f"{k} {_n(v)}" for k, v in sorted(stripped.items()))
                  or "none"))
    out.append("")
    out += table(brain_rows(m))
    return "\n".join(out) + "\n"


def fetch(url: str, timeout: float) -> tuple[int, str]:
    """(HTTP status, body) of ``url``; an error status is a result, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", "replace")


def base_url(args: argparse.Namespace) -> str | None:
    if args.url:
        url = str(args.url).rstrip("/")
        return url if "://" in url else f"http://{url}"
    config = load(args.config)
    spec = config.daemon.metrics
    if not spec:
        return None
    host, _, port = spec.rpartition(":")
    if host in ("0.0.0.0", "", "[::]"):  # noqa: S104 - a wildcard bind: ask over loopback
        host = "127.0.0.1" if host != "[::]" else "[::1]"
    return f"http://{host}:{port}"


def cmd_status(args: argparse.Namespace) -> int:
    url = base_url(args)
    if url is None:
        err("the daemon's metrics endpoint is off: set metrics = \"127.0.0.1:9899\" in "
            "[miltermonkey] (and restart it), or give --url")
        return EXIT_ERROR
    if not url.startswith(("http://", "https://")):
        err(f"--url {url}: only http:// and https:// are read")
        return EXIT_ERROR
    try:
        code, text = fetch(f"{url}/metrics", args.timeout)
        ready_code, ready_text = fetch(f"{url}/readyz", args.timeout)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        err(f"cannot read {url}/metrics: {reason} (is the daemon running, with metrics on?)")
        return EXIT_ERROR
    if code != 200:
        err(f"{url}/metrics answered HTTP {code}")
        return EXIT_ERROR
    reasons = [] if ready_code == 200 else (
        [ln for ln in ready_text.splitlines()[1:] if ln.strip()] or [f"HTTP {ready_code}"])
    scrape = Scrape(text)
    if args.json:
        print(json.dumps(as_json(scrape, url, reasons), indent=2))
    else:
        print(render(scrape, url, reasons), end="")
    return 0 if not reasons else EXIT_NOT_READY


def as_json(m: Scrape, url: str, reasons: list[str]) -> dict[str, Any]:
    return {"url": url, "ready": not reasons, "not_ready": reasons,
            "messages": m.by("miltermonkey_messages_total", "verdict"),
            "brains": brain_rows(m)}


def add_status_command(sub: Any) -> None:
    p = sub.add_parser("status", help="show the running daemon's state and per-brain numbers",
                       description="Read the running daemon's metrics endpoint (the metrics "
                                   "option) and print its state, totals and a row per brain. "
                                   "Exit status 0: ready, 3: not ready, 1: unreachable.")
    config_option(p)
    p.add_argument("--url", help="the metrics endpoint, e.g. http://127.0.0.1:9899 (default: "
                                 "from the configuration's metrics option)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_status)
